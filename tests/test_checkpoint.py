"""Checkpoint I/O on real files: official .pth layouts, our safetensors directories, bad files."""

import os
import pickle
from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml

from csref_model import checkpoint
from csref_model.checkpoint import (
    load_csa_speech_encoder,
    load_srec_weights,
    load_visual_backbone,
    read_config,
    read_state_dict,
    save_checkpoint,
)
from csref_model.config import load_model_config
from csref_model.srec import build_srec, build_srec_from_checkpoint

POS_CONV = "speech_encoder.model.encoder.pos_conv_embed.conv."


@pytest.fixture(scope="module")
def tiny_config():
    return load_model_config("tiny")


def random_srec(config, seed: int):
    """A tiny SREC whose every tensor, BatchNorm statistics included, is drawn from `seed`."""
    model = build_srec(config, load_pretrained=False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + (0.5 if key.endswith("running_var") else -0.5))
    return model.eval()


@pytest.fixture(scope="module")
def tiny_source(tiny_config):
    return random_srec(tiny_config, seed=1)


def assert_same_weights(model, reference_state):
    state = model.state_dict()
    assert state.keys() == reference_state.keys()
    for key, tensor in reference_state.items():
        assert torch.equal(state[key], tensor), key


def official_file(path: Path, state_dict: dict) -> Path:
    """What the reference's save_checkpoint writes: model EMA weights + optimizer/scheduler state."""
    parameter = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.Adam([parameter], lr=1e-4, betas=(0.9, 0.98), eps=1e-9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.001)
    parameter.grad = torch.ones(3)
    optimizer.step()
    scheduler.step()
    torch.save({"epoch": 39, "state_dict": state_dict, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "lr": optimizer.param_groups[0]["lr"]}, path)
    return path


# ----------------------------------------------------------------------------------------
# Official files


def test_official_srec_file_loads_strictly(tmp_path, tiny_config, tiny_source):
    path = official_file(tmp_path / "det_best_model.pth", tiny_source.state_dict())
    model, config = build_srec_from_checkpoint(path, tiny_config)
    assert not model.training and config is tiny_config
    assert_same_weights(model, tiny_source.state_dict())


@pytest.mark.parametrize("layout", ["bare", "module_prefix", "legacy_weight_norm"])
def test_official_variants(tmp_path, tiny_config, tiny_source, layout):
    state = dict(tiny_source.state_dict())
    if layout == "module_prefix":
        state = {f"module.{key}": value for key, value in state.items()}
    if layout == "legacy_weight_norm":
        state[POS_CONV + "weight_g"] = state.pop(POS_CONV + "parametrizations.weight.original0")
        state[POS_CONV + "weight_v"] = state.pop(POS_CONV + "parametrizations.weight.original1")
        path = official_file(tmp_path / "legacy.pth", state)
    else:
        path = tmp_path / "bare.pth"
        torch.save(state, path)
    model = random_srec(tiny_config, seed=2)
    report = load_srec_weights(model, path)
    assert not report.missing and not report.unexpected
    assert_same_weights(model, tiny_source.state_dict())


def test_mismatch_names_missing_and_unexpected_keys(tmp_path, tiny_config, tiny_source):
    state = dict(tiny_source.state_dict())
    del state["head.obj_preds.0.bias"]
    state["head.extra.weight"] = torch.zeros(1)
    path = official_file(tmp_path / "bad.pth", state)
    with pytest.raises(ValueError) as error:
        load_srec_weights(random_srec(tiny_config, seed=2), path)
    message = str(error.value)
    assert "1 missing keys" in message and "head.obj_preds.0.bias" in message
    assert "1 unexpected keys" in message and "head.extra.weight" in message


def test_long_key_lists_are_truncated(tmp_path, tiny_config, tiny_source):
    state = {key: value for key, value in tiny_source.state_dict().items() if not key.startswith("visual_encoder.")}
    path = official_file(tmp_path / "no_backbone.pth", state)
    with pytest.raises(ValueError) as error:
        load_srec_weights(random_srec(tiny_config, seed=2), path)
    message = str(error.value)
    count = sum(key.startswith("visual_encoder.") for key in tiny_source.state_dict())
    assert f"{count} missing keys" in message and f"and {count - checkpoint.KEYS_SHOWN} more" in message
    assert len(message) < 2000


def test_shape_mismatch_is_named(tmp_path, tiny_config, tiny_source):
    state = dict(tiny_source.state_dict())
    state["head.reg_preds.0.weight"] = torch.zeros(4, 3, 1, 1)
    path = official_file(tmp_path / "shape.pth", state)
    with pytest.raises(ValueError, match=r"head.reg_preds.0.weight: file \(4, 3, 1, 1\) vs model \(4, 64, 1, 1\)"):
        load_srec_weights(random_srec(tiny_config, seed=2), path)


class WritesMarker:
    """A pickle payload that creates a file when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("layout", ["torch_zip", "plain_pickle"])
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path, tiny_config, layout):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    payload = {"epoch": 1, "state_dict": {"x": torch.zeros(1)}, "lr": WritesMarker(marker)}
    if layout == "torch_zip":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    # Sanity: the payload really does create the marker when unpickled without protection.
    with open(path, "rb") as f:
        data = f.read()
    if layout == "plain_pickle":
        pickle.loads(data)
        assert marker.exists()
        marker.unlink()
    with pytest.raises(ValueError, match="refused to load .*arbitrary unpickling.*nothing in it was executed"):
        read_state_dict(path)
    with pytest.raises(ValueError, match="refused to load"):
        build_srec_from_checkpoint(path, tiny_config)
    assert not marker.exists()


def test_truncated_missing_and_empty_files(tmp_path, tiny_source):
    good = official_file(tmp_path / "good.pth", tiny_source.state_dict())
    data = good.read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.pth").write_bytes(b"")
    for name in ("truncated.pth", "empty.pth"):
        with pytest.raises(ValueError, match="could not read checkpoint .*truncated or not a PyTorch checkpoint"):
            read_state_dict(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        read_state_dict(tmp_path / "missing.pth")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "no_weights.pth")
    with pytest.raises(ValueError, match="not a state_dict"):
        read_state_dict(tmp_path / "no_weights.pth")


def test_csa_checkpoint_loads_into_speech_encoder(tmp_path, tiny_config, tiny_source):
    # A CSA checkpoint: speech encoder without the layer-fusion GELUConv, a BERT with the
    # position_ids buffer older transformers saved, and the CLIP loss scale.
    state = {key: value for key, value in tiny_source.state_dict().items()
             if key.startswith("speech_encoder.") and ".fusion_modules." not in key}
    state["text_encoder.model.embeddings.position_ids"] = torch.arange(512)[None]
    state["text_encoder.model.embeddings.word_embeddings.weight"] = torch.zeros(10, 4)
    state["contrastive_loss.logit_scale"] = torch.tensor(2.659)
    path = official_file(tmp_path / "CSA_speech_encoder.pth", state)
    model = random_srec(tiny_config, seed=2)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    report = load_csa_speech_encoder(model, path)
    after = model.state_dict()
    assert sorted(report.loaded) == sorted(key for key in state if key.startswith("speech_encoder."))
    assert report.missing and all(".fusion_modules." in key for key in report.missing)
    assert len(report.unexpected) == 3
    for key, value in after.items():
        expected = state[key] if key in state else before[key]
        assert torch.equal(value, expected), key


def test_csa_checkpoint_must_cover_the_speech_encoder(tmp_path, tiny_config, tiny_source):
    state = {key: value for key, value in tiny_source.state_dict().items() if key.startswith("speech_encoder.")
             and ".fusion_modules." not in key and ".att_flat." not in key}
    path = official_file(tmp_path / "partial_csa.pth", state)
    with pytest.raises(ValueError, match=r"missing keys.*att_flat"):
        load_csa_speech_encoder(random_srec(tiny_config, seed=2), path)
    torch.save({"state_dict": {"visual_encoder.x": torch.zeros(1)}}, tmp_path / "not_csa.pth")
    with pytest.raises(ValueError, match="not a CSA checkpoint"):
        load_csa_speech_encoder(random_srec(tiny_config, seed=2), tmp_path / "not_csa.pth")


def test_cspdarknet_file_loads_into_backbone(tmp_path, tiny_config, tiny_source):
    backbone_state = tiny_source.visual_encoder.state_dict()
    assert all(key.startswith("model.") for key in backbone_state)
    # The reference loads it with strict=False: detector entries beyond the backbone are ignored.
    state = {key: value for key, value in backbone_state.items() if not key.endswith("num_batches_tracked")}
    state["model.24.m.0.weight"] = torch.zeros(255, 8, 1, 1)
    path = tmp_path / "cspdarknet_coco.pth"
    torch.save(state, path)
    model = random_srec(tiny_config, seed=2)
    report = load_visual_backbone(model.visual_encoder, path)
    assert report.unexpected == ["model.24.m.0.weight"]
    assert all(key.endswith("num_batches_tracked") for key in report.missing)
    for key, value in model.visual_encoder.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(value, backbone_state[key]), key
    del state["model.0.conv.weight"]
    torch.save(state, path)
    with pytest.raises(ValueError, match="model.0.conv.weight"):
        load_visual_backbone(random_srec(tiny_config, seed=2).visual_encoder, path)
    torch.save({"backbone.x": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="shares no key with the CSPDarknet backbone"):
        load_visual_backbone(random_srec(tiny_config, seed=2).visual_encoder, path)


def test_backbone_of_one_of_our_checkpoint_directories_loads_and_the_rest_is_skipped(tmp_path, tiny_config, tiny_source):
    """A detector's or SREC's directory (visual_encoder.* beside neck, head, speech) starts a backbone."""
    directory = save_checkpoint(tmp_path / "srec", tiny_source, tiny_config)
    model = random_srec(tiny_config, seed=2)
    report = load_visual_backbone(model.visual_encoder, directory)
    assert report.unexpected == [] and all(key.endswith("num_batches_tracked") for key in report.missing)
    for key, value in model.visual_encoder.state_dict().items():
        assert torch.equal(value, tiny_source.visual_encoder.state_dict()[key]), key


def test_backbone_file_given_as_srec_checkpoint_gets_a_hint(tmp_path, tiny_config, tiny_source):
    path = tmp_path / "cspdarknet_coco.pth"
    torch.save(tiny_source.visual_encoder.state_dict(), path)
    with pytest.raises(ValueError, match="looks like a CSPDarknet backbone"):
        load_srec_weights(random_srec(tiny_config, seed=2), path)


# ----------------------------------------------------------------------------------------
# Our format


def test_our_format_round_trip(tmp_path, tiny_config, tiny_source):
    directory = save_checkpoint(tmp_path / "ckpt", tiny_source, tiny_config)
    assert sorted(p.name for p in directory.iterdir()) == ["config.yaml", "model.safetensors"]
    assert read_config(directory) == tiny_config
    model, config = build_srec_from_checkpoint(directory)
    assert config == tiny_config
    assert_same_weights(model, tiny_source.state_dict())


def test_our_format_overwrite_is_atomic(tmp_path, tiny_config, tiny_source, monkeypatch):
    directory = save_checkpoint(tmp_path / "ckpt", tiny_source, tiny_config)
    original = {p.name: p.read_bytes() for p in directory.iterdir()}
    other = random_srec(tiny_config, seed=3)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.yaml, "safe_dump", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(directory, other, tiny_config)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == original
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no staging leftovers
    save_checkpoint(directory, other, tiny_config)
    model, _ = build_srec_from_checkpoint(directory)
    assert_same_weights(model, other.state_dict())
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_our_format_refuses_to_replace_foreign_directory(tmp_path, tiny_config, tiny_source):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="refusing to replace .*notes.txt"):
        save_checkpoint(tmp_path / "run", tiny_source, tiny_config)
    assert (tmp_path / "run" / "notes.txt").read_text() == "keep me"


def test_our_format_bad_files(tmp_path, tiny_config, tiny_source):
    directory = save_checkpoint(tmp_path / "ckpt", tiny_source, tiny_config)
    weights = directory / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="truncated or not a safetensors file"):
        build_srec_from_checkpoint(directory)
    (directory / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        build_srec_from_checkpoint(directory)


def test_stored_config_with_unknown_key_is_refused(tmp_path, tiny_config, tiny_source):
    directory = save_checkpoint(tmp_path / "ckpt", tiny_source, tiny_config)
    config = yaml.safe_load((directory / "config.yaml").read_text())
    config["fusion"]["garan_head"] = 2
    (directory / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match=r"config.yaml: unknown key 'garan_head' in section 'fusion'"):
        build_srec_from_checkpoint(directory)


def test_our_format_with_wrong_config_names_the_shapes(tmp_path, tiny_config, tiny_source):
    directory = save_checkpoint(tmp_path / "ckpt", tiny_source, tiny_config)
    config = load_model_config("tiny")
    config.head.hidden_size = 32
    with pytest.raises(ValueError, match=r"(?s)another model config.*shape mismatches: head.stems.0.conv.weight: file \(64, 128, 1, 1\) vs model \(32, 128, 1, 1\)"):
        build_srec_from_checkpoint(directory, config)
    assert safetensors.torch.load_file(directory / "model.safetensors").keys() == tiny_source.state_dict().keys()

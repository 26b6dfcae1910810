"""Publish camera-like sensor_msgs/Image frames once a subscriber is there; prints a JSON summary.

A test program (run as a separate process): python image_publisher.py --topic /camera/image_raw ...
"""

import argparse
import json
import sys
import time

import cv2
import numpy as np
import rclpy
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, Image

from csref_ros.image_conversion import fill_image


def scene_pixels(args: argparse.Namespace) -> np.ndarray:
    """(H, W, 3) RGB: the given picture, or a gradient with a bright square."""
    if args.scene:
        bgr = cv2.imread(args.scene, cv2.IMREAD_COLOR)
        if bgr is None:
            sys.exit(f"cannot read scene image {args.scene}")
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    rows = np.linspace(0, 255, args.height, dtype=np.uint8)[:, None, None]
    pixels = np.broadcast_to(rows, (args.height, args.width, 3)).copy()
    pixels[args.height // 4 : args.height // 2, args.width // 4 : args.width // 2] = (250, 40, 40)
    return pixels


def in_encoding(rgb: np.ndarray, encoding: str) -> np.ndarray:
    if encoding == "rgb8":
        return rgb
    if encoding == "bgr8":
        return np.ascontiguousarray(rgb[:, :, ::-1])
    if encoding == "mono8":
        return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    sys.exit(f"image_publisher does not produce {encoding}")


def broken(msg: Image, index: int) -> None:
    """Spoil a frame the ways cameras and bridges do: wrong encoding, cut data, bad step, no pixels."""
    kind = index % 4
    if kind == 0:
        msg.encoding = "yuv422"
    elif kind == 1:
        msg.data = bytes(msg.data)[: len(msg.data) // 2]
    elif kind == 2:
        msg.step = msg.step - 1
    else:
        msg.height, msg.width, msg.step, msg.data = 0, 0, 0, b""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--topic", default="/camera/image_raw")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--scene", help="picture file to publish instead of the synthetic one")
    parser.add_argument("--encoding", default="rgb8", choices=["rgb8", "bgr8", "mono8"])
    parser.add_argument("--frame-id", default="camera")
    parser.add_argument("--rate", type=float, default=10.0)
    parser.add_argument("--count", type=int, default=0, help="frames to publish; 0 = until stopped")
    parser.add_argument("--reliability", choices=["best_effort", "reliable"], default="best_effort")
    parser.add_argument("--durability", choices=["volatile", "transient_local"], default="volatile")
    parser.add_argument("--depth", type=int, default=5)
    parser.add_argument("--bad-frames", type=int, default=0, help="first publish this many broken frames")
    parser.add_argument("--linger", type=float, default=0.0, help="stay alive this long after the last frame")
    parser.add_argument("--wait-subscribers", type=int, default=1)
    parser.add_argument("--depth-topic", help="also publish a depth image with the colour frame's stamp")
    parser.add_argument("--info-topic", help="and the depth image's camera_info (fx=fy=500, centred)")
    parser.add_argument("--depth-encoding", choices=["16UC1", "32FC1"], default="16UC1")
    parser.add_argument("--depth-m", type=float, default=1.2, help="the depth of the whole scene (a wall)")
    parser.add_argument("--bad-depth-frames", type=int, default=0, help="first publish this many depth frames as 8UC1")
    args = parser.parse_args()

    rclpy.init()
    node = rclpy.create_node("test_image_publisher")
    qos = QoSProfile(
        depth=args.depth,
        reliability=getattr(ReliabilityPolicy, args.reliability.upper()),
        durability=getattr(DurabilityPolicy, args.durability.upper()),
    )
    publisher = node.create_publisher(Image, args.topic, qos)
    deadline = time.monotonic() + 30.0
    while publisher.get_subscription_count() < args.wait_subscribers:
        if time.monotonic() > deadline:
            sys.exit(f"no subscriber on {args.topic} after 30 s")
        time.sleep(0.05)
    time.sleep(0.5)  # let the reader's side of discovery finish too

    pixels = in_encoding(scene_pixels(args), args.encoding)
    depth_publisher = info_publisher = None
    if args.depth_topic:
        depth_publisher = node.create_publisher(Image, args.depth_topic, qos)
        info_publisher = node.create_publisher(CameraInfo, args.info_topic, qos)
        depth = np.full((args.height, args.width), args.depth_m, dtype=np.float32)
        depth[::7, ::5] = 0.0  # holes
        depth_pixels = (np.round(depth * 1000).astype(np.uint16) if args.depth_encoding == "16UC1" else depth)
        info = CameraInfo(width=args.width, height=args.height)
        info.k = [500.0, 0.0, (args.width - 1) / 2, 0.0, 500.0, (args.height - 1) / 2, 0.0, 0.0, 1.0]
        info.header.frame_id = "camera_depth_optical_frame"
    period = 1.0 / args.rate
    published = 0
    next_time = time.monotonic()
    try:
        while args.count == 0 or published < args.count:
            msg = Image()
            fill_image(msg, pixels, args.encoding)
            if published < args.bad_frames:
                broken(msg, published)
            msg.header.frame_id = args.frame_id
            msg.header.stamp = node.get_clock().now().to_msg()
            publisher.publish(msg)
            if depth_publisher is not None:
                depth_msg = Image(header=msg.header)
                fill_image(depth_msg, depth_pixels, args.depth_encoding)
                depth_msg.header.frame_id = info.header.frame_id
                if published < args.bad_depth_frames:
                    depth_msg.encoding = "8UC1"
                info.header.stamp = msg.header.stamp
                info_publisher.publish(info)
                depth_publisher.publish(depth_msg)
            published += 1
            next_time += period
            time.sleep(max(0.0, next_time - time.monotonic()))
        time.sleep(args.linger)
    except KeyboardInterrupt:
        pass
    print(json.dumps({"published": published}), flush=True)
    node.destroy_node()
    rclpy.try_shutdown()


if __name__ == "__main__":
    main()

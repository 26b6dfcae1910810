"""Print each vision_msgs/Detection2D arriving on a topic (and the last /diagnostics) as JSON lines.

A test program (run as a separate process):
python detection_listener.py --topic /csref/target_box --count 1 --timeout 60
"""

import argparse
import json
import time

import rclpy
from audio_common_msgs.msg import AudioStamped
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PointStamped
from sensor_msgs.msg import Image
from std_msgs.msg import String
from vision_msgs.msg import Detection2D, Detection2DArray, Detection3DArray


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--topic", default="/csref/target_box")
    parser.add_argument("--count", type=int, default=1, help="stop after this many detections")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--debug-image-topic", help="also count annotated images on this topic")
    parser.add_argument("--utterance-topic", help="also report the AudioStamped utterances on this topic")
    parser.add_argument("--depth", action="store_true",
                        help="also print csref/detections, csref/target_3d and csref/target_point messages")
    parser.add_argument("--string-topic", action="append", default=[],
                        help="also print std_msgs/String messages of this topic and wait for one (repeatable)")
    parser.add_argument("--until", metavar="KEY=VALUE", help="also stop once the diagnostics show this value")
    parser.add_argument("--until-at-least", metavar="KEY=N", action="append", default=[],
                        help="also stop once this diagnostics counter is >= N (repeatable: all must hold)")
    args = parser.parse_args()

    rclpy.init()
    node = rclpy.create_node("test_detection_listener")
    received = []
    diagnostics: dict[str, str] = {}

    def on_detection(msg: Detection2D) -> None:
        received.append(msg)
        print(json.dumps({
            "received_s": time.time(),
            "stamp_s": msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9,
            "frame_id": msg.header.frame_id,
            "id": msg.id,
            "utterance": msg.results[0].hypothesis.class_id if msg.results else None,
            "center": [msg.bbox.center.position.x, msg.bbox.center.position.y],
            "size": [msg.bbox.size_x, msg.bbox.size_y],
            "score": msg.results[0].hypothesis.score if msg.results else None,
        }), flush=True)

    def on_diagnostics(msg: DiagnosticArray) -> None:
        for status in msg.status:
            if "speech grounding" in status.name:
                diagnostics.clear()
                diagnostics.update({kv.key: kv.value for kv in status.values})
                diagnostics["level"] = int.from_bytes(status.level, "little") if isinstance(status.level, bytes) else int(status.level)
                diagnostics["message"] = status.message

    debug_images: list[list[int]] = []
    if args.debug_image_topic:
        node.create_subscription(Image, args.debug_image_topic, lambda m: debug_images.append([m.height, m.width]), 2)
    utterances: list[dict] = []
    if args.utterance_topic:
        node.create_subscription(AudioStamped, args.utterance_topic, lambda m: utterances.append({
            "stamp_s": m.header.stamp.sec + m.header.stamp.nanosec * 1e-9, "rate": m.audio.info.rate,
            "format": m.audio.info.format, "samples": len(m.audio.audio_data.float32_data)}), 10)
    node.create_subscription(Detection2D, args.topic, on_detection, 10)
    if args.depth:
        def on_array(msg: Detection2DArray) -> None:
            print(json.dumps({"array": [[d.bbox.center.position.x, d.bbox.center.position.y] for d in msg.detections]}),
                  flush=True)

        def on_3d(msg: Detection3DArray) -> None:
            print(json.dumps({"target_3d": [{
                "frame_id": msg.header.frame_id,
                "center": [d.bbox.center.position.x, d.bbox.center.position.y, d.bbox.center.position.z],
                "size": [d.bbox.size.x, d.bbox.size.y, d.bbox.size.z],
            } for d in msg.detections]}), flush=True)

        def on_point(msg: PointStamped) -> None:
            print(json.dumps({"point": [msg.point.x, msg.point.y, msg.point.z], "frame_id": msg.header.frame_id}),
                  flush=True)

        node.create_subscription(Detection2DArray, "/csref/detections", on_array, 10)
        node.create_subscription(Detection3DArray, "/csref/target_3d", on_3d, 10)
        node.create_subscription(PointStamped, "/csref/target_point", on_point, 10)
    node.create_subscription(DiagnosticArray, "/diagnostics", on_diagnostics, 10)
    strings: dict[str, list[str]] = {topic: [] for topic in args.string_topic}
    for topic in args.string_topic:
        def on_string(msg: String, topic: str = topic) -> None:
            strings[topic].append(msg.data)
            print(json.dumps({"topic": topic, "string": msg.data}), flush=True)

        node.create_subscription(String, topic, on_string, 10)

    def condition_met() -> bool:
        if args.until:
            key, value = args.until.split("=", 1)
            if str(diagnostics.get(key)) == value:
                return True
        if args.until_at_least:
            pairs = (condition.split("=", 1) for condition in args.until_at_least)
            return all(int(diagnostics.get(key, 0)) >= int(count) for key, count in pairs)
        return False

    deadline = time.monotonic() + args.timeout
    def waiting() -> bool:
        return (len(received) < args.count or not all(strings.values())) and not condition_met()

    while waiting() and time.monotonic() < deadline:
        rclpy.spin_once(node, timeout_sec=0.1)
    settle = time.monotonic() + 1.5  # one more diagnostics message after the last detection
    while time.monotonic() < settle:
        rclpy.spin_once(node, timeout_sec=0.1)
    print(json.dumps({"diagnostics": diagnostics, "debug_images": debug_images, "utterances": utterances}), flush=True)
    node.destroy_node()
    rclpy.try_shutdown()


if __name__ == "__main__":
    main()

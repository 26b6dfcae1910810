"""Drive the node's csref/ground action and csref/enable service from another process.

A test program; runs its steps in order and prints one JSON line per step:
    python ground_client.py enable:false ground:6 enable:true ground:20
    python ground_client.py ground:30:command.wav
ground:<timeout s>[:<sound file>] sends a goal (with the file's speech as float32 at 22.05 kHz,
stamped now, or without audio: listen) and prints the feedback and the result.
"""

import argparse
import json
import sys
import time

import numpy as np
import rclpy
from csref_interfaces.action import Ground
from rclpy.action import ActionClient
from std_srvs.srv import SetBool

from csref_model.audio import load_audio_16k, resample

GOAL_RATE = 22_050


def wait(node, future, timeout_s: float):
    rclpy.spin_until_future_complete(node, future, timeout_sec=timeout_s)
    if not future.done():
        sys.exit(f"no answer within {timeout_s} s")
    return future.result()


def ground(node, client: ActionClient, timeout_s: float, wav: str | None) -> dict:
    goal = Ground.Goal()
    goal.timeout.sec = int(timeout_s)
    goal.timeout.nanosec = int((timeout_s % 1) * 1e9)
    if wav:
        samples = resample(load_audio_16k(wav), 16_000, GOAL_RATE)
        now_ns = node.get_clock().now().nanoseconds - round(len(samples) / GOAL_RATE * 1e9)  # it just ended
        goal.audio.header.stamp.sec, goal.audio.header.stamp.nanosec = divmod(now_ns, 1_000_000_000)
        goal.audio.audio.audio_data.float32_data = samples.astype(np.float32)
        goal.audio.audio.info.format, goal.audio.audio.info.channels = 1, 1
        goal.audio.audio.info.rate, goal.audio.audio.info.chunk = GOAL_RATE, len(samples)
    feedback = []
    handle = wait(node, client.send_goal_async(goal, feedback_callback=lambda m: feedback.append(m.feedback.event)), 30)
    if not handle.accepted:
        return {"step": "ground", "accepted": False}
    started = time.monotonic()
    response = wait(node, handle.get_result_async(), timeout_s + 120)
    result = response.result
    return {
        "step": "ground", "accepted": True, "goal_status": response.status, "status": result.status,
        "message": result.message, "waited_s": time.monotonic() - started, "feedback": feedback,
        "detections": [[d.bbox.center.position.x, d.bbox.center.position.y, d.bbox.size_x, d.bbox.size_y]
                       for d in result.detections.detections],
        "frame_id": result.detections.header.frame_id,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("steps", nargs="+")
    parser.add_argument("--namespace", default="", help="the node's namespace, e.g. /robot1")
    args = parser.parse_args()

    rclpy.init()
    node = rclpy.create_node("test_ground_client")
    action = ActionClient(node, Ground, f"{args.namespace}/csref/ground")
    enable = node.create_client(SetBool, f"{args.namespace}/csref/enable")
    if not action.wait_for_server(timeout_sec=60) or not enable.wait_for_service(timeout_sec=60):
        sys.exit("csref/ground or csref/enable not available")
    for step in args.steps:
        kind, _, rest = step.partition(":")
        if kind == "enable":
            response = wait(node, enable.call_async(SetBool.Request(data=rest == "true")), 30)
            print(json.dumps({"step": "enable", "success": response.success, "message": response.message}), flush=True)
        else:
            timeout, _, wav = rest.partition(":")
            print(json.dumps(ground(node, action, float(timeout), wav or None)), flush=True)
    node.destroy_node()
    rclpy.try_shutdown()


if __name__ == "__main__":
    main()

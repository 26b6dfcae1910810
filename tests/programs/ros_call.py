"""Call a node's parameter and lifecycle services, as `ros2 param set` / `ros2 lifecycle set` would.

A test program (run as a separate process); prints one JSON line per request:
    python ros_call.py /grounding_node set score_threshold=0.5 vad_frame_ms=25
    python ros_call.py /grounding_node lifecycle configure activate
"""

import argparse
import json

import rclpy
import yaml
from lifecycle_msgs.msg import Transition
from lifecycle_msgs.srv import ChangeState, GetState
from rclpy.parameter import Parameter
from rclpy.parameter_client import AsyncParameterClient

TRANSITIONS = {
    "configure": Transition.TRANSITION_CONFIGURE,
    "activate": Transition.TRANSITION_ACTIVATE,
    "deactivate": Transition.TRANSITION_DEACTIVATE,
    "cleanup": Transition.TRANSITION_CLEANUP,
}


def call(node, client, request, timeout: float):
    if not client.wait_for_service(timeout_sec=timeout):
        raise SystemExit(f"service {client.srv_name} not available")
    future = client.call_async(request)
    rclpy.spin_until_future_complete(node, future, timeout_sec=timeout)
    if future.result() is None:
        raise SystemExit(f"no answer from {client.srv_name}")
    return future.result()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("node")
    parser.add_argument("action", choices=["set", "lifecycle"])
    parser.add_argument("items", nargs="+")
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()

    rclpy.init()
    node = rclpy.create_node("test_ros_call")
    if args.action == "set":
        client = AsyncParameterClient(node, args.node)
        if not client.wait_for_services(timeout_sec=args.timeout):
            raise SystemExit(f"parameter services of {args.node} not available")
        for item in args.items:
            name, text = item.split("=", 1)
            future = client.set_parameters([Parameter(name, value=yaml.safe_load(text))])
            rclpy.spin_until_future_complete(node, future, timeout_sec=args.timeout)
            result = future.result().results[0]
            print(json.dumps({"name": name, "successful": result.successful, "reason": result.reason}), flush=True)
    else:
        change = node.create_client(ChangeState, f"{args.node}/change_state")
        get = node.create_client(GetState, f"{args.node}/get_state")
        for item in args.items:
            request = ChangeState.Request()
            request.transition.id = TRANSITIONS[item]
            success = call(node, change, request, args.timeout).success
            state = call(node, get, GetState.Request(), args.timeout).current_state.label
            print(json.dumps({"transition": item, "success": success, "state": state}), flush=True)
    node.destroy_node()
    rclpy.try_shutdown()


if __name__ == "__main__":
    main()

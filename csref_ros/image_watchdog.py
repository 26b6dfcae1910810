"""Notices when camera images stop arriving (or never come) and finds out why.

QoS is the usual reason: a reliable subscription gets nothing from a best-effort camera, and
large images sent best-effort over UDP (a reliable publisher talking to a best-effort
subscription, without the shared-memory profile) are lost in fragments. With `adapt` the
watchdog asks for the subscription to be remade with the publishers' QoS.

Runs on the executor: `image_arrived` from the image callback, `check` from its timer, the
QoS event callbacks from the middleware's events; `last_image_time` is a float written by one
and read by the other (a single reference, no lock needed).
"""

import time
from collections.abc import Callable

from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

from csref_ros.counters import Counters
from csref_ros.qos_events import QoSMessageLostInfo, QoSRequestedIncompatibleQoSInfo

WATCHDOG_COUNTERS = (
    "images_lost",  # reported lost by the middleware (message_lost events)
    "image_warnings",  # no images: missing publisher, QoS mismatch (see last_problem)
    "image_qos_incompatible",  # incompatible-QoS events from the middleware (also image warnings)
)


def qos_text(qos: QoSProfile) -> str:
    reliability = "reliable" if qos.reliability == ReliabilityPolicy.RELIABLE else "best_effort"
    durability = "transient_local" if qos.durability == DurabilityPolicy.TRANSIENT_LOCAL else "volatile"
    return f"reliability={reliability}, durability={durability}"


def subscription_qos(reliability: str, depth: int) -> QoSProfile:
    """The image subscription's QoS from the image_qos_* parameters."""
    return QoSProfile(
        history=HistoryPolicy.KEEP_LAST,
        depth=depth,
        reliability=ReliabilityPolicy.BEST_EFFORT if reliability == "best_effort" else ReliabilityPolicy.RELIABLE,
        durability=DurabilityPolicy.VOLATILE,
    )


def qos_matching(publishers: list, depth: int) -> QoSProfile:
    """The strongest QoS every publisher offers (reliable / transient_local only if all do)."""
    return QoSProfile(
        history=HistoryPolicy.KEEP_LAST,
        depth=depth,
        reliability=ReliabilityPolicy.RELIABLE
        if all(info.qos_profile.reliability == ReliabilityPolicy.RELIABLE for info in publishers)
        else ReliabilityPolicy.BEST_EFFORT,
        durability=DurabilityPolicy.TRANSIENT_LOCAL
        if all(info.qos_profile.durability == DurabilityPolicy.TRANSIENT_LOCAL for info in publishers)
        else DurabilityPolicy.VOLATILE,
    )


class ImageWatchdog:
    """Every `timeout_s` without an image on `topic`: count a warning and report the reason;
    with `adapt`, call `resubscribe(qos)` with the publishers' QoS."""

    def __init__(
        self,
        node: Node,
        topic: str,
        qos: QoSProfile,
        timeout_s: float,
        adapt: bool,
        counters: Counters,
        report_problem: Callable[[str], None],
        resubscribe: Callable[[QoSProfile], None],
    ) -> None:
        self.node, self.topic, self.qos, self.timeout_s, self.adapt = node, topic, qos, timeout_s, adapt
        self.counters, self.report_problem, self.resubscribe = counters, report_problem, resubscribe
        self.last_image_time = time.monotonic()
        self.timer = node.create_timer(timeout_s, self.check)

    def destroy(self) -> None:
        self.node.destroy_timer(self.timer)

    def image_arrived(self) -> None:
        self.last_image_time = time.monotonic()

    def check(self) -> None:
        if time.monotonic() - self.last_image_time < self.timeout_s:
            return
        publishers = self.node.get_publishers_info_by_topic(self.topic)
        self.counters.add("image_warnings")
        if not publishers:
            image_topics = [name for name, types in self.node.get_topic_names_and_types() if any("Image" in t for t in types)]
            self.report_problem(
                f"no image on {self.topic} for {self.timeout_s} s: nobody publishes it "
                f"(image topics now: {', '.join(image_topics) or 'none'}); set image_topic or remap"
            )
            return
        described = "; ".join(
            f"{info.node_namespace.rstrip('/')}/{info.node_name}: {qos_text(info.qos_profile)}" for info in publishers
        )
        matching = qos_matching(publishers, self.qos.depth)
        if self.adapt and qos_text(matching) != qos_text(self.qos):
            self.report_problem(
                f"no image on {self.topic} for {self.timeout_s} s with subscription QoS {qos_text(self.qos)}; "
                f"publishers: {described}. Resubscribing with {qos_text(matching)} (image_qos_adapt)"
            )
            self.qos = matching
            self.resubscribe(matching)
            self.last_image_time = time.monotonic()
            return
        if self.qos.reliability == ReliabilityPolicy.RELIABLE and matching.reliability != ReliabilityPolicy.RELIABLE:
            advice = "QoS MISMATCH: a reliable subscription receives nothing from best-effort publishers; " \
                "set image_qos_reliability:=best_effort or image_qos_adapt:=true"
        else:
            advice = "if the images are large and sent best-effort, start the camera with FASTDDS_DEFAULT_PROFILES_FILE=" \
                "config/fastdds_loopback.xml (shared memory): fragmented best-effort UDP loses them"
        self.report_problem(
            f"no image on {self.topic} for {self.timeout_s} s although {len(publishers)} publisher(s) exist; "
            f"subscription QoS {qos_text(self.qos)}; publishers: {described}. {advice}"
        )

    def on_incompatible_qos(self, info: QoSRequestedIncompatibleQoSInfo) -> None:
        self.counters.add("image_warnings")
        self.counters.add("image_qos_incompatible")
        policy = info.last_policy_kind.name.removeprefix("RMW_QOS_POLICY_")
        self.report_problem(
            f"a publisher on {self.topic} has QoS incompatible with this node's subscription "
            f"(policy {policy}); adjust image_qos_reliability (now {qos_text(self.qos)})"
        )

    def on_message_lost(self, info: QoSMessageLostInfo) -> None:
        self.counters.add("images_lost", info.total_count_change)

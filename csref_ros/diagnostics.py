"""The node's /diagnostics status: state, rates, every counter, latencies and the last problem."""

import time

import numpy as np
from diagnostic_msgs.msg import DiagnosticStatus, KeyValue


def percentile_ms(values: list[float], q: float) -> str:
    return f"{np.percentile(values, q) * 1000:.0f}" if values else "n/a"


class ImageRate:
    """Images per second between two reports, from the running count of images received."""

    def __init__(self) -> None:
        self.images, self.time = 0, time.monotonic()

    def update(self, images: int) -> float:
        now = time.monotonic()
        rate = (images - self.images) / max(1e-3, now - self.time)
        self.images, self.time = images, now
        return rate


def grounding_status(
    name: str,
    configure_error: str,
    configured: bool,
    active: bool,
    image_rate_hz: float,
    counts: dict[str, int],
    latencies_s: list[float],
    processing_s: list[float],
    values: dict[str, str],
    last_problem: str,
) -> DiagnosticStatus:
    """The status from the node's state and counts; `values` adds fixed facts (model, topic, ...)."""
    if configure_error:
        level, message = DiagnosticStatus.ERROR, configure_error
    elif not configured:
        level, message = DiagnosticStatus.WARN, "unconfigured: waiting for the configure transition"
    elif not active:
        level, message = DiagnosticStatus.OK, "configured, inactive"
    elif image_rate_hz == 0:
        level, message = DiagnosticStatus.WARN, f"active, no images on {values['image_topic']}"
    else:
        level, message = DiagnosticStatus.OK, f"active, {counts['detections']} boxes published"
    reported = {
        "state": "active" if active else ("configured" if configured else "unconfigured"),
        **values,
        "image_rate_hz": f"{image_rate_hz:.1f}",
        "latency_end_of_speech_to_publish_p50_ms": percentile_ms(latencies_s, 50),
        "latency_end_of_speech_to_publish_p95_ms": percentile_ms(latencies_s, 95),
        "processing_after_utterance_p50_ms": percentile_ms(processing_s, 50),
        "processing_after_utterance_p95_ms": percentile_ms(processing_s, 95),
        **{key: str(value) for key, value in counts.items()},
        "last_problem": last_problem,
    }
    return DiagnosticStatus(
        level=level,
        name=f"{name}: speech grounding",
        message=message,
        hardware_id="csref_ros",
        values=[KeyValue(key=key, value=value) for key, value in reported.items()],
    )

"""A small thread-safe ring of recent camera frames, to pair an utterance with what was seen.

Times are seconds on one clock (the node uses the image header stamps and its ROS clock).
"""

import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

FRAME_CHOICES = ("end", "start", "latest")


@dataclass(frozen=True)
class StampedFrame:
    stamp_s: float
    frame: Any  # whatever the caller stores: a message, an RGB array, precomputed features


class FrameBuffer:
    """The newest frame always, older ones thinned to one per `min_interval_s`, `capacity` in all."""

    def __init__(self, capacity: int = 30, min_interval_s: float = 0.0) -> None:
        if capacity < 2:
            raise ValueError(f"capacity must be >= 2, got {capacity}")
        self.frames: deque[StampedFrame] = deque(maxlen=capacity)
        self.min_interval_s = min_interval_s
        self.changed = threading.Condition()
        self.received = 0

    def add(self, stamp_s: float, frame: Any) -> None:
        with self.changed:
            if self.frames and stamp_s < self.frames[-1].stamp_s:
                self.frames.clear()  # time went backwards (camera restart, replayed log)
            if len(self.frames) >= 2 and stamp_s - self.frames[-2].stamp_s < self.min_interval_s:
                self.frames[-1] = StampedFrame(stamp_s, frame)
            else:
                self.frames.append(StampedFrame(stamp_s, frame))
            self.received += 1
            self.changed.notify_all()

    def clear(self) -> None:
        with self.changed:
            self.frames.clear()

    def latest(self) -> StampedFrame | None:
        with self.changed:
            return self.frames[-1] if self.frames else None

    def spread(self, spacing_s: float) -> list[StampedFrame]:
        """Kept frames at least spacing_s apart, newest first (the views a best-view ranking compares)."""
        with self.changed:
            chosen: list[StampedFrame] = []
            for frame in reversed(self.frames):
                if not chosen or chosen[-1].stamp_s - frame.stamp_s >= spacing_s:
                    chosen.append(frame)
            return chosen

    def at(self, time_s: float, max_age_s: float) -> StampedFrame | None:
        """The frame on screen at time_s: the newest one stamped at or before it, at most
        max_age_s old; if all frames are newer, the first one within max_age_s after it."""
        with self.changed:
            before = [f for f in self.frames if f.stamp_s <= time_s]
            if before:
                frame = before[-1]
                return frame if time_s - frame.stamp_s <= max_age_s else None
            after = [f for f in self.frames if f.stamp_s - time_s <= max_age_s]
            return after[0] if after else None

    def nearest(self, time_s: float, max_difference_s: float) -> StampedFrame | None:
        """The frame stamped closest to time_s (the earlier one on a tie), if within max_difference_s."""
        with self.changed:
            if not self.frames:
                return None
            frame = min(self.frames, key=lambda f: abs(f.stamp_s - time_s))
        return frame if abs(frame.stamp_s - time_s) <= max_difference_s else None

    def pick(self, mode: str, start_s: float, end_s: float, now_s: float, max_age_s: float) -> StampedFrame | None:
        """The frame for an utterance: at its end, at its start, or the latest (age vs now_s)."""
        if mode == "end":
            return self.at(end_s, max_age_s)
        if mode == "start":
            return self.at(start_s, max_age_s)
        if mode == "latest":
            frame = self.latest()
            return frame if frame is not None and now_s - frame.stamp_s <= max_age_s else None
        raise ValueError(f"frame selection must be one of {FRAME_CHOICES}, got '{mode}'")

    def wait_for_frame_after(self, time_s: float, max_age_s: float, timeout_s: float) -> StampedFrame | None:
        """Block until a frame stamped in [time_s, time_s + max_age_s] arrives (None after
        timeout_s, or if the next frame is already later than that)."""
        def first_new() -> StampedFrame | None:
            return next((f for f in self.frames if f.stamp_s >= time_s), None)

        with self.changed:
            self.changed.wait_for(lambda: first_new() is not None, timeout=timeout_s)
            frame = first_new()
        return frame if frame is not None and frame.stamp_s - time_s <= max_age_s else None

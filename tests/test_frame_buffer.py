"""FrameBuffer: picking the frame for an utterance, ages, waiting for a frame from another thread."""

import threading
import time

import pytest

from csref_ros.frame_buffer import FrameBuffer


@pytest.fixture
def buffer() -> FrameBuffer:
    frames = FrameBuffer(capacity=5)
    for stamp_s in (10.0, 10.1, 10.2, 10.3):
        frames.add(stamp_s, f"frame@{stamp_s}")
    return frames


def test_frame_on_screen_at_a_time(buffer):
    assert buffer.at(10.25, max_age_s=0.5).frame == "frame@10.2"
    assert buffer.at(10.3, max_age_s=0.5).frame == "frame@10.3"
    assert buffer.at(11.0, max_age_s=0.5) is None  # newest frame is 0.7 s old by then
    assert buffer.at(9.95, max_age_s=0.1).frame == "frame@10.0"  # before all frames: the first one
    assert buffer.at(9.0, max_age_s=0.5) is None


def test_pick_modes(buffer):
    assert buffer.pick("end", start_s=10.05, end_s=10.22, now_s=10.5, max_age_s=1).frame == "frame@10.2"
    assert buffer.pick("start", start_s=10.05, end_s=10.22, now_s=10.5, max_age_s=1).frame == "frame@10.0"
    assert buffer.pick("latest", start_s=10.05, end_s=10.22, now_s=10.5, max_age_s=1).frame == "frame@10.3"
    assert buffer.pick("latest", start_s=10.05, end_s=10.22, now_s=12.0, max_age_s=1) is None
    with pytest.raises(ValueError, match="must be one of"):
        buffer.pick("middle", 0, 0, 0, 1)


def test_capacity_keeps_newest(buffer):
    buffer.add(10.4, "a")
    buffer.add(10.5, "b")
    assert buffer.received == 6
    assert [f.stamp_s for f in buffer.frames] == [10.1, 10.2, 10.3, 10.4, 10.5]


def test_history_is_thinned_but_newest_is_kept():
    frames = FrameBuffer(capacity=100, min_interval_s=0.1)
    for index in range(61):  # one second at 60 Hz
        frames.add(index / 60, index)
    stamps = [f.stamp_s for f in frames.frames]
    assert stamps[-1] == 1.0 and 9 <= len(stamps) <= 13
    assert all(0.08 <= later - earlier <= 0.1 + 1e-9 for earlier, later in zip(stamps[:-2], stamps[1:-1]))


def test_time_going_backwards_restarts_history(buffer):
    buffer.add(3.0, "after restart")
    assert [f.frame for f in buffer.frames] == ["after restart"]


def test_wait_for_next_frame_from_another_thread():
    frames = FrameBuffer()
    threading.Timer(0.2, frames.add, args=(5.1, "late frame")).start()
    started = time.monotonic()
    frame = frames.wait_for_frame_after(5.0, max_age_s=0.5, timeout_s=3.0)
    assert frame.frame == "late frame" and time.monotonic() - started < 1.5


def test_wait_gives_up_on_timeout_or_too_late():
    frames = FrameBuffer()
    frames.add(4.0, "earlier")  # stamped before the utterance: does not count
    started = time.monotonic()
    assert frames.wait_for_frame_after(5.0, max_age_s=0.5, timeout_s=0.2) is None
    assert 0.15 <= time.monotonic() - started < 1.0
    frames.add(7.0, "much later")
    assert frames.wait_for_frame_after(5.0, max_age_s=0.5, timeout_s=0.2) is None
    assert frames.wait_for_frame_after(5.0, max_age_s=5.0, timeout_s=0.1).frame == "much later"


def test_nearest_frame_for_syncing_depth_with_colour(buffer):
    assert buffer.nearest(10.24, max_difference_s=0.05).frame == "frame@10.2"
    assert buffer.nearest(10.26, max_difference_s=0.05).frame == "frame@10.3"
    assert buffer.nearest(10.45, max_difference_s=0.1) is None
    assert buffer.nearest(9.95, max_difference_s=0.1).frame == "frame@10.0"
    assert FrameBuffer().nearest(10.0, max_difference_s=1.0) is None


def test_spread_keeps_frames_at_least_the_spacing_apart_newest_first():
    buffer = FrameBuffer(capacity=30)
    for index, stamp in enumerate([0.0, 0.3, 0.6, 1.0, 1.1, 2.05, 2.5]):
        buffer.add(stamp, index)
    assert [f.stamp_s for f in buffer.spread(1.0)] == [2.5, 1.1, 0.0]
    assert [f.stamp_s for f in buffer.spread(0.0)] == [2.5, 2.05, 1.1, 1.0, 0.6, 0.3, 0.0]
    assert FrameBuffer().spread(1.0) == []

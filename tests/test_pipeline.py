"""The node's pipeline without ROS or processes: real speech, real frames, the real tiny model.

The test plays the audio thread (on_audio) and the camera (add_frame) itself; the pipeline's
own inference thread grounds, and the callbacks record what it publishes and reports.
"""

import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from std_msgs.msg import Header

from csref_model import Grounder
from csref_model.audio import SAMPLE_RATE
from csref_model.config import load_model_config
from csref_model.srec import build_srec
from csref_ros.messages import mask_image
from csref_ros.parameters import PARAMETERS
from csref_ros.pipeline import CameraFrame, Outcome, Pipeline, PipelineCallbacks, PipelineSettings, SpeechState, UtteranceJob
from speech_support import espeak_16k, speech_with_pauses

TINY_MODEL = Path(__file__).resolve().parent.parent / "models" / "spoken_shapes_tiny"
WIDTH, HEIGHT = 160, 120
CHUNK = SAMPLE_RATE * 20 // 1000  # 20 ms, as a microphone delivers


@pytest.fixture(scope="module")
def grounder() -> Grounder:
    return Grounder.from_checkpoint(TINY_MODEL)


@pytest.fixture(scope="module")
def command() -> np.ndarray:
    return espeak_16k("pick up the red circle on the left")


def settings(**changes) -> PipelineSettings:
    values = {spec.name: spec.default for spec in PARAMETERS}
    values.update(changes)
    return PipelineSettings.from_parameters(values)


class Outputs:
    """What the pipeline hands to its callbacks."""

    def __init__(self) -> None:
        self.outcomes: list[Outcome] = []  # every utterance grounded
        self.published: list[tuple[UtteranceJob, CameraFrame, tuple, float]] = []  # those with a box: the best one
        self.unanswered: list[tuple[int, str]] = []  # (job number, status)
        self.speech_events: list[tuple[bool, float]] = []
        self.voice: list[bool] = []
        self.problems: list[str] = []
        self.lines: list[str] = []
        self.changed = threading.Condition()

    def publish(self, outcome: Outcome) -> None:
        with self.changed:
            self.outcomes.append(outcome)
            if outcome.detections:
                best = outcome.detections[0]
                self.published.append((outcome.job, outcome.frame, best.box, best.score))
            self.changed.notify_all()

    def voice_activity(self, active: bool) -> None:
        self.voice.append(active)

    def report_problem(self, message: str, kind: str | None) -> None:
        with self.changed:
            self.problems.append(message)
            self.changed.notify_all()

    def on_unanswered(self, job, status, why) -> None:
        with self.changed:
            self.unanswered.append((job.number, status))
            self.changed.notify_all()

    def callbacks(self) -> PipelineCallbacks:
        return PipelineCallbacks(
            publish=self.publish, unanswered=self.on_unanswered,
            speech_event=lambda started, time_s: self.speech_events.append((started, time_s)),
            voice_activity=self.voice_activity, report_problem=self.report_problem, log=self.lines.append,
            now_s=time.time,
        )

    def wait_for(self, condition, timeout_s: float = 60.0) -> bool:
        with self.changed:
            return self.changed.wait_for(condition, timeout=timeout_s)


def frame(number: int) -> CameraFrame:
    rgb = np.full((HEIGHT, WIDTH, 3), number % 256, dtype=np.uint8)
    return CameraFrame(rgb, header=number)


class Camera:
    """Adds a frame stamped now every `period_s` (header = its number) until stopped."""

    def __init__(self, pipeline: Pipeline, period_s: float) -> None:
        self.pipeline, self.period_s = pipeline, period_s
        self.stamps: dict[int, float] = {}
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        number = 0
        while not self.stopping.is_set():
            number += 1
            self.stamps[number] = time.time()
            self.pipeline.add_frame(self.stamps[number], frame(number))
            self.stopping.wait(self.period_s)

    def __enter__(self) -> "Camera":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.thread.join()


def play(pipeline: Pipeline, wave: np.ndarray, realtime: bool) -> None:
    """Feed the wave in 20 ms chunks, each stamped when its last sample is 'recorded'."""
    started = time.time()
    for begin in range(0, len(wave), CHUNK):
        end = min(len(wave), begin + CHUNK)
        if realtime:
            time.sleep(max(0.0, started + end / SAMPLE_RATE - time.time()))
        pipeline.on_audio(wave[begin:end], time.time())


@pytest.fixture
def running(grounder):
    """A started pipeline and its outputs; stopped afterwards."""
    outputs = Outputs()
    pipeline = Pipeline(settings(), outputs.callbacks())
    pipeline.start(grounder)
    pipeline.activate(frame_history_s=3.0, frame_history_rate_hz=10.0)
    yield pipeline, outputs
    pipeline.deactivate()
    pipeline.stop()


def test_spoken_command_is_grounded_on_the_frame_at_its_end(running, command):
    pipeline, outputs = running
    wave, truth = speech_with_pauses([command], [0.5, 1.0])
    with Camera(pipeline, period_s=0.05) as camera:
        started_at = time.time()
        play(pipeline, wave, realtime=True)
        assert outputs.wait_for(lambda: outputs.published), outputs.problems
    job, used, (x1, y1, x2, y2), score = outputs.published[0]
    assert job.number == 1 and len(outputs.published) == 1
    assert job.end_s - started_at == pytest.approx(truth[0][1], abs=0.3)  # VAD frames, chunking, scheduling
    # The frame on screen at the end of speech, or one encoded ahead within the tolerance.
    assert abs(camera.stamps[used.header] - job.end_s) <= settings().precomputed_frame_tolerance_s + 0.1
    assert 0 <= x1 <= x2 <= WIDTH and 0 <= y1 <= y2 <= HEIGHT and 0.0 <= score <= 1.0
    counts = pipeline.counters.snapshot()
    assert counts["utterances"] == 1 and counts["detections"] == 1 and counts["inference_errors"] == 0
    assert counts["precomputed_images"] >= 1  # the newest frame was encoded while the voice was on
    latencies_s, processing_s = pipeline.latencies()
    assert len(latencies_s) == len(processing_s) == 1 and latencies_s[0] >= processing_s[0]
    assert any(line.startswith("utterance 1: box x1=") for line in outputs.lines)
    (started, start_s), (ended, end_s) = outputs.speech_events
    assert started and not ended and end_s == job.end_s
    assert start_s - started_at == pytest.approx(truth[0][0], abs=0.35)  # includes vad_preroll_ms
    assert outputs.voice[:2] == [True, False] and outputs.voice == [True, False] * (len(outputs.voice) // 2)


def test_full_queue_drops_the_oldest_and_short_speech_is_counted(command):
    """No inference thread: every utterance stays queued."""
    outputs = Outputs()
    pipeline = Pipeline(settings(max_pending_utterances=1, vad_min_utterance_s=0.8), outputs.callbacks())
    pipeline.activate(frame_history_s=3.0, frame_history_rate_hz=10.0)
    short = espeak_16k("yes")
    assert len(short) / SAMPLE_RATE < 0.8
    wave, _ = speech_with_pauses([command, short, command, command], [0.5, 1.0, 1.0, 1.0, 1.0])
    play(pipeline, wave, realtime=False)
    counts = pipeline.counters.snapshot()
    assert counts["utterances"] == 3 and counts["utterances_dropped_short"] == 1
    assert counts["utterances_dropped_queue_full"] == 2
    assert [pipeline.jobs.get_nowait().number] == [3] and pipeline.jobs.empty()
    assert outputs.problems == [f"inference is behind: dropped utterance {n} (the newest is kept)" for n in (1, 2)]


def test_utterance_without_a_frame_is_dropped_and_reported(grounder, command):
    outputs = Outputs()
    pipeline = Pipeline(settings(max_frame_age_s=0.2), outputs.callbacks())
    pipeline.start(grounder)
    pipeline.activate(frame_history_s=3.0, frame_history_rate_hz=10.0)
    try:
        play(pipeline, speech_with_pauses([command], [0.3, 1.0])[0], realtime=False)
        assert outputs.wait_for(lambda: outputs.problems)
    finally:
        pipeline.stop()
    assert outputs.problems == ["utterance 1 dropped: no camera frame within max_frame_age_s=0.2 s of its end"]
    assert pipeline.counters.snapshot()["utterances_without_frame"] == 1 and outputs.published == []
    assert outputs.unanswered == [(1, "no_frame")]


def test_settings_swapped_at_run_time_apply_to_the_next_utterance(running, command):
    pipeline, outputs = running
    wave, _ = speech_with_pauses([command], [0.3, 1.0])
    pipeline.update_settings(settings(score_threshold=1.0))
    with Camera(pipeline, period_s=0.05):
        play(pipeline, wave, realtime=False)
        assert outputs.wait_for(lambda: pipeline.counters.snapshot()["utterances_below_threshold"] == 1)
        assert outputs.published == [] and outputs.unanswered == []
        assert len(outputs.outcomes) == 1 and outputs.outcomes[0].detections == ()  # heard, no match
        new_vad = settings(vad_hangover_ms=300, vad_postroll_ms=100)
        pipeline.update_settings(new_vad)
        play(pipeline, wave, realtime=False)
        assert outputs.wait_for(lambda: outputs.published)
    assert pipeline.segmenter.config == new_vad.vad
    assert outputs.published[0][0].number == 2 and outputs.published[0][0].key[0] == 2  # a new segmenter generation


def test_activation_while_inference_uses_work_done_ahead(running, command):
    """activate() drops the work done ahead while the inference thread iterates over it.

    When activate() cleared the inference thread's dict of precomputed frames itself, the
    inference thread hit "OrderedDict mutated during iteration" (an inference error, the
    utterance lost); now it only asks the inference thread to drop them.
    """
    pipeline, outputs = running
    pipeline.update_settings(settings(max_pending_utterances=64, precomputed_frame_tolerance_s=10.0))
    jobs = 10
    stop_activating = threading.Event()

    def activate_again_and_again() -> None:
        while not stop_activating.is_set():
            pipeline.activate(frame_history_s=3.0, frame_history_rate_hz=1000.0)
            pipeline.add_frame(time.time(), frame(0))  # as the camera does: a frame to encode ahead
            pipeline.speech = SpeechState(voice_active=True)  # as the audio thread does: someone speaks
            time.sleep(0.002)

    activator = threading.Thread(target=activate_again_and_again, daemon=True)
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: make an unsafe interleaving likely
    try:
        with Camera(pipeline, period_s=0.001):
            activator.start()
            for number in range(1, jobs + 1):
                time.sleep(0.3)  # time for work ahead between utterances
                now_s = time.time()
                pipeline.enqueue(UtteranceJob((0, number, number), number, now_s - 1.0, now_s, now_s, command, False))
            # A job waiting for a frame in a history that activate() replaced may find none (counted).
            assert outputs.wait_for(
                lambda: len(outputs.published) + sum(pipeline.counters.snapshot()[name] for name in
                                                     ("utterances_without_frame", "inference_errors")) == jobs,
                timeout_s=120,
            ), outputs.problems
    finally:
        stop_activating.set()
        activator.join()
        sys.setswitchinterval(switch_interval)
    counts = pipeline.counters.snapshot()
    assert counts["inference_errors"] == 0, outputs.problems
    assert counts["precomputed_images"] >= 1 and len(outputs.published) >= 1, counts


def test_stamped_audio_pairs_by_its_stamps_and_muting_drops_it(running, command):
    """Audio stamped 2 s in the past (a delayed topic) is grounded on the frame of its stamps;
    audio arriving while muted is dropped, and speech cut by muting is never grounded."""
    pipeline, outputs = running
    wave, truth = speech_with_pauses([command], [0.5, 1.0])
    now = time.time()
    for number, stamp_s in enumerate(np.arange(now - 6.0, now + 0.01, 0.1), start=1):  # frames 6 s back to now
        pipeline.add_frame(float(stamp_s), frame(number))
    start_s = now - 2.0 - len(wave) / SAMPLE_RATE  # the whole recording ended 2 s ago
    half = len(wave) // 2
    pipeline.set_listening(False)
    for begin in range(0, half, CHUNK):  # the first half while muted: dropped
        pipeline.on_stamped_audio(wave[begin : begin + CHUNK], start_s + (begin + CHUNK) / SAMPLE_RATE)
    assert pipeline.counters.snapshot()["audio_chunks_muted"] == len(range(0, half, CHUNK))
    pipeline.set_listening(True)
    for begin in range(0, len(wave), CHUNK):
        pipeline.on_stamped_audio(wave[begin : begin + CHUNK], start_s + (begin + CHUNK) / SAMPLE_RATE)
    assert outputs.wait_for(lambda: outputs.published), outputs.problems
    job, used, _, _ = outputs.published[0]
    assert job.end_s - start_s == pytest.approx(truth[0][1], abs=0.15)
    assert abs(used.header - (job.end_s - now + 6.0) / 0.1 - 1) <= 4  # the frame at the stamps' end of speech


def test_given_utterance_is_grounded_outside_the_vad(running, command):
    pipeline, outputs = running
    with Camera(pipeline, period_s=0.05):
        time.sleep(0.2)
        job = pipeline.given_utterance(command, time.time())
        pipeline.enqueue(job)
        assert outputs.wait_for(lambda: outputs.published), outputs.problems
    assert outputs.published[0][0] is job and job.number == 1
    assert job.end_s - job.start_s == pytest.approx(len(command) / SAMPLE_RATE)
    assert outputs.speech_events == []  # no VAD involved


@pytest.mark.parametrize("mask_head", [True, False])
def test_the_target_mask_comes_at_frame_resolution_from_a_model_with_a_mask_head(command, mask_head):
    config = load_model_config("tiny")
    config.mask_head.enabled = mask_head
    torch.manual_seed(0)
    grounder = Grounder(build_srec(config, load_pretrained=False), config)
    outputs = Outputs()
    pipeline = Pipeline(settings(), outputs.callbacks())
    pipeline.start(grounder)
    pipeline.activate(frame_history_s=3.0, frame_history_rate_hz=10.0)
    try:
        with Camera(pipeline, period_s=0.05):
            time.sleep(0.2)
            pipeline.enqueue(pipeline.given_utterance(command, time.time()))
            assert outputs.wait_for(lambda: outputs.outcomes), outputs.problems
    finally:
        pipeline.deactivate()
        pipeline.stop()
    outcome = outputs.outcomes[0]
    if not mask_head:
        assert outcome.mask is None
        return
    assert outcome.mask is not None and outcome.mask.shape == (HEIGHT, WIDTH) and outcome.mask.dtype == bool
    mono8 = mask_image(Header(frame_id="camera"), outcome.mask, WIDTH * 2, HEIGHT * 2)  # a camera at twice the size
    pixels = np.frombuffer(bytes(mono8.data), np.uint8).reshape(HEIGHT * 2, WIDTH * 2)
    assert set(np.unique(pixels)) <= {0, 255} and (pixels == 255).sum() == 4 * outcome.mask.sum()

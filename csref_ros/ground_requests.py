"""The csref/ground goals waiting for an answer, and which utterance answers each (no ROS here).

A goal either brings its own speech, and is answered by the job made from it (matched by the
job's number), or listens, and is answered by the first utterance from the node's own audio
that ends after the goal was accepted (every listening goal waiting then gets that answer).
Each request is resolved exactly once: by its utterance's outcome, by its deadline or a cancel
request (`expire`, called periodically), or by `close_all` when the node stops listening.

Threads: `finish` runs on the pipeline's inference thread, `speech_event` on its audio thread,
`open`/`expire`/`close_all` on executor threads; the table is under one lock, and the requests'
callbacks run outside it.
"""

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from csref_ros.pipeline import UtteranceJob

STATUSES = ("ok", "no_match", "no_frame", "timeout", "canceled", "stopped")


@dataclass(frozen=True)
class GoalOutcome:
    status: str  # one of STATUSES
    message: str  # why, in words
    job: UtteranceJob | None = None  # the utterance that answered, None for timeout/canceled/stopped
    detections: tuple[Any, ...] = ()  # what the node published for it (its messages; opaque here)
    header: Any = None  # the camera frame's header for ok, else None


@dataclass(frozen=True)
class Request:
    accepted_s: float  # node clock
    deadline_s: float | None  # node clock; None = no timeout
    job_number: int | None  # the job made from the goal's own speech; None = listening
    on_done: Callable[[GoalOutcome], None]
    on_feedback: Callable[[bool, float], None]  # (speech started?, clock time): listening goals only
    cancel_requested: Callable[[], bool]


class GroundRequests:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[int, Request] = {}
        self.given_numbers: set[int] = set()  # jobs made from goals' speech, not yet finished
        self.next_id = 0

    def open(self, request: Request) -> int:
        with self.lock:
            self.next_id += 1
            self.requests[self.next_id] = request
            if request.job_number is not None:
                self.given_numbers.add(request.job_number)
            return self.next_id

    def waiting(self) -> int:
        with self.lock:
            return len(self.requests)

    def speech_event(self, started: bool, time_s: float) -> None:
        with self.lock:
            listening = [r for r in self.requests.values() if r.job_number is None]
        for request in listening:
            request.on_feedback(started, time_s)

    def finish(self, job: UtteranceJob, outcome: GoalOutcome) -> None:
        """The outcome of a job: resolves the requests it answers."""
        with self.lock:
            given = job.number in self.given_numbers
            self.given_numbers.discard(job.number)
            answered = [
                request_id
                for request_id, r in self.requests.items()
                if r.job_number == job.number or (not given and r.job_number is None and r.accepted_s <= job.end_s)
            ]
            resolved = [self.requests.pop(request_id) for request_id in answered]
        for request in resolved:
            request.on_done(outcome)

    def expire(self, now_s: float) -> None:
        """Resolve the requests past their deadline (timeout) or asked to cancel (canceled)."""
        with self.lock:
            due = {}
            for request_id, r in self.requests.items():
                if r.cancel_requested():
                    due[request_id] = GoalOutcome("canceled", "canceled by the client")
                elif r.deadline_s is not None and now_s >= r.deadline_s:
                    due[request_id] = GoalOutcome("timeout", f"nothing grounded within {r.deadline_s - r.accepted_s:.1f} s")
            resolved = [(self.requests.pop(request_id), outcome) for request_id, outcome in due.items()]
        for request, outcome in resolved:
            request.on_done(outcome)

    def close_all(self, outcome: GoalOutcome) -> None:
        with self.lock:
            resolved = list(self.requests.values())
            self.requests.clear()
            self.given_numbers.clear()
        for request in resolved:
            request.on_done(outcome)

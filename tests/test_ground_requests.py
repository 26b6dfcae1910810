"""Which utterance answers which csref/ground goal, without ROS: csref_ros.ground_requests."""

import threading

import numpy as np

from csref_ros.ground_requests import GroundRequests, GoalOutcome, Request
from csref_ros.pipeline import UtteranceJob


def job(number: int, end_s: float) -> UtteranceJob:
    return UtteranceJob(key=(0, end_s - 1.0, end_s), number=number, start_s=end_s - 1.0, end_s=end_s,
                        detected_s=end_s + 0.3, samples=np.zeros(16000, np.float32), cut=False)


class Goal:
    """One goal's side of the table: what it was told, and whether its client asked to cancel."""

    def __init__(self, requests: GroundRequests, accepted_s: float, deadline_s: float | None = None,
                 job_number: int | None = None) -> None:
        self.outcomes: list[GoalOutcome] = []
        self.feedback: list[tuple[bool, float]] = []
        self.cancel = threading.Event()
        requests.open(Request(accepted_s, deadline_s, job_number, self.outcomes.append,
                              lambda started, t: self.feedback.append((started, t)), self.cancel.is_set))


def test_listening_goals_get_the_first_utterance_ending_after_them():
    requests = GroundRequests()
    early, late = Goal(requests, accepted_s=1.0), Goal(requests, accepted_s=5.0)
    requests.speech_event(True, 3.0)
    requests.finish(job(1, end_s=4.0), GoalOutcome("ok", "grounded", job(1, 4.0)))
    assert [o.status for o in early.outcomes] == ["ok"] and late.outcomes == []
    assert early.feedback == [(True, 3.0)] == late.feedback
    requests.finish(job(2, end_s=6.0), GoalOutcome("no_match", "below threshold"))
    assert [o.status for o in late.outcomes] == ["no_match"] and len(early.outcomes) == 1
    assert requests.waiting() == 0


def test_a_goal_with_its_own_speech_is_answered_only_by_its_job():
    requests = GroundRequests()
    given, listening = Goal(requests, 1.0, job_number=7), Goal(requests, 1.0)
    # The goal's own utterance answers only that goal, not the listener.
    requests.finish(job(7, end_s=2.0), GoalOutcome("ok", "grounded"))
    assert len(given.outcomes) == 1 and listening.outcomes == []
    # Feedback goes to listening goals only.
    requests.speech_event(False, 2.5)
    assert given.feedback == [] and listening.feedback == [(False, 2.5)]


def test_deadline_cancel_and_stop_resolve_each_goal_once():
    requests = GroundRequests()
    timed, canceled, open_ended = Goal(requests, 0.0, deadline_s=2.0), Goal(requests, 0.0), Goal(requests, 0.0)
    canceled.cancel.set()
    requests.expire(now_s=1.0)
    assert timed.outcomes == [] and [o.status for o in canceled.outcomes] == ["canceled"]
    requests.expire(now_s=2.0)
    assert [o.status for o in timed.outcomes] == ["timeout"]
    requests.close_all(GoalOutcome("stopped", "node deactivated"))
    requests.finish(job(3, end_s=9.0), GoalOutcome("ok", "grounded"))
    assert [o.status for o in open_ended.outcomes] == ["stopped"]
    assert len(timed.outcomes) == len(canceled.outcomes) == 1 and requests.waiting() == 0

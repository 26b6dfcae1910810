"""Event counts that several threads increment and the diagnostics timer reads."""

import threading


class Counters:
    """Named counts behind one lock; `snapshot` copies them all at one instant."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(names, 0)

    def add(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._counts[name] += amount  # KeyError for a name not declared: a programming error

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

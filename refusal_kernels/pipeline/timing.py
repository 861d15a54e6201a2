"""`Stopwatch`: the seconds each stage of a run took, in the order the stages ran."""

from __future__ import annotations

import time


class Stopwatch:
    """Each `lap(stage)` records the seconds since the previous lap (or since the start)."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._started = self._clock = time.perf_counter()

    def lap(self, stage: str) -> float:
        now = time.perf_counter()
        self.laps[stage] = now - self._clock
        self._clock = now
        return self.laps[stage]

    def elapsed(self) -> float:
        """Seconds since the stopwatch started."""
        return time.perf_counter() - self._started

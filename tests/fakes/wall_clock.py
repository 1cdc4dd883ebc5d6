"""The real clock for :class:`~tests.fakes.fake_backend.FakeBackend`: ``advance`` waits.

A FakeBackend on a WallClock takes its scripted time (``prefill_s``, ``step_s`` per token) on
the same ``time.perf_counter`` the runner measures windows with, so a test sets an engine's
speed and gets a throughput that follows it. The time is spent asleep, not computing, so a
busy machine only adds its scheduling delay at the end of each call, never a share of work.
"""

from __future__ import annotations

import time

__all__ = ["WallClock"]


class WallClock:
    """``time.perf_counter`` as a FakeBackend clock; ``advance`` sleeps for that long."""

    def __call__(self) -> float:
        return time.perf_counter()

    def advance(self, seconds: float) -> None:
        """Wait ``seconds`` (at least; a loaded machine may wake the caller a little later)."""
        if seconds < 0:
            raise ValueError("time does not go backwards")
        time.sleep(seconds)

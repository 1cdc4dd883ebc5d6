"""``--llem-timeout-s``: a case that runs too long is stopped and recorded as failed.

The deadline is a real-time interval timer (``SIGALRM``) on the main thread, so the
``BackendTimeoutError`` it raises lands in the case's own code between two engine calls, the
meters' windows are closed on the way out, and the session goes on to the next case. Where no
such timer exists (Windows, or a case running off the main thread) the deadline cannot
interrupt and the case says so.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from pytest_llem.exceptions import BackendTimeoutError

__all__ = ["CaseTimeoutError", "deadline", "deadline_supported"]


class CaseTimeoutError(BackendTimeoutError):
    """A case ran past ``--llem-timeout-s``."""


def deadline_supported() -> bool:
    """Whether a deadline can interrupt a case here (SIGALRM on the main thread)."""
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


@contextmanager
def deadline(seconds: float | None) -> Iterator[bool]:
    """Raise :class:`CaseTimeoutError` in the block once ``seconds`` have passed.

    Yields:
        Whether the deadline is armed (False: no limit given, or not supported here).
    """
    if not seconds or not deadline_supported():
        yield False
        return

    def expire(signum: int, frame: FrameType | None) -> None:
        del signum, frame
        raise CaseTimeoutError(f"the case ran longer than --llem-timeout-s={seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield True
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)

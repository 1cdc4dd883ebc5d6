"""The open/closed guards of a meter's measurement window, written once for every meter.

A meter opens one window at a time: ``start()`` twice, ``stop()`` or ``lap()`` without
``start()``, and any use after ``close()`` are errors with the same words for every meter
(``"nvml: a window is already open"``). :class:`WindowedMeter` keeps the open window (when it
started and the meter's own state for it) and raises those errors; each meter does only the
measuring.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Generic, TypeVar

from pytest_llem.exceptions import EnergyMeterError

__all__ = ["OpenWindow", "WindowedMeter"]

S = TypeVar("S")


@dataclass
class OpenWindow(Generic[S]):
    """A window that is open: when it started (``time.perf_counter``) and the meter's state."""

    started_at: float
    state: S

    def elapsed_s(self) -> float:
        """Seconds since the window started."""
        return time.perf_counter() - self.started_at


class WindowedMeter(Generic[S]):
    """Base of a meter that owns its window guards; ``S`` is what the meter keeps per window.

    Subclasses set ``name`` and call ``super().__init__()`` before anything that may close the
    meter. A start reads ``_check_can_start()`` (before any work), then ``_opened(state)``;
    ``lap()`` reads ``_current_window("lap")``, ``stop()`` ``_take_window()``; ``close()``
    ``_shut()``, which hands back the window left open so the meter can release it.
    """

    name: str

    def __init__(self) -> None:
        self._window: OpenWindow[S] | None = None
        self._closed = False

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called."""
        return self._closed

    @property
    def window_open(self) -> bool:
        """Whether a window is open."""
        return self._window is not None

    def _check_usable(self) -> None:
        """Raises EnergyMeterError once the meter is closed."""
        if self._closed:
            raise EnergyMeterError(f"{self.name}: the meter is closed")

    def _check_can_start(self) -> None:
        """Raises EnergyMeterError when the meter is closed or a window is already open."""
        self._check_usable()
        if self._window is not None:
            raise EnergyMeterError(f"{self.name}: a window is already open")

    def _opened(self, state: S, *, started_at: float | None = None) -> None:
        """Record the window as open from ``started_at`` (default: now), with ``state``."""
        began = time.perf_counter() if started_at is None else started_at
        self._window = OpenWindow(began, state)

    def _current_window(self, call: str) -> OpenWindow[S]:
        """The open window, which stays open; raises ``"<name>: <call>() without start()"``."""
        if self._window is None:
            raise EnergyMeterError(f"{self.name}: {call}() without start()")
        return self._window

    def _take_window(self) -> OpenWindow[S]:
        """Close the open window and return it; raises ``"<name>: stop() without start()"``."""
        window = self._current_window("stop")
        self._window = None
        return window

    def _abandon_window(self) -> OpenWindow[S] | None:
        """Forget the open window, if any, and return it (for the meter to release)."""
        window, self._window = self._window, None
        return window

    def _shut(self) -> OpenWindow[S] | None:
        """Mark the meter closed and return the window left open, if any."""
        self._closed = True
        return self._abandon_window()

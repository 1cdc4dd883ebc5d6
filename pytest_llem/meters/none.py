"""The ``none`` meter: times the window and measures no energy.

Used where no energy meter can run (no GPU, CodeCarbon not installed) so a benchmark still
reports throughput and latency, and says plainly that it has no energy figures.
"""

from __future__ import annotations

import time

from pytest_llem.exceptions import EnergyMeterError
from pytest_llem.meters.base import EnergyReading, MeterInfo, MeterResolution

__all__ = ["NO_ENERGY_NOTE", "NoneMeter"]

NO_ENERGY_NOTE = "no energy meter: time only"


class NoneMeter:
    """A meter that covers no domain: its readings carry the window's duration only."""

    name = "none"

    def __init__(self) -> None:
        self._window_start: float | None = None

    def info(self) -> MeterInfo:
        """No domains, no sources, no resolution."""
        return MeterInfo(
            name=self.name,
            domains=(),
            sources={},
            resolution=MeterResolution(),
            details={"method": NO_ENERGY_NOTE},
        )

    def start(self) -> None:
        """Open a window."""
        if self._window_start is not None:
            raise EnergyMeterError("none: a window is already open")
        self._window_start = time.perf_counter()

    def stop(self) -> EnergyReading:
        """Close the window; the reading has no domains and says so in its notes."""
        if self._window_start is None:
            raise EnergyMeterError("none: stop() without start()")
        duration_s = time.perf_counter() - self._window_start
        self._window_start = None
        return EnergyReading(
            meter=self.name, duration_s=duration_s, domains={}, notes=(NO_ENERGY_NOTE,)
        )

    def lap(self) -> EnergyReading:
        """Time since ``start()``; no domains, as at ``stop()``."""
        if self._window_start is None:
            raise EnergyMeterError("none: lap() without start()")
        return EnergyReading(
            meter=self.name,
            duration_s=time.perf_counter() - self._window_start,
            domains={},
            notes=(NO_ENERGY_NOTE,),
        )

    def close(self) -> None:
        """Nothing to release."""
        self._window_start = None

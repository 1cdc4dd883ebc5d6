"""The ``none`` meter: times the window and measures no energy.

Used where no energy meter can run (no GPU, CodeCarbon not installed) so a benchmark still
reports throughput and latency, and says plainly that it has no energy figures.
"""

from __future__ import annotations

from pytest_llem.meters.base import EnergyReading, MeterInfo, MeterResolution
from pytest_llem.meters.window import WindowedMeter

__all__ = ["NO_ENERGY_NOTE", "NoneMeter"]

NO_ENERGY_NOTE = "no energy meter: time only"


class NoneMeter(WindowedMeter[None]):
    """A meter that covers no domain: its readings carry the window's duration only.

    Closing it only drops an open window: it is never unusable.
    """

    name = "none"

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
        self._check_can_start()
        self._opened(None)

    def stop(self) -> EnergyReading:
        """Close the window; the reading has no domains and says so in its notes."""
        duration_s = self._take_window().elapsed_s()
        return EnergyReading(
            meter=self.name, duration_s=duration_s, domains={}, notes=(NO_ENERGY_NOTE,)
        )

    def lap(self) -> EnergyReading:
        """Time since ``start()``; no domains, as at ``stop()``."""
        return EnergyReading(
            meter=self.name,
            duration_s=self._current_window("lap").elapsed_s(),
            domains={},
            notes=(NO_ENERGY_NOTE,),
        )

    def close(self) -> None:
        """Nothing to release; a window left open is dropped."""
        self._abandon_window()

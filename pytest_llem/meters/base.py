"""The EnergyMeter protocol and the readings meters return.

A meter measures energy over a window between ``start()`` and ``stop()``. Past this boundary
everything is SI: joules, seconds, watts. Vendor units (NVML millijoules, RAPL microjoules,
CodeCarbon kilowatt-hours) are converted inside each meter's own module. A meter that cannot
measure a domain returns ``energy_j=None`` with a reason, never 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

__all__ = [
    "DOMAINS",
    "Domain",
    "DomainReading",
    "EnergyMeter",
    "EnergyReading",
    "MeterInfo",
    "MeterResolution",
    "Source",
]

Domain = Literal["gpu", "cpu", "dram"]
Source = Literal["measured", "estimated"]
DOMAINS: tuple[Domain, ...] = ("gpu", "cpu", "dram")


@dataclass(frozen=True)
class DomainReading:
    """Energy of one domain over one window.

    ``energy_j`` is None when the meter could not measure it; ``reason`` then says why.
    ``devices`` maps a device label (``gpu0``, ``package-0``) to its own joules where known.
    """

    domain: Domain
    energy_j: float | None
    source: Source
    reason: str | None = None
    devices: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class EnergyReading:
    """Everything one meter saw over one window."""

    meter: str
    duration_s: float
    domains: dict[str, DomainReading]
    emissions_kg: float | None = None
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class MeterResolution:
    """How finely a meter can resolve energy: the counter's update period and its quantum."""

    update_period_s: float | None = None
    energy_quantum_j: float | None = None


@dataclass(frozen=True)
class MeterInfo:
    """A meter as written into the run record."""

    name: str
    domains: tuple[str, ...]
    sources: dict[str, str]
    resolution: MeterResolution
    devices: tuple[str, ...] = ()
    selected_because: str | None = None
    details: dict[str, str] = field(default_factory=dict)


@runtime_checkable
class EnergyMeter(Protocol):
    """Protocol of an energy meter (one implementation per module).

    ``start()`` opens a window, ``stop()`` closes it and returns the energy per domain.
    Windows do not overlap. ``close()`` releases the meter at session end. A meter that can
    read mid-window also offers ``lap() -> EnergyReading`` (the energy since ``start()``,
    the window staying open); the steady-state measurement uses it where present.
    """

    name: str

    def info(self) -> MeterInfo:
        """What this meter covers, how and how finely."""
        ...

    def start(self) -> None:
        """Open a measurement window."""
        ...

    def stop(self) -> EnergyReading:
        """Close the window and return its energy; raises EnergyMeterError on failure."""
        ...

    def close(self) -> None:
        """Release the meter's resources."""
        ...

"""The EnergyMeter protocol and the readings meters return.

A meter measures energy over a window between ``start()`` and ``stop()``. Past this boundary
everything is SI: joules, seconds, watts. Vendor units (NVML millijoules, RAPL microjoules,
CodeCarbon kilowatt-hours) are converted inside each meter's own module. A meter that cannot
measure a domain returns ``energy_j=None`` with a reason, never 0.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

__all__ = [
    "DOMAINS",
    "DeviceState",
    "Domain",
    "DomainReading",
    "EnergyMeter",
    "EnergyReading",
    "MeterInfo",
    "MeterResolution",
    "PowerTimeline",
    "ProcessesUnknown",
    "Source",
    "reading_between",
    "update_period_from_changes",
]

Domain = Literal["gpu", "cpu", "dram"]
Source = Literal["measured", "estimated"]
DOMAINS: tuple[Domain, ...] = ("gpu", "cpu", "dram")


@dataclass(frozen=True)
class DomainReading:
    """Energy of one domain over one window.

    ``energy_j`` is None when the meter could not measure it; ``reason`` then says why.
    ``devices`` maps a device label (``gpu0``, ``package-0``) to its own joules where known;
    ``not_advanced`` names the devices whose energy counter did not move over the reading
    (their energy is less than one counter step: known to be below it, not measured).
    """

    domain: Domain
    energy_j: float | None
    source: Source
    reason: str | None = None
    devices: dict[str, float] = field(default_factory=dict)
    not_advanced: tuple[str, ...] = ()


@dataclass(frozen=True)
class PowerTimeline:
    """Power of one domain sampled through a window (summed over the domain's devices).

    ``times_s`` are seconds since the window opened; ``watts`` the power at (or, after
    downsampling, the mean power of the bucket ending near) each time. ``samples`` counts the
    raw samples before downsampling; ``period_s`` is the sampler's period; ``method`` says what
    was read (``"NVML_FI_DEV_POWER_INSTANT"``, ``"nvmlDeviceGetPowerUsage"``).
    """

    domain: Domain
    times_s: tuple[float, ...]
    watts: tuple[float, ...]
    method: str
    period_s: float
    samples: int


@dataclass(frozen=True)
class ProcessesUnknown:
    """A device whose compute processes cannot be listed, and why (in ``running_processes()``).

    An empty list means "nothing else runs here"; this means "nobody can tell".
    """

    reason: str


@dataclass(frozen=True)
class DeviceState:
    """A device's thermal and clock state at one window edge (None: the device cannot say)."""

    temperature_c: float | None = None
    sm_clock_mhz: float | None = None
    memory_clock_mhz: float | None = None
    power_limit_w: float | None = None
    throttle_reasons: tuple[str, ...] = ()


@dataclass(frozen=True)
class EnergyReading:
    """Everything one meter saw over one window.

    ``timelines`` are power samples over the window (one per domain the meter samples);
    ``cross_check`` maps a domain to ``counter_vs_power_diff``, the relative difference
    ``(counter energy - integrated power) / integrated power`` where both exist;
    ``start_states``/``end_states`` map a device label to its state at the window's edges.
    """

    meter: str
    duration_s: float
    domains: dict[str, DomainReading]
    emissions_kg: float | None = None
    notes: tuple[str, ...] = ()
    timelines: tuple[PowerTimeline, ...] = ()
    cross_check: dict[str, float] = field(default_factory=dict)
    start_states: dict[str, DeviceState] = field(default_factory=dict)
    end_states: dict[str, DeviceState] = field(default_factory=dict)


@dataclass(frozen=True)
class MeterResolution:
    """How finely a meter can resolve energy: the counter's update period and its quantum.

    ``update_period_measured`` is True when the period was measured on this machine (polling
    the counter at start-up) rather than taken from a nominal value; ``note`` says how.
    """

    update_period_s: float | None = None
    energy_quantum_j: float | None = None
    update_period_measured: bool = False
    note: str | None = None


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
    Windows do not overlap. ``close()`` releases the meter at session end.

    What some meters can do beyond this (read mid-window, report device states, list the
    processes on their devices) is stated by the Protocols in
    :mod:`pytest_llem.meters.capabilities` and checked with ``isinstance``.
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


def update_period_from_changes(change_times: Sequence[float]) -> float | None:
    """A counter's update period: the median interval between consecutive changes.

    The median, not the smallest interval: a change seen late (a delayed poll) makes one
    interval long and the next one short, and the median of a few is robust to both.

    Args:
        change_times: When the counter was seen to change, ascending (seconds).

    Returns:
        The median interval, or None with fewer than two changes (no interval).
    """
    intervals = [b - a for a, b in itertools.pairwise(change_times)]
    return statistics.median(intervals) if intervals else None


def reading_between(start: EnergyReading, end: EnergyReading) -> EnergyReading:
    """The energy between two laps of one window (``end`` minus ``start``, per domain).

    Where both laps give per-device figures the difference is taken device by device (a
    device in ``not_advanced`` stood at 0 J since the window opened). A domain missing or not
    measured at either lap has no energy between them (the reason is kept), and a counter that
    did not advance between the laps makes its domain not measured, never 0 J.
    """
    span_s = end.duration_s - start.duration_s
    domains = {
        name: _between(start.domains.get(name), last, span_s) for name, last in end.domains.items()
    }
    return EnergyReading(end.meter, span_s, domains)


def _device_values(reading: DomainReading) -> dict[str, float]:
    return {**dict.fromkeys(reading.not_advanced, 0.0), **reading.devices}


def _between(first: DomainReading | None, last: DomainReading, span_s: float) -> DomainReading:
    if first is None:
        why = last.reason or "not read at the first lap"
        return DomainReading(last.domain, None, last.source, reason=why)
    before, after = _device_values(first), _device_values(last)
    if after and set(after) <= set(before):
        deltas = {label: after[label] - before[label] for label in after}
    elif first.energy_j is None or last.energy_j is None:
        why = (last.reason if last.energy_j is None else first.reason) or "not measured"
        return DomainReading(last.domain, None, last.source, reason=why)
    else:
        deltas = {"": last.energy_j - first.energy_j}
    still = [label or last.domain for label, delta in deltas.items() if delta <= 0]
    if still:
        why = (
            f"counter of {', '.join(still)} did not advance between two reads {span_s:.3f} s "
            "apart (shorter than its update period?)"
        )
        return DomainReading(last.domain, None, last.source, reason=why)
    devices = {label: delta for label, delta in deltas.items() if label}
    return DomainReading(last.domain, math.fsum(deltas.values()), last.source, devices=devices)

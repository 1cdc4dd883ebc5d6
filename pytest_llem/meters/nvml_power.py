"""How the NVML meter reads a GPU's power: the method per GPU, the cost of a read, the sampler
thread, and how often a GPU's energy counter updates.

A GPU is read through the ``NVML_FI_DEV_POWER_INSTANT`` field where it answers, else through
``nvmlDeviceGetPowerUsage`` (milliwatts; a one-second trailing mean on Ampere and newer but
GA100, whose lag :func:`~pytest_llem.meters.power.averaged_power_energy` corrects). The
update-period probe polls the energy counters at start-up to find the meter's resolution.
"""

from __future__ import annotations

import itertools
import re
import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pytest_llem.exceptions import MeterUnavailableError
from pytest_llem.meters.base import MeterResolution, update_period_from_changes
from pytest_llem.meters.nvml_devices import optional_query
from pytest_llem.meters.power import averaged_power_energy, integrate_power

__all__ = [
    "COUNTER_METHOD",
    "COUNTER_UPDATE_PERIOD_S",
    "POWER_METHOD",
    "POWER_USAGE_AVERAGE_S",
    "SAMPLER_COST_FACTOR",
    "SAMPLE_PERIOD_MAX_S",
    "SAMPLE_PERIOD_MIN_S",
    "MeasuredGpu",
    "PowerSampler",
    "PowerSamples",
    "choose_power_method",
    "probe_update_periods",
    "sample_period_s",
    "sampled_energy",
]

#: Nominal update period of the energy counter (seen on H100), used when it cannot be measured.
COUNTER_UPDATE_PERIOD_S = 0.1
#: Bounds of the power sampler's period (before the bound on its own cost).
SAMPLE_PERIOD_MIN_S = 0.005
SAMPLE_PERIOD_MAX_S = 0.1
#: The sampler's period stays at least this many times the cost of one round of reads.
SAMPLER_COST_FACTOR = 50.0
#: ``nvmlDeviceGetPowerUsage`` is a trailing mean over this many seconds on Ampere (but GA100)
#: and newer GPUs (``nvml.h``); the instant-power field is not averaged.
POWER_USAGE_AVERAGE_S = 1.0
#: How a GPU's energy is obtained: its energy counter, or its power samples integrated.
COUNTER_METHOD = "energy counter"
POWER_METHOD = "power integration"

#: The counter counts millijoules.
_COUNTER_QUANTUM_J = 0.001
_PROBE_POLL_S = 0.002
#: Intervals between counter changes wanted per GPU before the probe stops early.
_PROBE_INTERVALS = 3
_COST_READS = 5

_FIELD_METHOD = "NVML_FI_DEV_POWER_INSTANT"
_USAGE_METHOD = "nvmlDeviceGetPowerUsage"
#: ``nvmlDeviceGetArchitecture`` values: Ampere is 7; 0xFFFFFFFF is "unknown".
_ARCH_AMPERE = 7
_ARCH_UNKNOWN = 0xFFFFFFFF
#: GA100 boards (A100, A30, A800 and their X and PG506 variants): Ampere, yet their
#: ``nvmlDeviceGetPowerUsage`` is instantaneous (``nvml.h``).
_GA100_NAMES = re.compile(r"\b(A100X?|A30X?|A800|AX800|PG506)\b")
#: Members of NVML's value union, by ``NVML_VALUE_TYPE_*`` (double, uint, ulong, ulonglong,
#: longlong, int, ushort), so a field is read whatever type the driver answers in.
_VALUE_MEMBERS = ("dVal", "uiVal", "ulVal", "ullVal", "sllVal", "siVal", "usVal")


@dataclass
class MeasuredGpu:
    """One measured GPU: its label, NVML handle and how its energy and power are obtained."""

    label: str
    nvml_index: int
    handle: Any
    name: str
    uuid: str
    method: str
    why_power: str | None = None
    power_method: str | None = None
    why_no_power: str | None = None
    power_average_s: float | None = None
    power_average_note: str | None = None
    power_cost_s: float = 0.0
    update_period_s: float | None = None
    update_intervals: list[float] = field(default_factory=list)
    mig_note: str | None = None


def sample_period_s(update_period_s: float, read_cost_s: float) -> float:
    """The power sampler's period: a twentieth of the counter's update period, kept within
    ``[SAMPLE_PERIOD_MIN_S, SAMPLE_PERIOD_MAX_S]``, then at least ``SAMPLER_COST_FACTOR`` times
    the cost of one round of power reads so that sampling stays a negligible load."""
    period = min(max(update_period_s / 20.0, SAMPLE_PERIOD_MIN_S), SAMPLE_PERIOD_MAX_S)
    return max(period, SAMPLER_COST_FACTOR * read_cost_s)


class _FieldValueError(Exception):
    """A field value came back with a failing per-field NVML status."""


def _field_milliwatts(pynvml: Any, handle: Any) -> float:
    """The instant power field in milliwatts (pynvml answers a ``c_nvmlFieldValue_t`` array)."""
    value = pynvml.nvmlDeviceGetFieldValues(handle, [pynvml.NVML_FI_DEV_POWER_INSTANT])[0]
    if int(value.nvmlReturn) != 0:
        raise _FieldValueError(f"NVML_FI_DEV_POWER_INSTANT answered NVML error {value.nvmlReturn}")
    value_type = int(value.valueType)
    member = _VALUE_MEMBERS[value_type] if 0 <= value_type < len(_VALUE_MEMBERS) else "uiVal"
    return float(getattr(value.value, member))


def _read_watts(pynvml: Any, device: MeasuredGpu) -> float:
    """One power sample of ``device`` in watts, by its chosen method."""
    if device.power_method == _FIELD_METHOD:
        return _field_milliwatts(pynvml, device.handle) / 1000.0
    return float(pynvml.nvmlDeviceGetPowerUsage(device.handle)) / 1000.0


def choose_power_method(pynvml: Any, device: MeasuredGpu) -> None:
    """Pick the instant-power field where it answers, else ``nvmlDeviceGetPowerUsage``."""
    reasons = []
    for method in (_FIELD_METHOD, _USAGE_METHOD):
        device.power_method = method
        try:
            _read_watts(pynvml, device)
        except (pynvml.NVMLError, AttributeError, _FieldValueError) as e:
            reasons.append(f"{method}: {e}")
            continue
        device.power_cost_s = _read_cost_s(pynvml, device)
        if method == _USAGE_METHOD:
            device.power_average_s, device.power_average_note = _usage_averaging(pynvml, device)
        return
    device.power_method, device.why_no_power = None, "; ".join(reasons)


def _usage_averaging(pynvml: Any, device: MeasuredGpu) -> tuple[float | None, str | None]:
    """Whether ``nvmlDeviceGetPowerUsage`` is a trailing average on this GPU, and a note.

    ``nvml.h``: on Ampere (except GA100) and newer it is power averaged over one second; on
    GA100 and older architectures it is instantaneous.
    """
    arch = optional_query(pynvml, lambda: pynvml.nvmlDeviceGetArchitecture(device.handle))
    if arch is None or int(arch) == _ARCH_UNKNOWN:
        return None, (
            f"{_USAGE_METHOD} may be a {POWER_USAGE_AVERAGE_S:g} s average (Ampere and newer) "
            "but this GPU's architecture is unknown: samples are taken as instantaneous"
        )
    if int(arch) < _ARCH_AMPERE or _GA100_NAMES.search(device.name):
        return None, None
    return POWER_USAGE_AVERAGE_S, (
        f"{_USAGE_METHOD} is a {POWER_USAGE_AVERAGE_S:g} s trailing average on this GPU: the "
        "timeline lags the power by about half of that, and the integrated energy is "
        "corrected at the window's edges"
    )


def _read_cost_s(pynvml: Any, device: MeasuredGpu) -> float:
    """The median wall time of one power read."""
    costs = []
    for _ in range(_COST_READS):
        began = time.perf_counter()
        _read_watts(pynvml, device)
        costs.append(time.perf_counter() - began)
    return statistics.median(costs)


# The update-period probe ----------------------------------------------------------------------


def _counter_change_times(
    pynvml: Any, devices: Sequence[MeasuredGpu], budget_s: float, max_s: float
) -> dict[str, list[float]]:
    """Poll the counters (every ~2 ms) and time each change per GPU.

    Polling stops once every GPU has shown ``_PROBE_INTERVALS`` intervals, or after
    ``budget_s`` once every GPU has changed at least twice; a counter that has not goes on
    being polled up to ``max_s`` (a slow counter must not be taken for a fast one). A change
    is dated at the middle of the gap between the read that still showed the old value and the
    read that showed the new one.
    """
    changes: dict[str, list[float]] = {d.label: [] for d in devices}
    last: dict[str, tuple[int, float]] = {}
    began = time.perf_counter()
    while True:
        pending = [d for d in devices if len(changes[d.label]) <= _PROBE_INTERVALS]
        elapsed = time.perf_counter() - began
        if not pending or elapsed >= max_s:
            return changes
        if elapsed >= budget_s and all(len(changes[d.label]) >= 2 for d in devices):
            return changes
        for device in pending:
            began_read = time.perf_counter()
            try:
                value = int(pynvml.nvmlDeviceGetTotalEnergyConsumption(device.handle))
            except pynvml.NVMLError as e:
                raise MeterUnavailableError(
                    "nvml", f"{device.label}: reading the energy counter failed: {e}"
                ) from e
            now = 0.5 * (began_read + time.perf_counter())
            previous = last.get(device.label)
            if previous is not None and value != previous[0]:
                changes[device.label].append(0.5 * (previous[1] + now))
            last[device.label] = (value, now)
        time.sleep(_PROBE_POLL_S)


def probe_update_periods(
    pynvml: Any, devices: Sequence[MeasuredGpu], budget_s: float, max_s: float
) -> MeterResolution:
    """Measure each counter's update period (median interval between changes).

    A counter that changed fewer than twice in the whole poll is at least about as slow as
    the poll was long, so the poll's length is assumed for it (never the nominal 0.1 s).
    """
    counters = [d for d in devices if d.method == COUNTER_METHOD]
    if not counters:
        return MeterResolution(
            update_period_s=COUNTER_UPDATE_PERIOD_S,
            energy_quantum_j=None,
            note=(
                f"no measured GPU has an energy counter; power is integrated from samples and "
                f"the nominal {COUNTER_UPDATE_PERIOD_S:g} s period is assumed"
            ),
        )
    began = time.perf_counter()
    changes = _counter_change_times(pynvml, counters, budget_s, max_s)
    spent = time.perf_counter() - began
    for device in counters:
        times = changes[device.label]
        device.update_intervals = [b - a for a, b in itertools.pairwise(times)]
        device.update_period_s = update_period_from_changes(times)
    unmeasured = [d.label for d in counters if d.update_period_s is None]
    measured = [d.update_period_s for d in counters if d.update_period_s is not None]
    how = (
        f"polled the energy counter of {', '.join(d.label for d in counters)} every "
        f"~{_PROBE_POLL_S * 1000:g} ms for {spent:.2f} s at start-up"
    )
    if unmeasured:
        period = max([spent, *measured])
        return MeterResolution(
            update_period_s=period,
            energy_quantum_j=_COUNTER_QUANTUM_J,
            note=(
                f"{how}; the counter of {', '.join(unmeasured)} changed fewer than twice, so "
                f"its update period is about as long as the poll or longer: {period:.3g} s "
                "assumed"
            ),
        )
    return MeterResolution(
        update_period_s=max(measured),
        energy_quantum_j=_COUNTER_QUANTUM_J,
        update_period_measured=True,
        note=(
            f"{how}; the period is the median interval between changes, the largest over the GPUs"
        ),
    )


# The power sampler ----------------------------------------------------------------------------


@dataclass
class PowerSamples:
    """Power samples of a window: times (``perf_counter``) and watts per sampled device."""

    times: list[float] = field(default_factory=list)
    watts: list[list[float]] = field(default_factory=list)
    error: BaseException | None = None


def sampled_energy(device: MeasuredGpu, times_s: Sequence[float], watts: Sequence[float]) -> float:
    if device.power_average_s is None:
        return integrate_power(times_s, watts)
    return averaged_power_energy(times_s, watts, average_s=device.power_average_s)


class PowerSampler:
    """Samples the power of some GPUs in a daemon thread, on a fixed schedule."""

    def __init__(self, pynvml: Any, devices: Sequence[MeasuredGpu], period_s: float) -> None:
        self._pynvml = pynvml
        self._devices = list(devices)
        self._period_s = period_s
        self._samples = PowerSamples()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        watts = [_read_watts(self._pynvml, d) for d in self._devices]
        self._samples.times.append(time.perf_counter())
        self._samples.watts.append(watts)

    def _run(self) -> None:
        began = time.perf_counter()
        ticks = 1
        while not self._stop.wait(max(0.0, began + ticks * self._period_s - time.perf_counter())):
            ticks += 1
            try:
                self._sample()
            except Exception as e:  # reported by finish()
                self._samples.error = e
                return

    def start(self) -> None:
        """Take the first sample now (raising if it fails), then sample in the thread."""
        self._sample()
        self._thread = threading.Thread(
            target=self._run, name="pytest-llem-nvml-power", daemon=True
        )
        self._thread.start()

    def cancel(self) -> None:
        """Stop sampling and join the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def finish(self) -> PowerSamples:
        """Stop, take a last sample and return every sample (with the error, if one came)."""
        self.cancel()
        if self._samples.error is None:
            try:
                self._sample()
            except Exception as e:  # reported to the caller in the samples
                self._samples.error = e
        return self._samples

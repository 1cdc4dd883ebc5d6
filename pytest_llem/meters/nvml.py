"""The NVML energy meter: NVIDIA GPU energy from the driver's counters, in joules.

At construction the meter measures how often each GPU's energy counter
(``nvmlDeviceGetTotalEnergyConsumption``, millijoules) updates, which becomes its resolution. A
window reads the counters at its edges while a thread samples power (the
``NVML_FI_DEV_POWER_INSTANT`` field, else ``nvmlDeviceGetPowerUsage``, milliwatts): the samples
give the window's power timeline, a cross-check of the counter, and the energy of a GPU that has
no counter. Where the samples are ``nvmlDeviceGetPowerUsage``'s one-second average (Ampere and
newer), their integral is corrected for the average's lag. Each window edge also records every
GPU's temperature, clocks and clock event reasons, and ``running_processes()`` lists who else
computes on the GPUs (or why it cannot). NVML's units are converted here and nowhere else.
"""

from __future__ import annotations

import bisect
import importlib
import itertools
import logging
import math
import os
import re
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pytest_llem.exceptions import ConfigurationError, EnergyMeterError, MeterUnavailableError
from pytest_llem.meters.base import (
    DeviceState,
    DomainReading,
    EnergyReading,
    MeterInfo,
    MeterResolution,
    PowerTimeline,
    ProcessesUnknown,
    update_period_from_changes,
)

__all__ = [
    "COUNTER_UPDATE_PERIOD_S",
    "POWER_USAGE_AVERAGE_S",
    "SAMPLER_COST_FACTOR",
    "SAMPLE_PERIOD_MAX_S",
    "SAMPLE_PERIOD_MIN_S",
    "TIMELINE_MAX_POINTS",
    "UPDATE_PERIOD_PROBE_MAX_S",
    "UPDATE_PERIOD_PROBE_S",
    "NvmlGpu",
    "NvmlMeter",
    "averaged_power_energy",
    "decode_clock_event_reasons",
    "downsample_power",
    "integrate_power",
    "nvml_gpus",
    "parse_cuda_visible_devices",
    "sample_period_s",
]

logger = logging.getLogger("pytest_llem")

#: Nominal update period of the energy counter (seen on H100), used when it cannot be measured.
COUNTER_UPDATE_PERIOD_S = 0.1
#: How long the meter polls the energy counters at construction to measure their period.
UPDATE_PERIOD_PROBE_S = 1.0
#: The longest it goes on polling a counter that has not yet changed twice (a slow counter).
UPDATE_PERIOD_PROBE_MAX_S = 5.0
#: Bounds of the power sampler's period (before the bound on its own cost).
SAMPLE_PERIOD_MIN_S = 0.005
SAMPLE_PERIOD_MAX_S = 0.1
#: The sampler's period stays at least this many times the cost of one round of reads.
SAMPLER_COST_FACTOR = 50.0
#: A window's power timeline keeps at most this many points (bucket means beyond that).
TIMELINE_MAX_POINTS = 200
#: ``nvmlDeviceGetPowerUsage`` is a trailing mean over this many seconds on Ampere (but GA100)
#: and newer GPUs (``nvml.h``); the instant-power field is not averaged.
POWER_USAGE_AVERAGE_S = 1.0

#: The counter counts millijoules.
_COUNTER_QUANTUM_J = 0.001
_PROBE_POLL_S = 0.002
#: Intervals between counter changes wanted per GPU before the probe stops early.
_PROBE_INTERVALS = 3
_COST_READS = 5

_COUNTER = "energy counter"
_POWER = "power integration"
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
#: Clock event ("throttle") reason bits of ``nvmlDeviceGetCurrentClocksEventReasons``, by the
#: suffix of pynvml's ``nvmlClocksEventReason*`` / ``nvmlClocksThrottleReason*`` names.
_CLOCK_EVENT_REASONS: tuple[tuple[str, int], ...] = (
    ("GpuIdle", 0x1),
    ("ApplicationsClocksSetting", 0x2),
    ("SwPowerCap", 0x4),
    ("HwSlowdown", 0x8),
    ("SyncBoost", 0x10),
    ("SwThermalSlowdown", 0x20),
    ("HwThermalSlowdown", 0x40),
    ("HwPowerBrakeSlowdown", 0x80),
    ("DisplayClockSetting", 0x100),
    ("BoardLimit", 0x200),
    ("Reliability", 0x400),
)


@dataclass(frozen=True)
class NvmlGpu:
    """One GPU visible to this process, as written into the run record's machine section.

    ``index`` is the index the process sees (after ``CUDA_VISIBLE_DEVICES``). The fields match
    ``pytest_llem.results.models.GpuInfo``, so ``GpuInfo(**dataclasses.asdict(gpu))`` works.
    Memory is in MiB (as nvidia-smi and the rest of the project count megabytes).
    """

    index: int
    name: str
    uuid: str | None = None
    driver: str | None = None
    power_limit_w: float | None = None
    memory_total_mb: float | None = None


@dataclass(frozen=True)
class _Visible:
    """A GPU the process sees: its NVML index and, if named so, the MIG instance used on it."""

    nvml_index: int
    mig: str | None = None


@dataclass
class _Device:
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


# Pure functions -------------------------------------------------------------------------------


def integrate_power(times_s: Sequence[float], watts: Sequence[float]) -> float:
    """Energy in joules of power samples, by the trapezoid rule.

    Args:
        times_s: Sample times in seconds, ascending.
        watts: Power at each time.

    Returns:
        The integral; 0.0 for fewer than two samples.
    """
    if len(times_s) != len(watts):
        raise ValueError("times_s and watts differ in length")
    return math.fsum(
        0.5 * (watts[k] + watts[k - 1]) * (times_s[k] - times_s[k - 1])
        for k in range(1, len(times_s))
    )


def averaged_power_energy(
    times_s: Sequence[float], watts: Sequence[float], *, average_s: float
) -> float:
    """Energy in joules over the samples' span when each sample is a trailing mean of power.

    A trailing mean over ``average_s`` seconds lags the power: its integral over a window misses
    ``average_s / 2`` times the change of the mean across the window (exact when the power is
    steady over ``average_s`` before each edge, the error otherwise second order in the change),
    so that term is added back to the trapezoid integral.

    Args:
        times_s: Sample times in seconds, ascending.
        watts: The averaged power at each time.
        average_s: The length of the trailing mean.

    Returns:
        The corrected integral; 0.0 for fewer than two samples.
    """
    if len(times_s) < 2:
        return 0.0
    return integrate_power(times_s, watts) + 0.5 * average_s * (watts[-1] - watts[0])


def downsample_power(
    times_s: Sequence[float], watts: Sequence[float], *, max_points: int = TIMELINE_MAX_POINTS
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Reduce a power series to at most ``max_points`` bucket means, preserving its energy.

    The span from the first to the last sample is cut into ``max_points`` equal buckets; each
    point is the bucket's end and the mean power over the bucket (the exact integral of the
    linearly interpolated samples, divided by the bucket's width). So
    ``sum(w[i] * (t[i] - t[i-1]))`` with ``t[-1] = times_s[0]`` equals
    ``integrate_power(times_s, watts)``. A series short enough is returned unchanged.

    Args:
        times_s: Sample times in seconds, ascending.
        watts: Power at each time.
        max_points: The most points to return (at least 1).

    Returns:
        The times and watts of the (possibly) reduced series.

    Raises:
        ValueError: The sequences differ in length or ``max_points`` is below 1.
    """
    if len(times_s) != len(watts):
        raise ValueError("times_s and watts differ in length")
    if max_points < 1:
        raise ValueError("max_points must be at least 1")
    if len(times_s) <= max_points:
        return tuple(float(t) for t in times_s), tuple(float(w) for w in watts)
    start, end = float(times_s[0]), float(times_s[-1])
    if end <= start:
        return (end,), (statistics.fmean(watts),)
    cumulative = [0.0]
    for k in range(1, len(times_s)):
        step = 0.5 * (watts[k] + watts[k - 1]) * (times_s[k] - times_s[k - 1])
        cumulative.append(cumulative[-1] + step)
    edges = [start + (end - start) * j / max_points for j in range(max_points)] + [end]
    energy = [_energy_until(times_s, watts, cumulative, edge) for edge in edges]
    means = tuple(
        (energy[j + 1] - energy[j]) / (edges[j + 1] - edges[j]) for j in range(max_points)
    )
    return tuple(edges[1:]), means


def _energy_until(
    times_s: Sequence[float], watts: Sequence[float], cumulative: Sequence[float], t: float
) -> float:
    """The integral of the interpolated power from the first sample to ``t`` (inside the span)."""
    k = min(max(bisect.bisect_right(times_s, t) - 1, 0), len(times_s) - 2)
    width = times_s[k + 1] - times_s[k]
    into = t - times_s[k]
    if width <= 0:
        return cumulative[k]
    slope = (watts[k + 1] - watts[k]) / width
    return cumulative[k] + watts[k] * into + 0.5 * slope * into * into


def decode_clock_event_reasons(mask: int) -> tuple[str, ...]:
    """Names of the bits set in an NVML clock event (throttle) reasons mask.

    Names are the suffixes of pynvml's ``nvmlClocksEventReason*`` constants (``GpuIdle``,
    ``SwPowerCap``, ``HwSlowdown``...); an unknown bit is named by its hex value.
    """
    names = [name for name, bit in _CLOCK_EVENT_REASONS if mask & bit]
    known = 0
    for _, bit in _CLOCK_EVENT_REASONS:
        known |= bit
    rest = mask & ~known
    names.extend(f"0x{1 << i:x}" for i in range(rest.bit_length()) if rest >> i & 1)
    return tuple(names)


def sample_period_s(update_period_s: float, read_cost_s: float) -> float:
    """The power sampler's period: a twentieth of the counter's update period, kept within
    ``[SAMPLE_PERIOD_MIN_S, SAMPLE_PERIOD_MAX_S]``, then at least ``SAMPLER_COST_FACTOR`` times
    the cost of one round of power reads so that sampling stays a negligible load."""
    period = min(max(update_period_s / 20.0, SAMPLE_PERIOD_MIN_S), SAMPLE_PERIOD_MAX_S)
    return max(period, SAMPLER_COST_FACTOR * read_cost_s)


def parse_cuda_visible_devices(
    value: str | None,
    uuids: Sequence[str],
    *,
    mig_parent: Callable[[str], int] | None = None,
) -> list[int]:
    """Map ``CUDA_VISIBLE_DEVICES`` to NVML device indices, in the order the process sees them.

    Follows CUDA's rules: entries are integer indices or (prefixes of) ``GPU-...`` UUIDs, and the
    first entry that names no device ends the list. Integer indices are taken in NVML's order,
    which is CUDA's order when ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` (and on machines of identical
    GPUs). A ``MIG-...`` entry stands for its parent GPU, found by ``mig_parent``.

    Args:
        value: The variable's value; None when it is not set.
        uuids: The UUID of every NVML device, by NVML index.
        mig_parent: Maps a MIG instance's entry to its parent GPU's NVML index (raising
            MeterUnavailableError where it cannot); None refuses MIG entries.

    Returns:
        NVML indices of the visible devices; empty when none is visible.

    Raises:
        MeterUnavailableError: An entry names a MIG instance whose parent cannot be found.
    """
    return [v.nvml_index for v in _parse_visible(value, uuids, mig_parent)]


def _parse_visible(
    value: str | None, uuids: Sequence[str], mig_parent: Callable[[str], int] | None
) -> list[_Visible]:
    if value is None:
        return [_Visible(i) for i in range(len(uuids))]
    visible: list[_Visible] = []
    for raw in value.split(","):
        entry = raw.strip()
        if entry.upper().startswith("MIG-"):
            if mig_parent is None:
                raise MeterUnavailableError(
                    "nvml",
                    f"CUDA_VISIBLE_DEVICES names a MIG instance ({entry}) and no way to find "
                    "its parent GPU was given",
                )
            found: _Visible | None = _Visible(mig_parent(entry), entry)
        else:
            index = _match_entry(entry, uuids)
            found = None if index is None else _Visible(index)
        if found is None or found.nvml_index in [v.nvml_index for v in visible]:
            break
        visible.append(found)
    return visible


def _match_entry(entry: str, uuids: Sequence[str]) -> int | None:
    if not entry:
        return None
    if entry.isdigit():
        index = int(entry)
        return index if index < len(uuids) else None
    prefix = entry.lower() if entry.upper().startswith("GPU-") else f"gpu-{entry.lower()}"
    matches = [i for i, uuid in enumerate(uuids) if uuid.lower().startswith(prefix)]
    return matches[0] if len(matches) == 1 else None


# NVML queries ---------------------------------------------------------------------------------


def _import_pynvml() -> Any:
    try:
        return importlib.import_module("pynvml")
    except ImportError as e:
        raise MeterUnavailableError(
            "nvml", "nvidia-ml-py is not installed (pip install nvidia-ml-py)"
        ) from e


def _init_reason(pynvml: Any, error: Exception) -> str:
    """Words for why ``nvmlInit`` failed."""
    if isinstance(error, getattr(pynvml, "NVMLError_LibraryNotFound", ())):
        return "NVML library not found (no NVIDIA driver)"
    if isinstance(error, getattr(pynvml, "NVMLError_DriverNotLoaded", ())):
        return "NVIDIA driver not loaded"
    return f"NVML failed to initialise: {error}"


def _text(value: Any) -> str:
    """NVML strings are ``str`` in nvidia-ml-py but ``bytes`` in old releases."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _is_unsupported(pynvml: Any, error: Exception) -> bool:
    """Whether ``error`` says a device or driver lacks a function (rather than failed)."""
    kinds = tuple(
        kind
        for kind in (
            getattr(pynvml, "NVMLError_NotSupported", None),
            getattr(pynvml, "NVMLError_FunctionNotFound", None),
        )
        if isinstance(kind, type)
    )
    return isinstance(error, AttributeError) or (bool(kinds) and isinstance(error, kinds))


def _query_errors(pynvml: Any) -> tuple[type[BaseException], ...]:
    """What an NVML query may raise for "cannot answer": ``NVMLError``, a function this pynvml
    lacks (``AttributeError``), and ``NVMLLibraryMismatchError``, a plain ``Exception`` that
    nvidia-ml-py raises from unversioned calls (the process listings) on older drivers."""
    mismatch = getattr(pynvml, "NVMLLibraryMismatchError", None)
    kinds: tuple[type[BaseException], ...] = (pynvml.NVMLError, AttributeError)
    return (*kinds, mismatch) if isinstance(mismatch, type) else kinds


def _optional(pynvml: Any, query: Callable[[], Any]) -> Any | None:
    """The query's answer, or None where NVML or this pynvml cannot give it."""
    try:
        return query()
    except _query_errors(pynvml) as e:
        logger.debug("nvml: optional query failed: %s", e)
        return None


def _compute_processes(pynvml: Any, handle: Any) -> list[Any] | ProcessesUnknown:
    """A GPU's compute processes, or why they cannot be listed.

    The unversioned ``nvmlDeviceGetComputeRunningProcesses`` calls the newest struct version,
    which an older driver lacks (nvidia-ml-py then raises ``NVMLLibraryMismatchError``): the
    ``_v2`` call is tried next. A MIG-enabled GPU answers ``NVML_ERROR_NO_PERMISSION`` to an
    unprivileged process.
    """
    reasons: list[str] = []
    for function in (
        "nvmlDeviceGetComputeRunningProcesses",
        "nvmlDeviceGetComputeRunningProcesses_v2",
    ):
        query = getattr(pynvml, function, None)
        if query is None:
            reasons.append(f"{function} is not in this nvidia-ml-py")
            continue
        try:
            return list(query(handle))
        except _query_errors(pynvml) as e:
            reasons.append(f"{function}: {_process_error(pynvml, e)}")
            if not _is_version_mismatch(pynvml, e):
                break
    return ProcessesUnknown("cannot list its compute processes: " + "; ".join(reasons))


def _is_version_mismatch(pynvml: Any, error: BaseException) -> bool:
    mismatch = getattr(pynvml, "NVMLLibraryMismatchError", None)
    return isinstance(error, AttributeError) or (
        isinstance(mismatch, type) and isinstance(error, mismatch)
    )


def _process_error(pynvml: Any, error: BaseException) -> str:
    permission = getattr(pynvml, "NVMLError_NoPermission", None)
    if isinstance(permission, type) and isinstance(error, permission):
        return f"{error} (a MIG-enabled GPU lists its processes to privileged users only)"
    if _is_version_mismatch(pynvml, error):
        return f"the driver's NVML lacks this call ({type(error).__name__})"
    return str(error) or type(error).__name__


def _mig_parent_index(pynvml: Any, entry: str, uuids: Sequence[str]) -> int:
    """The NVML index of the GPU holding the MIG instance ``entry`` names."""
    try:
        if entry.upper().startswith("MIG-GPU-"):
            # The pre-R470 form MIG-GPU-<parent uuid>/<gpu instance>/<compute instance>.
            parent_uuid = entry[len("MIG-") :].split("/")[0]
        else:
            mig = pynvml.nvmlDeviceGetHandleByUUID(entry)
            parent = pynvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(mig)
            parent_uuid = _text(pynvml.nvmlDeviceGetUUID(parent))
    except (pynvml.NVMLError, AttributeError) as e:
        raise MeterUnavailableError(
            "nvml",
            f"CUDA_VISIBLE_DEVICES names MIG instance {entry}, and NVML cannot find the GPU "
            f"holding it ({e}); name the whole GPU to measure it",
        ) from e
    for index, uuid in enumerate(uuids):
        if uuid.lower() == parent_uuid.lower():
            return index
    raise MeterUnavailableError(
        "nvml", f"MIG instance {entry} is on GPU {parent_uuid}, which NVML does not list"
    )


def _visible_gpus(pynvml: Any) -> list[_Visible]:
    """The GPUs this process sees; raises MeterUnavailableError for none."""
    count = int(pynvml.nvmlDeviceGetCount())
    if count == 0:
        raise MeterUnavailableError("nvml", "no NVIDIA GPU visible")
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    uuids = [
        _text(pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(i))) for i in range(count)
    ]
    visible = _parse_visible(env, uuids, lambda entry: _mig_parent_index(pynvml, entry, uuids))
    if not visible:
        raise MeterUnavailableError(
            "nvml", f"no NVIDIA GPU visible (CUDA_VISIBLE_DEVICES={env!r} hides all {count})"
        )
    return visible


def _power_limit_w(pynvml: Any, handle: Any) -> float | None:
    for function in ("nvmlDeviceGetEnforcedPowerLimit", "nvmlDeviceGetPowerManagementLimit"):
        try:
            return float(getattr(pynvml, function)(handle)) / 1000.0
        except (pynvml.NVMLError, AttributeError):
            continue
    return None


def _memory_total_mb(pynvml: Any, handle: Any) -> float | None:
    try:
        return float(pynvml.nvmlDeviceGetMemoryInfo(handle).total) / 2**20
    except (pynvml.NVMLError, AttributeError):
        return None


def _driver_version(pynvml: Any) -> str | None:
    try:
        return _text(pynvml.nvmlSystemGetDriverVersion())
    except (pynvml.NVMLError, AttributeError):
        return None


def _clock_event_reasons(pynvml: Any, handle: Any) -> tuple[str, ...]:
    """Decoded clock event reasons; () where neither the new nor the old query answers."""
    for function in (
        "nvmlDeviceGetCurrentClocksEventReasons",
        "nvmlDeviceGetCurrentClocksThrottleReasons",
    ):
        try:
            return decode_clock_event_reasons(int(getattr(pynvml, function)(handle)))
        except (pynvml.NVMLError, AttributeError):
            continue
    return ()


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


def _device_state(pynvml: Any, handle: Any) -> DeviceState:
    """A GPU's temperature, clocks, enforced power limit and clock event reasons, now."""
    temperature = _optional(
        pynvml, lambda: pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)
    )
    sm_clock = _optional(
        pynvml, lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM)
    )
    memory_clock = _optional(
        pynvml, lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM)
    )
    return DeviceState(
        temperature_c=_float_or_none(temperature),
        sm_clock_mhz=_float_or_none(sm_clock),
        memory_clock_mhz=_float_or_none(memory_clock),
        power_limit_w=_power_limit_w(pynvml, handle),
        throttle_reasons=_clock_event_reasons(pynvml, handle),
    )


def _mig_enabled(pynvml: Any, handle: Any) -> bool:
    modes = _optional(pynvml, lambda: pynvml.nvmlDeviceGetMigMode(handle))
    if not modes:
        return False
    return int(modes[0]) == int(getattr(pynvml, "NVML_DEVICE_MIG_ENABLE", 1))


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


def _read_watts(pynvml: Any, device: _Device) -> float:
    """One power sample of ``device`` in watts, by its chosen method."""
    if device.power_method == _FIELD_METHOD:
        return _field_milliwatts(pynvml, device.handle) / 1000.0
    return float(pynvml.nvmlDeviceGetPowerUsage(device.handle)) / 1000.0


def _choose_power_method(pynvml: Any, device: _Device) -> None:
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


def _usage_averaging(pynvml: Any, device: _Device) -> tuple[float | None, str | None]:
    """Whether ``nvmlDeviceGetPowerUsage`` is a trailing average on this GPU, and a note.

    ``nvml.h``: on Ampere (except GA100) and newer it is power averaged over one second; on
    GA100 and older architectures it is instantaneous.
    """
    arch = _optional(pynvml, lambda: pynvml.nvmlDeviceGetArchitecture(device.handle))
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


def _read_cost_s(pynvml: Any, device: _Device) -> float:
    """The median wall time of one power read."""
    costs = []
    for _ in range(_COST_READS):
        began = time.perf_counter()
        _read_watts(pynvml, device)
        costs.append(time.perf_counter() - began)
    return statistics.median(costs)


def nvml_gpus() -> tuple[list[NvmlGpu], str | None]:
    """Describe the GPUs this process can see, for the run record's machine section.

    Never raises: where NVML cannot answer, the list is empty and the reason says why. A MIG
    instance named in ``CUDA_VISIBLE_DEVICES`` is described by its parent GPU.

    Returns:
        The visible GPUs (respecting ``CUDA_VISIBLE_DEVICES``) and None, or ``[]`` and a reason.
    """
    try:
        pynvml = _import_pynvml()
    except MeterUnavailableError as e:
        return [], e.reason
    try:
        pynvml.nvmlInit()
    except Exception as e:  # any failure here means "no GPU information", never a crash
        return [], _init_reason(pynvml, e)
    try:
        driver = _driver_version(pynvml)
        gpus = []
        for index, visible in enumerate(_visible_gpus(pynvml)):
            handle = pynvml.nvmlDeviceGetHandleByIndex(visible.nvml_index)
            gpus.append(
                NvmlGpu(
                    index=index,
                    name=_text(pynvml.nvmlDeviceGetName(handle)),
                    uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
                    driver=driver,
                    power_limit_w=_power_limit_w(pynvml, handle),
                    memory_total_mb=_memory_total_mb(pynvml, handle),
                )
            )
        return gpus, None
    except MeterUnavailableError as e:
        return [], e.reason
    except Exception as e:
        return [], f"NVML failed while listing GPUs: {e}"
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            logger.debug("nvmlShutdown failed after listing GPUs", exc_info=True)


# The update-period probe ----------------------------------------------------------------------


def _counter_change_times(
    pynvml: Any, devices: Sequence[_Device], budget_s: float, max_s: float
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


def _probe_update_periods(
    pynvml: Any, devices: Sequence[_Device], budget_s: float, max_s: float
) -> MeterResolution:
    """Measure each counter's update period (median interval between changes).

    A counter that changed fewer than twice in the whole poll is at least about as slow as
    the poll was long, so the poll's length is assumed for it (never the nominal 0.1 s).
    """
    counters = [d for d in devices if d.method == _COUNTER]
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
class _Samples:
    """Power samples of a window: times (``perf_counter``) and watts per sampled device."""

    times: list[float] = field(default_factory=list)
    watts: list[list[float]] = field(default_factory=list)
    error: BaseException | None = None


def _sampled_energy(device: _Device, times_s: Sequence[float], watts: Sequence[float]) -> float:
    if device.power_average_s is None:
        return integrate_power(times_s, watts)
    return averaged_power_energy(times_s, watts, average_s=device.power_average_s)


class _PowerSampler:
    """Samples the power of some GPUs in a daemon thread, on a fixed schedule."""

    def __init__(self, pynvml: Any, devices: Sequence[_Device], period_s: float) -> None:
        self._pynvml = pynvml
        self._devices = list(devices)
        self._period_s = period_s
        self._samples = _Samples()
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

    def finish(self) -> _Samples:
        """Stop, take a last sample and return every sample (with the error, if one came)."""
        self.cancel()
        if self._samples.error is None:
            try:
                self._sample()
            except Exception as e:  # reported to the caller in the samples
                self._samples.error = e
        return self._samples


# The meter ------------------------------------------------------------------------------------


class NvmlMeter:
    """GPU energy from NVML: the driver's energy counter, or integrated power where it is absent.

    Construction measures the counters' update period (polling them for at most
    ``update_period_probe_s``, typically ~0.35 s at a 0.1 s period, and up to
    ``update_period_probe_max_s`` for a counter that has not changed twice by then) and the cost
    of a power read.

    Args:
        gpu_indices: GPUs to measure, as indices the process sees (after
            ``CUDA_VISIBLE_DEVICES``); None measures every visible GPU.
        poll_period_s: Power sampling period; None derives it (see ``sample_period_s``).
        update_period_probe_s: How long to poll the counters at construction.
        update_period_probe_max_s: The longest to poll a counter that is slower than that.

    Raises:
        MeterUnavailableError: NVML or a GPU is missing, a GPU offers neither energy nor power,
            or a MIG instance's parent GPU cannot be found.
        ConfigurationError: ``gpu_indices`` is empty.
    """

    name = "nvml"

    def __init__(
        self,
        gpu_indices: Sequence[int] | None = None,
        *,
        poll_period_s: float | None = None,
        update_period_probe_s: float = UPDATE_PERIOD_PROBE_S,
        update_period_probe_max_s: float = UPDATE_PERIOD_PROBE_MAX_S,
    ) -> None:
        self._pynvml = _import_pynvml()
        try:
            self._pynvml.nvmlInit()
        except Exception as e:
            raise MeterUnavailableError("nvml", _init_reason(self._pynvml, e)) from e
        self._closed = False
        self._window_start: float | None = None
        self._counters_mj: dict[str, int] = {}
        self._sampler: _PowerSampler | None = None
        self._sampler_note: str | None = None
        self._start_states: dict[str, DeviceState] = {}
        try:
            self._driver = _driver_version(self._pynvml)
            self._devices = self._open_devices(gpu_indices)
            self._resolution = _probe_update_periods(
                self._pynvml,
                self._devices,
                update_period_probe_s,
                max(update_period_probe_s, update_period_probe_max_s),
            )
            self._sampled = [d for d in self._devices if d.power_method is not None]
            self._sample_period_s = poll_period_s or sample_period_s(
                self._resolution.update_period_s or COUNTER_UPDATE_PERIOD_S,
                math.fsum(d.power_cost_s for d in self._sampled),
            )
        except BaseException:
            self.close()
            raise

    def _open_devices(self, gpu_indices: Sequence[int] | None) -> list[_Device]:
        pynvml = self._pynvml
        try:
            visible = _visible_gpus(pynvml)
        except pynvml.NVMLError as e:
            raise MeterUnavailableError("nvml", f"NVML failed while listing GPUs: {e}") from e
        wanted = (
            list(range(len(visible))) if gpu_indices is None else list(dict.fromkeys(gpu_indices))
        )
        if not wanted:
            raise ConfigurationError("nvml: gpu_indices is empty; give None to measure every GPU")
        devices = []
        for index in wanted:
            if not 0 <= index < len(visible):
                raise MeterUnavailableError(
                    "nvml", f"GPU index {index} requested but {len(visible)} GPU(s) visible"
                )
            devices.append(self._open_device(f"gpu{index}", visible[index]))
        return devices

    def _open_device(self, label: str, visible: _Visible) -> _Device:
        pynvml = self._pynvml
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(visible.nvml_index)
            name = _text(pynvml.nvmlDeviceGetName(handle))
            uuid = _text(pynvml.nvmlDeviceGetUUID(handle))
        except pynvml.NVMLError as e:
            raise MeterUnavailableError("nvml", f"{label}: NVML cannot open the device: {e}") from e
        device = _Device(label, visible.nvml_index, handle, name, uuid, _COUNTER)
        device.mig_note = self._mig_note(device, visible.mig)
        try:
            pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        except (pynvml.NVMLError, AttributeError) as e:
            if not _is_unsupported(pynvml, e):
                raise MeterUnavailableError(
                    "nvml", f"{label}: reading the energy counter failed: {e}"
                ) from e
            device.method, device.why_power = _POWER, f"energy counter not supported ({e})"
        _choose_power_method(pynvml, device)
        if device.method == _POWER:
            if device.power_method is None:
                raise MeterUnavailableError(
                    "nvml",
                    f"{label}: neither the energy counter nor power is available: "
                    f"{device.why_no_power}",
                )
            logger.info("nvml: %s has no energy counter; integrating its power instead", label)
        return device

    def _mig_note(self, device: _Device, mig: str | None) -> str | None:
        if mig is not None:
            note = (
                f"MIG instance {mig} measured at its parent GPU {device.uuid}: the energy "
                "includes every instance on that GPU"
            )
        elif _mig_enabled(self._pynvml, device.handle):
            note = (
                f"MIG mode is enabled on {device.uuid}: the energy includes every MIG instance "
                "on that GPU"
            )
        else:
            return None
        logger.warning("nvml: %s: %s", device.label, note)
        return note

    def info(self) -> MeterInfo:
        """What this meter covers: the GPU domain, measured, per device, and how finely."""
        details: dict[str, str] = {}
        for d in self._devices:
            details[f"{d.label}.method"] = d.method + (f" ({d.why_power})" if d.why_power else "")
            details[f"{d.label}.power_samples"] = d.power_method or f"none ({d.why_no_power})"
            if d.power_average_note:
                details[f"{d.label}.power_average"] = d.power_average_note
            if d.update_period_s is not None:
                details[f"{d.label}.update_period_s"] = f"{d.update_period_s:.4f}"
                details[f"{d.label}.update_intervals_s"] = ", ".join(
                    f"{interval:.4f}" for interval in d.update_intervals
                )
            if d.mig_note:
                details[f"{d.label}.mig"] = d.mig_note
        details["driver_version"] = self._driver or "unknown"
        details["index_order"] = (
            "CUDA_VISIBLE_DEVICES integers are taken in NVML (PCI bus) order, CUDA's order "
            "under CUDA_DEVICE_ORDER=PCI_BUS_ID"
        )
        if self._sampled:
            details["power_sample_period_s"] = f"{self._sample_period_s:g}"
            details["power_read_cost_s"] = (
                f"{math.fsum(d.power_cost_s for d in self._sampled):.2e} per round of reads"
            )
        return MeterInfo(
            name=self.name,
            domains=("gpu",),
            sources={"gpu": "measured"},
            resolution=self._resolution,
            devices=tuple(
                f"{d.label}: {d.name} (nvml index {d.nvml_index}, {d.uuid})" for d in self._devices
            ),
            details=details,
        )

    def device_states(self) -> dict[str, DeviceState]:
        """Each measured GPU's temperature, clocks, power limit and clock event reasons, now.

        A query a GPU does not support leaves its field None (the reasons empty).
        """
        if self._closed:
            raise EnergyMeterError("nvml: the meter is closed")
        return {d.label: _device_state(self._pynvml, d.handle) for d in self._devices}

    def running_processes(
        self,
    ) -> dict[str, list[tuple[int, float | None]] | ProcessesUnknown]:
        """Per GPU label, the ``(pid, used GPU memory in MiB or None)`` of its compute processes.

        A GPU that cannot list its processes (an old driver, a MIG-enabled GPU asked by an
        unprivileged user) gets :class:`ProcessesUnknown` with the reason; an empty list means
        none run.
        """
        if self._closed:
            raise EnergyMeterError("nvml: the meter is closed")
        running: dict[str, list[tuple[int, float | None]] | ProcessesUnknown] = {}
        for device in self._devices:
            processes = _compute_processes(self._pynvml, device.handle)
            if isinstance(processes, ProcessesUnknown):
                logger.info("nvml: %s %s", device.label, processes.reason)
                running[device.label] = processes
                continue
            running[device.label] = [
                (int(p.pid), None if p.usedGpuMemory is None else float(p.usedGpuMemory) / 2**20)
                for p in processes
            ]
        return running

    def _read_counters(self) -> dict[str, int]:
        readings = {}
        for device in self._devices:
            if device.method != _COUNTER:
                continue
            try:
                readings[device.label] = int(
                    self._pynvml.nvmlDeviceGetTotalEnergyConsumption(device.handle)
                )
            except self._pynvml.NVMLError as e:
                raise EnergyMeterError(
                    f"nvml: reading the energy counter of {device.label} failed: {e}"
                ) from e
        return readings

    def start(self) -> None:
        """Open a window: record device states, read the counters and start sampling power."""
        if self._closed:
            raise EnergyMeterError("nvml: the meter is closed")
        if self._window_start is not None:
            raise EnergyMeterError("nvml: a window is already open")
        self._start_states = self.device_states()
        self._counters_mj = self._read_counters()
        self._sampler, self._sampler_note = None, None
        window_start = time.perf_counter()
        if self._sampled:
            sampler = _PowerSampler(self._pynvml, self._sampled, self._sample_period_s)
            try:
                sampler.start()
                self._sampler = sampler
            except Exception as e:
                if any(d.method == _POWER for d in self._devices):
                    raise EnergyMeterError(f"nvml: reading GPU power failed: {e}") from e
                self._sampler_note = f"no power timeline: reading power failed at start ({e})"
        self._window_start = window_start

    def stop(self) -> EnergyReading:
        """Close the window and return the GPU energy over it, its power timeline and states.

        Raises:
            EnergyMeterError: No window is open, a counter read failed or went backwards, or
                sampling the power of a GPU without an energy counter failed.
        """
        if self._window_start is None:
            raise EnergyMeterError("nvml: stop() without start()")
        window_start, self._window_start = self._window_start, None
        sampler, self._sampler = self._sampler, None
        samples = sampler.finish() if sampler is not None else None
        duration_s = time.perf_counter() - window_start
        end = self._read_counters()
        energy = self._counter_energy(end)
        notes = [self._sampler_note] if self._sampler_note else []
        timelines: tuple[PowerTimeline, ...] = ()
        cross_check: dict[str, float] = {}
        if samples is not None:
            integrated = self._integrate(samples, notes)
            energy.update(
                {d.label: integrated[d.label] for d in self._devices if d.method == _POWER}
            )
            if integrated:
                timelines = self._timelines(samples, window_start)
                cross_check = self._cross_check(energy, integrated)
        return EnergyReading(
            meter=self.name,
            duration_s=duration_s,
            domains={"gpu": self._gpu_reading(energy, duration_s)},
            notes=tuple(notes),
            timelines=timelines,
            cross_check=cross_check,
            start_states=self._start_states,
            end_states=self.device_states(),
        )

    def _counter_energy(self, end: dict[str, int]) -> dict[str, float]:
        energy: dict[str, float] = {}
        for label, start_mj in self._counters_mj.items():
            if end[label] < start_mj:
                raise EnergyMeterError(
                    f"nvml: the energy counter of {label} went backwards "
                    f"({start_mj} mJ -> {end[label]} mJ; driver reload or counter reset)"
                )
            energy[label] = (end[label] - start_mj) / 1000.0
        return energy

    def _integrate(self, samples: _Samples, notes: list[str]) -> dict[str, float]:
        """Joules per sampled GPU; {} (with a note) when sampling failed on counter GPUs only.

        Raises:
            EnergyMeterError: Sampling failed and a GPU without a counter depended on it.
        """
        power_only = [d.label for d in self._devices if d.method == _POWER]
        if samples.error is not None:
            if power_only:
                raise EnergyMeterError(
                    f"nvml: reading GPU power failed: {samples.error}"
                ) from samples.error
            notes.append(f"no power timeline: reading power failed mid-window ({samples.error})")
            return {}
        integrated = {
            d.label: _sampled_energy(d, samples.times, [row[i] for row in samples.watts])
            for i, d in enumerate(self._sampled)
        }
        notes.extend(
            f"{d.label}: {d.power_average_note}" for d in self._sampled if d.power_average_note
        )
        if power_only:
            notes.append(
                f"{', '.join(power_only)}: energy is power integration ({len(samples.times)} "
                f"samples every {self._sample_period_s:g} s; energy counter not supported)"
            )
        return integrated

    def _timelines(self, samples: _Samples, window_start: float) -> tuple[PowerTimeline, ...]:
        """The GPU domain's summed power over the window, if every GPU was sampled."""
        if len(self._sampled) != len(self._devices) or len(samples.times) < 2:
            return ()
        times, watts = downsample_power(
            [max(0.0, t - window_start) for t in samples.times],
            [math.fsum(row) for row in samples.watts],
        )
        methods = sorted({d.power_method for d in self._sampled if d.power_method})
        return (
            PowerTimeline(
                domain="gpu",
                times_s=times,
                watts=watts,
                method=", ".join(methods),
                period_s=self._sample_period_s,
                samples=len(samples.times),
            ),
        )

    def _cross_check(
        self, energy: dict[str, float], integrated: dict[str, float]
    ) -> dict[str, float]:
        """``counter_vs_power_diff`` over the GPUs that have both a counter and samples."""
        counters = [d.label for d in self._devices if d.method == _COUNTER]
        if not counters or any(label not in integrated or energy[label] <= 0 for label in counters):
            return {}
        power_j = math.fsum(integrated[label] for label in counters)
        if power_j <= 0:
            return {}
        counter_j = math.fsum(energy[label] for label in counters)
        return {"gpu": (counter_j - power_j) / power_j}

    @property
    def reads_mid_window(self) -> bool:
        """Whether ``lap()`` works: every measured GPU has an energy counter (power-integrated
        energy is only known when the window closes)."""
        return all(d.method == _COUNTER for d in self._devices)

    def lap(self) -> EnergyReading:
        """The energy since ``start()``, leaving the window open (a counter read per GPU).

        The lap carries no timeline (the samples stay with the window until ``stop()``).

        Raises:
            EnergyMeterError: no window is open, or a GPU has no energy counter (its power is
                integrated only when the window closes).
        """
        if self._window_start is None:
            raise EnergyMeterError("nvml: lap() without start()")
        if not self.reads_mid_window:
            raise EnergyMeterError("nvml: reading mid-window needs the energy counter on every GPU")
        duration_s = time.perf_counter() - self._window_start
        energy = self._counter_energy(self._read_counters())
        return EnergyReading(
            meter=self.name,
            duration_s=duration_s,
            domains={"gpu": self._gpu_reading(energy, duration_s)},
        )

    def _gpu_reading(self, energy: dict[str, float], duration_s: float) -> DomainReading:
        """Sum the devices; any device without energy makes the domain not measured."""
        devices = {d.label: energy[d.label] for d in self._devices if energy[d.label] > 0}
        missing = [d for d in self._devices if d.label not in devices]
        if not missing:
            return DomainReading("gpu", math.fsum(devices.values()), "measured", devices=devices)
        period = self._resolution.update_period_s or COUNTER_UPDATE_PERIOD_S
        why = "; ".join(
            f"{d.label}: energy counter did not advance over the {duration_s:.3f} s window "
            f"(shorter than its ~{period:.3g} s update period?)"
            if d.method == _COUNTER
            else f"{d.label}: reported 0 W over the window"
            for d in missing
        )
        still = tuple(d.label for d in missing if d.method == _COUNTER)
        return DomainReading(
            "gpu", None, "measured", reason=why, devices=devices, not_advanced=still
        )

    def close(self) -> None:
        """Stop any sampling (joining its thread) and shut NVML down (once)."""
        if self._closed:
            return
        self._closed = True
        sampler, self._sampler = self._sampler, None
        if sampler is not None:
            sampler.cancel()
        self._window_start = None
        try:
            self._pynvml.nvmlShutdown()
        except Exception:
            logger.warning("nvml: nvmlShutdown failed", exc_info=True)

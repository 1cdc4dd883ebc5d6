"""NVML device discovery and queries: which GPUs this process sees, and what each can say.

``CUDA_VISIBLE_DEVICES`` is mapped to NVML indices by CUDA's rules (indices, UUID prefixes, MIG
instances measured at their parent GPU); the queries read a GPU's state (temperature, clocks,
power limit, clock event reasons), its memory and its compute processes, answering None (or
:class:`ProcessesUnknown`) where the GPU, the driver or this nvidia-ml-py cannot. pynvml is
imported here, lazily, and only here.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pytest_llem.exceptions import MeterUnavailableError
from pytest_llem.meters.base import DeviceState, ProcessesUnknown

__all__ = [
    "VisibleGpu",
    "compute_processes",
    "cuda_driver_version",
    "decode_clock_event_reasons",
    "device_state",
    "driver_version",
    "import_pynvml",
    "init_failure_reason",
    "is_unsupported",
    "memory_total_mb",
    "mig_enabled",
    "nvml_text",
    "optional_query",
    "parse_cuda_visible_devices",
    "power_limit_w",
    "setting_query",
    "visible_gpus",
]

logger = logging.getLogger("pytest_llem")

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
class VisibleGpu:
    """A GPU the process sees: its NVML index and, if named so, the MIG instance used on it."""

    nvml_index: int
    mig: str | None = None


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
) -> list[VisibleGpu]:
    if value is None:
        return [VisibleGpu(i) for i in range(len(uuids))]
    visible: list[VisibleGpu] = []
    for raw in value.split(","):
        entry = raw.strip()
        if entry.upper().startswith("MIG-"):
            if mig_parent is None:
                raise MeterUnavailableError(
                    "nvml",
                    f"CUDA_VISIBLE_DEVICES names a MIG instance ({entry}) and no way to find "
                    "its parent GPU was given",
                )
            found: VisibleGpu | None = VisibleGpu(mig_parent(entry), entry)
        else:
            index = _match_entry(entry, uuids)
            found = None if index is None else VisibleGpu(index)
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


def import_pynvml() -> Any:
    try:
        return importlib.import_module("pynvml")
    except ImportError as e:
        raise MeterUnavailableError(
            "nvml", "nvidia-ml-py is not installed (pip install nvidia-ml-py)"
        ) from e


def init_failure_reason(pynvml: Any, error: Exception) -> str:
    """Words for why ``nvmlInit`` failed."""
    if isinstance(error, getattr(pynvml, "NVMLError_LibraryNotFound", ())):
        return "NVML library not found (no NVIDIA driver)"
    if isinstance(error, getattr(pynvml, "NVMLError_DriverNotLoaded", ())):
        return "NVIDIA driver not loaded"
    return f"NVML failed to initialise: {error}"


def nvml_text(value: Any) -> str:
    """NVML strings are ``str`` in nvidia-ml-py but ``bytes`` in old releases."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def is_unsupported(pynvml: Any, error: Exception) -> bool:
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


def optional_query(pynvml: Any, query: Callable[[], Any]) -> Any | None:
    """The query's answer, or None where NVML or this pynvml cannot give it."""
    try:
        return query()
    except _query_errors(pynvml) as e:
        logger.debug("nvml: optional query failed: %s", e)
        return None


def compute_processes(pynvml: Any, handle: Any) -> list[Any] | ProcessesUnknown:
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
            parent_uuid = nvml_text(pynvml.nvmlDeviceGetUUID(parent))
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


def visible_gpus(pynvml: Any) -> list[VisibleGpu]:
    """The GPUs this process sees; raises MeterUnavailableError for none."""
    count = int(pynvml.nvmlDeviceGetCount())
    if count == 0:
        raise MeterUnavailableError("nvml", "no NVIDIA GPU visible")
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    uuids = [
        nvml_text(pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(i)))
        for i in range(count)
    ]
    visible = _parse_visible(env, uuids, lambda entry: _mig_parent_index(pynvml, entry, uuids))
    if not visible:
        raise MeterUnavailableError(
            "nvml", f"no NVIDIA GPU visible (CUDA_VISIBLE_DEVICES={env!r} hides all {count})"
        )
    return visible


def power_limit_w(pynvml: Any, handle: Any) -> float | None:
    for function in ("nvmlDeviceGetEnforcedPowerLimit", "nvmlDeviceGetPowerManagementLimit"):
        try:
            return float(getattr(pynvml, function)(handle)) / 1000.0
        except (pynvml.NVMLError, AttributeError):
            continue
    return None


def cuda_driver_version(pynvml: Any) -> str | None:
    """The CUDA version the driver supports, ``"12.8"`` (NVML answers ``12080``)."""
    try:
        version = int(pynvml.nvmlSystemGetCudaDriverVersion())
    except (pynvml.NVMLError, AttributeError):
        return None
    return f"{version // 1000}.{version % 1000 // 10}"


def setting_query(pynvml: Any, query: Callable[[], Any]) -> tuple[Any, str | None]:
    """A setting's raw answer and None, or None and why NVML could not give it (a GPU that
    lacks the feature, an nvidia-ml-py without the call, or the error)."""
    try:
        return query(), None
    except _query_errors(pynvml) as e:
        if isinstance(e, AttributeError):
            return None, "not in this nvidia-ml-py"
        if isinstance(e, Exception) and is_unsupported(pynvml, e):
            return None, "not supported on this GPU or driver"
        return None, f"NVML error: {e}"


def memory_total_mb(pynvml: Any, handle: Any) -> float | None:
    try:
        return float(pynvml.nvmlDeviceGetMemoryInfo(handle).total) / 2**20
    except (pynvml.NVMLError, AttributeError):
        return None


def driver_version(pynvml: Any) -> str | None:
    try:
        return nvml_text(pynvml.nvmlSystemGetDriverVersion())
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


def device_state(pynvml: Any, handle: Any) -> DeviceState:
    """A GPU's temperature, clocks, enforced power limit and clock event reasons, now."""
    temperature = optional_query(
        pynvml, lambda: pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)
    )
    sm_clock = optional_query(
        pynvml, lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM)
    )
    memory_clock = optional_query(
        pynvml, lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM)
    )
    return DeviceState(
        temperature_c=_float_or_none(temperature),
        sm_clock_mhz=_float_or_none(sm_clock),
        memory_clock_mhz=_float_or_none(memory_clock),
        power_limit_w=power_limit_w(pynvml, handle),
        throttle_reasons=_clock_event_reasons(pynvml, handle),
    )


def mig_enabled(pynvml: Any, handle: Any) -> bool:
    modes = optional_query(pynvml, lambda: pynvml.nvmlDeviceGetMigMode(handle))
    if not modes:
        return False
    return int(modes[0]) == int(getattr(pynvml, "NVML_DEVICE_MIG_ENABLE", 1))

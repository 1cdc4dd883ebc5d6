"""An honest fake of the ``pynvml`` module (nvidia-ml-py) for tests on machines without a GPU.

Each fake GPU has an energy counter in millijoules that advances in steps of
``counter_step_s`` (100 ms, as on an H100; or irregular steps cycling through
``counter_steps_s``) at its configured power, on the real clock (``time.perf_counter``), so the
energy of a window is power x elapsed time quantised to a step. ``FakeNvml.add_energy`` moves a
counter by hand (for exact expectations), and ``power_reading_w`` makes the power queries
answer other than the power the counter counts (a sensor that reads low, say).
Power (``nvmlDeviceGetPowerUsage`` and the ``NVML_FI_DEV_POWER_INSTANT`` field, returned in a
ctypes structure shaped like pynvml's ``c_nvmlFieldValue_t``), temperature, clocks, clock event
reasons, compute processes and MIG follow pynvml's names, units and return shapes. Any query can
be made unsupported per GPU (``FakeGpu.unsupported``) or missing from the module
(``install(..., missing=...)``, as in an old nvidia-ml-py). ``install(monkeypatch, ...)`` puts
the fake into ``sys.modules["pynvml"]``.

As in nvidia-ml-py and ``nvml.h``: on Ampere (but GA100) and newer GPUs
``nvmlDeviceGetPowerUsage`` (and the ``NVML_FI_DEV_POWER_AVERAGE`` field) answer the power
averaged over the last second, the instant field the power now; a function the driver's NVML
lacks (``install(..., driver_lacks=...)``) raises ``NVMLError_FunctionNotFound``, which the
unversioned process listing turns into ``NVMLLibraryMismatchError`` (a plain ``Exception``);
an unprivileged process (the default) asking a MIG-enabled GPU for its processes gets
``NVMLError_NoPermission``.
"""

from __future__ import annotations

import ctypes
import math
import re
import sys
import threading
import time
import types
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest

__all__ = [
    "NVML_CLOCK_MEM",
    "NVML_CLOCK_SM",
    "NVML_DEVICE_ARCH_AMPERE",
    "NVML_DEVICE_ARCH_HOPPER",
    "NVML_DEVICE_ARCH_VOLTA",
    "NVML_FEATURE_DISABLED",
    "NVML_FEATURE_ENABLED",
    "NVML_FI_DEV_POWER_AVERAGE",
    "NVML_FI_DEV_POWER_INSTANT",
    "NVML_TEMPERATURE_GPU",
    "NVML_VALUE_TYPE_DOUBLE",
    "NVML_VALUE_TYPE_UNSIGNED_INT",
    "FakeFieldValue",
    "FakeGpu",
    "FakeMemoryInfo",
    "FakeNvml",
    "FakeProcessInfo",
    "NVMLError",
    "NVMLError_DriverNotLoaded",
    "NVMLError_FunctionNotFound",
    "NVMLError_GpuIsLost",
    "NVMLError_InvalidArgument",
    "NVMLError_LibraryNotFound",
    "NVMLError_NoPermission",
    "NVMLError_NotFound",
    "NVMLError_NotSupported",
    "NVMLError_Uninitialized",
    "NVMLLibraryMismatchError",
    "install",
]

NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_GPU_IS_LOST = 15

NVML_TEMPERATURE_GPU = 0
NVML_CLOCK_SM = 1
NVML_CLOCK_MEM = 2
NVML_DEVICE_MIG_DISABLE = 0
NVML_DEVICE_MIG_ENABLE = 1
NVML_FEATURE_DISABLED = 0
NVML_FEATURE_ENABLED = 1
NVML_DEVICE_ARCH_VOLTA = 5
NVML_DEVICE_ARCH_TURING = 6
NVML_DEVICE_ARCH_AMPERE = 7
NVML_DEVICE_ARCH_ADA = 8
NVML_DEVICE_ARCH_HOPPER = 9
NVML_DEVICE_ARCH_BLACKWELL = 10
NVML_DEVICE_ARCH_UNKNOWN = 0xFFFFFFFF
NVML_FI_DEV_POWER_AVERAGE = 185
NVML_FI_DEV_POWER_INSTANT = 186

NVML_VALUE_TYPE_DOUBLE = 0
NVML_VALUE_TYPE_UNSIGNED_INT = 1
NVML_VALUE_TYPE_UNSIGNED_LONG = 2
NVML_VALUE_TYPE_UNSIGNED_LONG_LONG = 3
NVML_VALUE_TYPE_SIGNED_LONG_LONG = 4
NVML_VALUE_TYPE_SIGNED_INT = 5
NVML_VALUE_TYPE_UNSIGNED_SHORT = 6

#: Clock event (formerly "throttle") reason bits, under both of pynvml's spellings.
_REASON_BITS = {
    "GpuIdle": 0x1,
    "ApplicationsClocksSetting": 0x2,
    "SwPowerCap": 0x4,
    "HwSlowdown": 0x8,
    "SyncBoost": 0x10,
    "SwThermalSlowdown": 0x20,
    "HwThermalSlowdown": 0x40,
    "HwPowerBrakeSlowdown": 0x80,
    "DisplayClockSetting": 0x100,
}

_POWER_FIELDS = {
    NVML_FI_DEV_POWER_AVERAGE: "NVML_FI_DEV_POWER_AVERAGE",
    NVML_FI_DEV_POWER_INSTANT: "NVML_FI_DEV_POWER_INSTANT",
}
#: The window of the power average on Ampere and newer (``nvml.h``: "averaged over 1 sec").
POWER_AVERAGE_S = 1.0
#: GA100 boards: Ampere, yet ``nvmlDeviceGetPowerUsage`` answers instant power there.
_GA100 = re.compile(r"\b(A100X?|A30X?|A800|AX800|PG506)\b")


class NVMLLibraryMismatchError(Exception):
    """nvidia-ml-py's error for an unversioned call the driver's NVML lacks (not an NVMLError)."""


class NVMLError(Exception):
    """Base class of NVML errors; ``value`` is the NVML return code, as in pynvml."""

    value = 999
    text = "Unknown Error"

    def __str__(self) -> str:
        return self.text


class NVMLError_Uninitialized(NVMLError):
    """NVML was not initialised."""

    value = NVML_ERROR_UNINITIALIZED
    text = "Uninitialized"


class NVMLError_InvalidArgument(NVMLError):
    """A bad index or handle."""

    value = NVML_ERROR_INVALID_ARGUMENT
    text = "Invalid Argument"


class NVMLError_NotSupported(NVMLError):
    """The device does not support the query."""

    value = NVML_ERROR_NOT_SUPPORTED
    text = "Not Supported"


class NVMLError_NoPermission(NVMLError):
    """The caller lacks the privileges (a MIG-enabled GPU's processes, for a user)."""

    value = NVML_ERROR_NO_PERMISSION
    text = "Insufficient Permissions"


class NVMLError_NotFound(NVMLError):
    """No device matches (for example an unknown UUID)."""

    value = NVML_ERROR_NOT_FOUND
    text = "Not Found"


class NVMLError_DriverNotLoaded(NVMLError):
    """The NVIDIA driver is not loaded."""

    value = NVML_ERROR_DRIVER_NOT_LOADED
    text = "Driver Not Loaded"


class NVMLError_LibraryNotFound(NVMLError):
    """``libnvidia-ml.so.1`` could not be loaded."""

    value = NVML_ERROR_LIBRARY_NOT_FOUND
    text = "NVML Shared Library Not Found"


class NVMLError_FunctionNotFound(NVMLError):
    """The driver's NVML lacks the function."""

    value = NVML_ERROR_FUNCTION_NOT_FOUND
    text = "Function Not Found"


class NVMLError_GpuIsLost(NVMLError):
    """The GPU fell off the bus (every query on it fails)."""

    value = NVML_ERROR_GPU_IS_LOST
    text = "GPU is lost"


class FakeValue(ctypes.Union):
    """The value union of a field value (``c_nvmlValue_t`` in pynvml)."""

    _fields_ = [
        ("dVal", ctypes.c_double),
        ("uiVal", ctypes.c_uint),
        ("ulVal", ctypes.c_ulong),
        ("ullVal", ctypes.c_ulonglong),
        ("sllVal", ctypes.c_longlong),
        ("siVal", ctypes.c_int),
        ("usVal", ctypes.c_ushort),
    ]


class FakeFieldValue(ctypes.Structure):
    """One answer of ``nvmlDeviceGetFieldValues`` (``c_nvmlFieldValue_t`` in pynvml).

    ``nvmlReturn`` is the per-field status (0 = success; the call itself succeeds even when a
    field is not supported), ``timestamp`` is in microseconds since the epoch.
    """

    _fields_ = [
        ("fieldId", ctypes.c_uint32),
        ("scopeId", ctypes.c_uint32),
        ("timestamp", ctypes.c_int64),
        ("latencyUsec", ctypes.c_int64),
        ("valueType", ctypes.c_uint),
        ("nvmlReturn", ctypes.c_uint),
        ("value", FakeValue),
    ]


@dataclass(frozen=True)
class FakeMemoryInfo:
    """What ``nvmlDeviceGetMemoryInfo`` returns, in bytes."""

    total: int
    free: int
    used: int


@dataclass
class FakeProcessInfo:
    """One entry of ``nvmlDeviceGetComputeRunningProcesses`` (pynvml's friendly object).

    ``usedGpuMemory`` is in bytes, or None where the driver cannot say (as pynvml maps it).
    """

    pid: int
    usedGpuMemory: int | None
    gpuInstanceId: int = 0xFFFFFFFF
    computeInstanceId: int = 0xFFFFFFFF


@dataclass
class FakeGpu:
    """One fake GPU.

    ``power_w`` may be changed while a window is open (``FakeNvml.set_power``); the power
    queries answer ``power_reading_w`` where it is set, else ``power_w``. ``counter_steps_s``,
    where given, are the counter's successive update intervals (cycled) instead of the regular
    ``counter_step_s``; each update adds ``power_w`` x the interval that ended. ``lost`` makes
    every query on it fail with ``NVMLError_GpuIsLost``; ``unsupported`` names pynvml functions
    that answer ``NVMLError_NotSupported`` on this GPU (``"NVML_FI_DEV_POWER_INSTANT"`` makes
    that field answer not supported inside a successful ``nvmlDeviceGetFieldValues``).
    ``processes`` are ``(pid, used bytes or None)``; ``mig_devices`` are the UUIDs of the MIG
    instances on this GPU (meaningful with ``mig_mode=1``). ``architecture`` is an
    ``NVML_DEVICE_ARCH_*`` value; on Ampere and newer (but GA100, told by its name) power usage
    is the mean over the last :data:`POWER_AVERAGE_S`, following changes made with
    ``FakeNvml.set_power``. Power limits are in W here and answered in mW, as NVML does;
    application clocks in MHz; ``persistence_mode`` and ``ecc_mode`` are ``NVML_FEATURE_*``
    values (ECC answered as ``[current, pending]``).
    """

    name: str = "NVIDIA H100 80GB HBM3"
    uuid: str = "GPU-00000000-0000-0000-0000-000000000000"
    power_w: float = 200.0
    power_limit_w: float = 700.0
    default_power_limit_w: float = 700.0
    memory_total_mb: float = 81559.0
    energy_counter_supported: bool = True
    counter_step_s: float = 0.1
    counter_mj: int = 1_000_000
    lost: bool = False
    temperature_c: int = 41
    sm_clock_mhz: int = 1980
    memory_clock_mhz: int = 2619
    clock_reasons: int = 0x1
    application_sm_clock_mhz: int = 1755
    application_memory_clock_mhz: int = 2619
    persistence_mode: int = NVML_FEATURE_ENABLED
    ecc_mode: int = NVML_FEATURE_ENABLED
    processes: list[tuple[int, int | None]] = field(default_factory=list)
    mig_mode: int = NVML_DEVICE_MIG_DISABLE
    mig_devices: list[str] = field(default_factory=list)
    power_field_value_type: int = NVML_VALUE_TYPE_UNSIGNED_INT
    architecture: int = NVML_DEVICE_ARCH_HOPPER
    unsupported: set[str] = field(default_factory=set)
    counter_steps_s: tuple[float, ...] = ()
    power_reading_w: float | None = None
    _next_tick: float = field(default=0.0, repr=False)
    _ticks: int = field(default=0, repr=False)
    _power_history: list[tuple[float, float]] = field(default_factory=list, repr=False)

    @property
    def reported_power_w(self) -> float:
        """What the power queries answer, in watts."""
        return self.power_w if self.power_reading_w is None else self.power_reading_w

    def _step(self) -> float:
        if not self.counter_steps_s:
            return self.counter_step_s
        return self.counter_steps_s[self._ticks % len(self.counter_steps_s)]

    def start_clock(self, now: float) -> None:
        """Start the counter's update ticks at ``now``."""
        self._ticks = 0
        self._next_tick = now + self._step()
        self._power_history = [(-math.inf, self.reported_power_w)]

    @property
    def averages_power_usage(self) -> bool:
        """Whether ``nvmlDeviceGetPowerUsage`` is a 1 s mean here (Ampere and newer, not GA100)."""
        return (
            NVML_DEVICE_ARCH_AMPERE <= self.architecture < NVML_DEVICE_ARCH_UNKNOWN
            and not _GA100.search(self.name)
        )

    def record_power(self, now: float) -> None:
        """Note the current ``power_w`` as in force from ``now`` (for the average)."""
        if not self._power_history:
            self._power_history = [(-math.inf, self.reported_power_w)]
        elif self._power_history[-1][1] != self.reported_power_w:
            self._power_history.append((now, self.reported_power_w))

    def average_power_w(self, now: float, window_s: float = POWER_AVERAGE_S) -> float:
        """The mean power over ``[now - window_s, now]``."""
        self.record_power(now)  # a power_w set directly counts from now
        start, joules = now - window_s, 0.0
        changes = self._power_history
        for k, (since, watts) in enumerate(changes):
            until = changes[k + 1][0] if k + 1 < len(changes) else now
            joules += watts * max(0.0, min(until, now) - max(since, start))
        return joules / window_s

    def advance(self, now: float) -> None:
        """Apply every counter update due by ``now`` at the current power."""
        if now < self._next_tick:
            return
        if not self.counter_steps_s:
            ticks = math.floor((now - self._next_tick) / self.counter_step_s) + 1
            self.counter_mj += round(ticks * self.power_w * self.counter_step_s * 1000.0)
            self._next_tick += ticks * self.counter_step_s
            return
        while now >= self._next_tick:
            self.counter_mj += round(self.power_w * self._step() * 1000.0)
            self._ticks += 1
            self._next_tick += self._step()


class _Handle:
    """An opaque device handle, as pynvml's ``c_nvmlDevice_t``."""

    def __init__(self, index: int) -> None:
        self.index = index

    def __repr__(self) -> str:
        return f"<fake nvmlDevice {self.index}>"


class _MigHandle:
    """A MIG device handle: queries meant for a whole GPU are not supported on it."""

    def __init__(self, parent: int, uuid: str) -> None:
        self.parent = parent
        self.uuid = uuid

    def __repr__(self) -> str:
        return f"<fake MIG nvmlDevice {self.uuid} on {self.parent}>"


class FakeNvml:
    """The state behind the fake module: its GPUs, switches and call counts."""

    def __init__(
        self,
        gpus: list[FakeGpu],
        *,
        driver: str = "580.159.04",
        cuda_driver_version: int = 13000,
        library_found: bool = True,
        missing: Iterable[str] = (),
        driver_lacks: Iterable[str] = (),
        privileged: bool = False,
    ) -> None:
        self.gpus = gpus
        self.driver = driver
        self.cuda_driver_version = cuda_driver_version
        self.library_found = library_found
        self.missing = frozenset(missing)
        self.driver_lacks = frozenset(driver_lacks)
        self.privileged = privileged
        self.init_count = 0
        self.shutdown_count = 0
        self.power_calls = 0
        self.field_calls = 0
        self.energy_calls = 0
        self._lock = threading.Lock()
        now = time.perf_counter()
        for gpu in gpus:
            gpu.start_clock(now)

    @property
    def initialised(self) -> bool:
        """Whether nvmlInit was called more often than nvmlShutdown (pynvml's refcount)."""
        return self.init_count > self.shutdown_count

    def add_energy(self, index: int, millijoules: int) -> None:
        """Move a GPU's counter forward by hand, as the driver would after some work."""
        with self._lock:
            self.gpus[index].counter_mj += millijoules

    def set_power(self, index: int, watts: float) -> None:
        """Change a GPU's power from now on (updates already due use the old power)."""
        with self._lock:
            gpu = self.gpus[index]
            now = time.perf_counter()
            gpu.advance(now)
            gpu.record_power(now)
            gpu.power_w = watts
            gpu.record_power(now)

    # The pynvml API -----------------------------------------------------------------------

    def nvmlInit(self) -> None:
        if not self.library_found:
            raise NVMLError_LibraryNotFound()
        self.init_count += 1

    def nvmlShutdown(self) -> None:
        self._check()
        self.shutdown_count += 1

    def nvmlSystemGetDriverVersion(self) -> str:
        self._check()
        return self.driver

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        """The CUDA version the driver supports, as ``1000 * major + 10 * minor``."""
        self._check()
        return self.cuda_driver_version

    def nvmlDeviceGetCount(self) -> int:
        self._check()
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> _Handle:
        self._check()
        if not 0 <= index < len(self.gpus):
            raise NVMLError_InvalidArgument()
        return _Handle(index)

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> _Handle | _MigHandle:
        """A GPU's handle, or a MIG device's handle for a ``MIG-...`` UUID."""
        self._check()
        for index, gpu in enumerate(self.gpus):
            if gpu.uuid == uuid:
                return _Handle(index)
            if uuid in gpu.mig_devices:
                return _MigHandle(index, uuid)
        raise NVMLError_NotFound()

    def nvmlDeviceIsMigDeviceHandle(self, handle: _Handle | _MigHandle) -> int:
        self._check()
        return int(isinstance(handle, _MigHandle))

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, handle: _MigHandle) -> _Handle:
        self._check()
        if not isinstance(handle, _MigHandle):
            raise NVMLError_InvalidArgument()
        self._gpu(_Handle(handle.parent), "nvmlDeviceGetDeviceHandleFromMigDeviceHandle")
        return _Handle(handle.parent)

    def nvmlDeviceGetMigMode(self, handle: _Handle) -> list[int]:
        """``[current, pending]`` MIG mode."""
        gpu = self._gpu(handle, "nvmlDeviceGetMigMode")
        return [gpu.mig_mode, gpu.mig_mode]

    def nvmlDeviceGetName(self, handle: _Handle) -> str:
        return self._gpu(handle, "nvmlDeviceGetName").name

    def nvmlDeviceGetUUID(self, handle: _Handle | _MigHandle) -> str:
        if isinstance(handle, _MigHandle):
            self._check()
            return handle.uuid
        return self._gpu(handle, "nvmlDeviceGetUUID").uuid

    def nvmlDeviceGetPowerManagementLimit(self, handle: _Handle) -> int:
        return round(self._gpu(handle, "nvmlDeviceGetPowerManagementLimit").power_limit_w * 1000)

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: _Handle) -> int:
        return round(self._gpu(handle, "nvmlDeviceGetEnforcedPowerLimit").power_limit_w * 1000)

    def nvmlDeviceGetPowerManagementDefaultLimit(self, handle: _Handle) -> int:
        """The board's default power limit in milliwatts."""
        gpu = self._gpu(handle, "nvmlDeviceGetPowerManagementDefaultLimit")
        return round(gpu.default_power_limit_w * 1000)

    def nvmlDeviceGetPersistenceMode(self, handle: _Handle) -> int:
        """``NVML_FEATURE_ENABLED`` or ``NVML_FEATURE_DISABLED``."""
        return self._gpu(handle, "nvmlDeviceGetPersistenceMode").persistence_mode

    def nvmlDeviceGetEccMode(self, handle: _Handle) -> list[int]:
        """``[current, pending]`` ECC mode (``NVML_FEATURE_*``)."""
        gpu = self._gpu(handle, "nvmlDeviceGetEccMode")
        return [gpu.ecc_mode, gpu.ecc_mode]

    def nvmlDeviceGetApplicationsClock(self, handle: _Handle, clock_type: int) -> int:
        """The application clock of ``clock_type`` in MHz."""
        gpu = self._gpu(handle, "nvmlDeviceGetApplicationsClock")
        if clock_type == NVML_CLOCK_SM:
            return gpu.application_sm_clock_mhz
        if clock_type == NVML_CLOCK_MEM:
            return gpu.application_memory_clock_mhz
        raise NVMLError_InvalidArgument()

    def nvmlDeviceGetMemoryInfo(self, handle: _Handle) -> FakeMemoryInfo:
        total = round(self._gpu(handle, "nvmlDeviceGetMemoryInfo").memory_total_mb * 2**20)
        return FakeMemoryInfo(total=total, free=total, used=0)

    def nvmlDeviceGetPowerUsage(self, handle: _Handle) -> int:
        """Power in milliwatts: the last second's mean on Ampere and newer (but GA100)."""
        gpu = self._gpu(handle, "nvmlDeviceGetPowerUsage")
        self.power_calls += 1
        if gpu.averages_power_usage:
            with self._lock:
                return round(gpu.average_power_w(time.perf_counter()) * 1000)
        return round(gpu.reported_power_w * 1000)

    def nvmlDeviceGetArchitecture(self, handle: _Handle) -> int:
        """An ``NVML_DEVICE_ARCH_*`` value."""
        return self._gpu(handle, "nvmlDeviceGetArchitecture").architecture

    def nvmlDeviceGetFieldValues(self, handle: _Handle, field_ids: list[Any]) -> Any:
        """Field values as a ctypes array; power fields in milliwatts."""
        gpu = self._gpu(handle, "nvmlDeviceGetFieldValues")
        self.field_calls += 1
        values = (FakeFieldValue * len(field_ids))()
        for value, field_id in zip(values, field_ids, strict=True):
            value.fieldId, value.scopeId = (
                field_id if isinstance(field_id, tuple) else (field_id, 0)
            )
            value.timestamp = round(time.time() * 1e6)
            self._fill_field(gpu, value)
        return values

    def _fill_field(self, gpu: FakeGpu, value: FakeFieldValue) -> None:
        name = _POWER_FIELDS.get(value.fieldId)
        averaged = value.fieldId == NVML_FI_DEV_POWER_AVERAGE
        if (
            name is None
            or name in gpu.unsupported
            or (averaged and gpu.architecture < NVML_DEVICE_ARCH_AMPERE)
        ):
            value.nvmlReturn = NVML_ERROR_NOT_SUPPORTED
            return
        value.nvmlReturn = NVML_SUCCESS
        value.valueType = gpu.power_field_value_type
        if averaged:
            with self._lock:
                milliwatts = gpu.average_power_w(time.perf_counter()) * 1000
        else:
            milliwatts = gpu.reported_power_w * 1000
        if gpu.power_field_value_type == NVML_VALUE_TYPE_DOUBLE:
            value.value.dVal = milliwatts
        else:
            value.value.uiVal = round(milliwatts)

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: _Handle) -> int:
        """Energy since the driver loaded, in millijoules, updated every ``counter_step_s``."""
        gpu = self._gpu(handle, "nvmlDeviceGetTotalEnergyConsumption")
        if not gpu.energy_counter_supported:
            raise NVMLError_NotSupported()
        self.energy_calls += 1
        with self._lock:
            gpu.advance(time.perf_counter())
            return gpu.counter_mj

    def nvmlDeviceGetTemperature(self, handle: _Handle, sensor: int) -> int:
        """Degrees Celsius."""
        gpu = self._gpu(handle, "nvmlDeviceGetTemperature")
        if sensor != NVML_TEMPERATURE_GPU:
            raise NVMLError_InvalidArgument()
        return gpu.temperature_c

    def nvmlDeviceGetClockInfo(self, handle: _Handle, clock_type: int) -> int:
        """Current clock in MHz."""
        gpu = self._gpu(handle, "nvmlDeviceGetClockInfo")
        if clock_type == NVML_CLOCK_SM:
            return gpu.sm_clock_mhz
        if clock_type == NVML_CLOCK_MEM:
            return gpu.memory_clock_mhz
        raise NVMLError_InvalidArgument()

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: _Handle) -> int:
        return self._gpu(handle, "nvmlDeviceGetCurrentClocksEventReasons").clock_reasons

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: _Handle) -> int:
        return self._gpu(handle, "nvmlDeviceGetCurrentClocksThrottleReasons").clock_reasons

    def nvmlDeviceGetComputeRunningProcesses_v3(self, handle: _Handle) -> list[FakeProcessInfo]:
        return self._processes(handle, "nvmlDeviceGetComputeRunningProcesses_v3")

    def nvmlDeviceGetComputeRunningProcesses_v2(self, handle: _Handle) -> list[FakeProcessInfo]:
        return self._processes(handle, "nvmlDeviceGetComputeRunningProcesses_v2")

    def nvmlDeviceGetComputeRunningProcesses(self, handle: _Handle) -> list[FakeProcessInfo]:
        """The ``_v3`` call; a driver without it raises ``NVMLLibraryMismatchError``."""
        try:
            return self.nvmlDeviceGetComputeRunningProcesses_v3(handle)
        except NVMLError_FunctionNotFound:
            raise NVMLLibraryMismatchError(
                "the unversioned call needs a newer NVML than the driver's; call a versioned "
                "one, such as nvmlDeviceGetComputeRunningProcesses_v2"
            ) from None

    def _processes(self, handle: _Handle, function: str) -> list[FakeProcessInfo]:
        self._check()
        if function in self.driver_lacks:
            raise NVMLError_FunctionNotFound()
        gpu = self._gpu(handle, function)
        if "nvmlDeviceGetComputeRunningProcesses" in gpu.unsupported:
            raise NVMLError_NotSupported()
        if gpu.mig_mode == NVML_DEVICE_MIG_ENABLE and not self.privileged:
            raise NVMLError_NoPermission()
        return [FakeProcessInfo(pid, used) for pid, used in gpu.processes]

    def _check(self) -> None:
        if not self.initialised:
            raise NVMLError_Uninitialized()

    def _gpu(self, handle: Any, function: str) -> FakeGpu:
        self._check()
        if isinstance(handle, _MigHandle):
            raise NVMLError_NotSupported()
        if not isinstance(handle, _Handle) or not 0 <= handle.index < len(self.gpus):
            raise NVMLError_InvalidArgument()
        gpu = self.gpus[handle.index]
        if gpu.lost:
            raise NVMLError_GpuIsLost()
        if function in gpu.unsupported:
            raise NVMLError_NotSupported()
        return gpu

    def module(self) -> types.ModuleType:
        """A module object exposing this fake under pynvml's names (less ``missing`` ones)."""
        module = types.ModuleType("pynvml", "fake pynvml (tests/fakes/fake_pynvml.py)")
        for name in dir(self):
            if name.startswith("nvml"):
                setattr(module, name, getattr(self, name))
        constants: dict[str, Any] = {
            name: value
            for name, value in globals().items()
            if name.startswith(("NVML_", "NVMLError", "NVMLLibrary"))
        }
        for reason, bit in _REASON_BITS.items():
            constants[f"nvmlClocksEventReason{reason}"] = bit
            constants[f"nvmlClocksThrottleReason{reason}"] = bit
        for name, value in constants.items():
            setattr(module, name, value)
        for name in self.missing:
            if hasattr(module, name):
                delattr(module, name)
        module.fake = self  # type: ignore[attr-defined]
        return module


def install(
    monkeypatch: pytest.MonkeyPatch,
    gpus: list[FakeGpu] | None = None,
    *,
    library_found: bool = True,
    missing: Iterable[str] = (),
    driver_lacks: Iterable[str] = (),
    privileged: bool = False,
    driver: str = "580.159.04",
    cuda_driver_version: int = 13000,
) -> FakeNvml:
    """Install a fake pynvml into ``sys.modules`` for the test; one H100 at 200 W by default.

    Args:
        monkeypatch: The test's monkeypatch, which undoes the install afterwards.
        gpus: The fake GPUs; ``[]`` makes a driver with no device.
        library_found: False makes ``nvmlInit`` raise ``NVMLError_LibraryNotFound``.
        missing: Names (functions or constants) the module lacks, as in an old nvidia-ml-py.
        driver_lacks: Versioned functions the driver's NVML lacks (an older driver than the
            nvidia-ml-py), such as ``"nvmlDeviceGetComputeRunningProcesses_v3"``.
        privileged: Whether this process may list a MIG-enabled GPU's processes (root).
        driver: The driver version ``nvmlSystemGetDriverVersion`` answers.
        cuda_driver_version: What ``nvmlSystemGetCudaDriverVersion`` answers (13000: 13.0).

    Returns:
        The fake's state, to change power or switches and to count calls.
    """
    fake = FakeNvml(
        [FakeGpu()] if gpus is None else gpus,
        driver=driver,
        cuda_driver_version=cuda_driver_version,
        library_found=library_found,
        missing=missing,
        driver_lacks=driver_lacks,
        privileged=privileged,
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake.module())
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return fake

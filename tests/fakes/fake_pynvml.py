"""An honest fake of the ``pynvml`` module (nvidia-ml-py) for tests on machines without a GPU.

Each fake GPU has an energy counter in millijoules that advances in steps of
``counter_step_s`` (100 ms, as on an H100) at its configured power, on the real clock
(``time.perf_counter``), so the energy of a window is power x elapsed time quantised to a step.
``install(monkeypatch, ...)`` puts the fake into ``sys.modules["pynvml"]``.
"""

from __future__ import annotations

import math
import sys
import threading
import time
import types
from dataclasses import dataclass, field
from typing import Any

import pytest

__all__ = [
    "FakeGpu",
    "FakeMemoryInfo",
    "FakeNvml",
    "NVMLError",
    "NVMLError_DriverNotLoaded",
    "NVMLError_FunctionNotFound",
    "NVMLError_GpuIsLost",
    "NVMLError_InvalidArgument",
    "NVMLError_LibraryNotFound",
    "NVMLError_NotSupported",
    "NVMLError_Uninitialized",
    "install",
]

NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_GPU_IS_LOST = 15


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


@dataclass(frozen=True)
class FakeMemoryInfo:
    """What ``nvmlDeviceGetMemoryInfo`` returns, in bytes."""

    total: int
    free: int
    used: int


@dataclass
class FakeGpu:
    """One fake GPU. ``power_w`` may be changed while a window is open (``set_power``);
    ``lost`` makes every query on it fail with ``NVMLError_GpuIsLost``."""

    name: str = "NVIDIA H100 80GB HBM3"
    uuid: str = "GPU-00000000-0000-0000-0000-000000000000"
    power_w: float = 200.0
    power_limit_w: float = 700.0
    memory_total_mb: float = 81559.0
    energy_counter_supported: bool = True
    counter_step_s: float = 0.1
    counter_mj: int = 1_000_000
    lost: bool = False
    _next_tick: float = field(default=0.0, repr=False)

    def start_clock(self, now: float) -> None:
        """Start the counter's update ticks at ``now``."""
        self._next_tick = now + self.counter_step_s

    def advance(self, now: float) -> None:
        """Apply every counter update due by ``now`` at the current power."""
        if now < self._next_tick:
            return
        ticks = math.floor((now - self._next_tick) / self.counter_step_s) + 1
        self.counter_mj += round(ticks * self.power_w * self.counter_step_s * 1000.0)
        self._next_tick += ticks * self.counter_step_s


class _Handle:
    """An opaque device handle, as pynvml's ``c_nvmlDevice_t``."""

    def __init__(self, index: int) -> None:
        self.index = index

    def __repr__(self) -> str:
        return f"<fake nvmlDevice {self.index}>"


class FakeNvml:
    """The state behind the fake module: its GPUs, switches and call counts."""

    def __init__(
        self, gpus: list[FakeGpu], *, driver: str = "580.159.04", library_found: bool = True
    ) -> None:
        self.gpus = gpus
        self.driver = driver
        self.library_found = library_found
        self.init_count = 0
        self.shutdown_count = 0
        self.power_calls = 0
        self.energy_calls = 0
        self._lock = threading.Lock()
        now = time.perf_counter()
        for gpu in gpus:
            gpu.start_clock(now)

    @property
    def initialised(self) -> bool:
        """Whether nvmlInit was called more often than nvmlShutdown (pynvml's refcount)."""
        return self.init_count > self.shutdown_count

    def set_power(self, index: int, watts: float) -> None:
        """Change a GPU's power from now on (updates already due use the old power)."""
        with self._lock:
            gpu = self.gpus[index]
            gpu.advance(time.perf_counter())
            gpu.power_w = watts

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

    def nvmlDeviceGetCount(self) -> int:
        self._check()
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> _Handle:
        self._check()
        if not 0 <= index < len(self.gpus):
            raise NVMLError_InvalidArgument()
        return _Handle(index)

    def nvmlDeviceGetName(self, handle: _Handle) -> str:
        return self._gpu(handle).name

    def nvmlDeviceGetUUID(self, handle: _Handle) -> str:
        return self._gpu(handle).uuid

    def nvmlDeviceGetPowerManagementLimit(self, handle: _Handle) -> int:
        return round(self._gpu(handle).power_limit_w * 1000)

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: _Handle) -> int:
        return round(self._gpu(handle).power_limit_w * 1000)

    def nvmlDeviceGetMemoryInfo(self, handle: _Handle) -> FakeMemoryInfo:
        total = round(self._gpu(handle).memory_total_mb * 2**20)
        return FakeMemoryInfo(total=total, free=total, used=0)

    def nvmlDeviceGetPowerUsage(self, handle: _Handle) -> int:
        """Instant power in milliwatts."""
        gpu = self._gpu(handle)
        self.power_calls += 1
        return round(gpu.power_w * 1000)

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: _Handle) -> int:
        """Energy since the driver loaded, in millijoules, updated every ``counter_step_s``."""
        gpu = self._gpu(handle)
        if not gpu.energy_counter_supported:
            raise NVMLError_NotSupported()
        self.energy_calls += 1
        with self._lock:
            gpu.advance(time.perf_counter())
            return gpu.counter_mj

    def _check(self) -> None:
        if not self.initialised:
            raise NVMLError_Uninitialized()

    def _gpu(self, handle: _Handle) -> FakeGpu:
        self._check()
        if not isinstance(handle, _Handle) or not 0 <= handle.index < len(self.gpus):
            raise NVMLError_InvalidArgument()
        gpu = self.gpus[handle.index]
        if gpu.lost:
            raise NVMLError_GpuIsLost()
        return gpu

    def module(self) -> types.ModuleType:
        """A module object exposing this fake under pynvml's names."""
        module = types.ModuleType("pynvml", "fake pynvml (tests/fakes/fake_pynvml.py)")
        for name in dir(self):
            if name.startswith("nvml"):
                setattr(module, name, getattr(self, name))
        errors: dict[str, Any] = {
            "NVMLError": NVMLError,
            "NVMLError_Uninitialized": NVMLError_Uninitialized,
            "NVMLError_InvalidArgument": NVMLError_InvalidArgument,
            "NVMLError_NotSupported": NVMLError_NotSupported,
            "NVMLError_DriverNotLoaded": NVMLError_DriverNotLoaded,
            "NVMLError_LibraryNotFound": NVMLError_LibraryNotFound,
            "NVMLError_FunctionNotFound": NVMLError_FunctionNotFound,
            "NVMLError_GpuIsLost": NVMLError_GpuIsLost,
        }
        for name, value in errors.items():
            setattr(module, name, value)
        module.fake = self  # type: ignore[attr-defined]
        return module


def install(
    monkeypatch: pytest.MonkeyPatch,
    gpus: list[FakeGpu] | None = None,
    *,
    library_found: bool = True,
) -> FakeNvml:
    """Install a fake pynvml into ``sys.modules`` for the test; one H100 at 200 W by default.

    Args:
        monkeypatch: The test's monkeypatch, which undoes the install afterwards.
        gpus: The fake GPUs; ``[]`` makes a driver with no device.
        library_found: False makes ``nvmlInit`` raise ``NVMLError_LibraryNotFound``.

    Returns:
        The fake's state, to change power or switches and to count calls.
    """
    fake = FakeNvml([FakeGpu()] if gpus is None else gpus, library_found=library_found)
    monkeypatch.setitem(sys.modules, "pynvml", fake.module())
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return fake

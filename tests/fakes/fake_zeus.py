"""An honest fake of Zeus (``zeus.monitor.ZeusMonitor``) for tests on machines without Zeus.

It has the shape of the real package (``zeus``, ``zeus.monitor``, ``zeus.monitor.energy``,
``zeus.exception``, ``zeus.device.exception``) and the behaviour of ``ZeusMonitor`` in Zeus 0.11
to 0.16: named, concurrent windows; each fake GPU has a millijoule energy counter that advances
in steps of ``counter_step_s`` on the real clock (so a short window reads 0 J, and Zeus warns);
each fake CPU package's RAPL energy is power x elapsed time; ``sync_execution=True`` needs CUDA
(which the fake does not have unless told). ``CUDA_VISIBLE_DEVICES`` is read as Zeus 0.16 reads
it: ``int()`` of each entry (a UUID raises ``ValueError``), and a value that is empty or starts
with ``MIG`` leaves Zeus with no GPU at all, silently. ``install(monkeypatch, ...)`` puts it
into ``sys.modules`` (and clears ``CUDA_VISIBLE_DEVICES``; set it afterwards).
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
import types
import warnings
from dataclasses import dataclass, field
from typing import Any

import pytest

__all__ = [
    "FakeZeus",
    "FakeZeusCpu",
    "FakeZeusGpu",
    "Measurement",
    "ZeusBaseError",
    "ZeusBaseGPUError",
    "ZeusGPUInitError",
    "ZeusGPULostError",
    "install",
]

ZERO_ENERGY_WARNING = (
    "The energy consumption of one or more GPUs was measured as zero. This means that the time "
    "duration of the measurement window was shorter than the GPU's energy counter update period."
)


class ZeusBaseError(Exception):
    """Zeus's base exception (``zeus.exception.ZeusBaseError``)."""

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)

    def __str__(self) -> str:
        return self.message


class ZeusBaseGPUError(ZeusBaseError):
    """Zeus's base GPU exception (``zeus.device.exception``)."""


class ZeusGPULostError(ZeusBaseGPUError):
    """The GPU fell off the bus."""


class ZeusGPUInitError(ZeusBaseGPUError):
    """GPU management could not start (``ZeusMonitor`` then carries on without GPUs)."""


def _visible_gpus(gpus: list[FakeZeusGpu]) -> list[FakeZeusGpu]:
    """The GPUs Zeus tracks under ``CUDA_VISIBLE_DEVICES`` (``NVIDIAGPUs._init_gpus``)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return list(gpus)
    if not visible:
        raise ZeusGPUInitError("CUDA_VISIBLE_DEVICES is set to an empty string.")
    if visible.startswith("MIG"):
        raise ZeusGPUInitError("CUDA_VISIBLE_DEVICES contains MIG devices.")
    return [gpus[int(index)] for index in visible.split(",")]


@dataclass
class Measurement:
    """What ``end_window`` returns: seconds and joules per GPU, CPU package and DRAM."""

    time: float
    gpu_energy: dict[int, float]
    cpu_energy: dict[int, float] | None = None
    dram_energy: dict[int, float] | None = None
    soc_energy: Any = None

    @property
    def total_energy(self) -> float:
        """GPU joules over the window."""
        return sum(self.gpu_energy.values())


@dataclass
class FakeZeusGpu:
    """A GPU whose millijoule counter advances at ``power_w`` every ``counter_step_s``."""

    power_w: float = 200.0
    counter_step_s: float = 0.1
    counter_mj: int = 1_000_000
    lost: bool = False
    _next_tick: float = field(default_factory=lambda: math.inf, repr=False)

    def read_mj(self, now: float) -> int:
        """The counter at ``now`` (every update due by then applied)."""
        if self.lost:
            raise ZeusGPULostError("GPU is lost")
        if math.isinf(self._next_tick):
            self._next_tick = now + self.counter_step_s
        if now >= self._next_tick:
            ticks = math.floor((now - self._next_tick) / self.counter_step_s) + 1
            self.counter_mj += round(ticks * self.power_w * self.counter_step_s * 1000.0)
            self._next_tick += ticks * self.counter_step_s
        return self.counter_mj


@dataclass
class FakeZeusCpu:
    """A RAPL package: energy is ``power_w`` (and ``dram_w``, None for no DRAM zone) x time."""

    power_w: float = 50.0
    dram_w: float | None = 5.0
    _origin: float = field(default_factory=time.perf_counter, repr=False)

    def read_j(self, now: float) -> tuple[float, float | None]:
        """Package and DRAM joules since the fake was made."""
        elapsed = now - self._origin
        dram = None if self.dram_w is None else self.dram_w * elapsed
        return self.power_w * elapsed, dram


class FakeZeus:
    """The state behind the fake package: devices, switches and counts.

    Args:
        gpus: The GPUs Zeus finds (``[]``: none, as Zeus's ``EmptyGPUs``).
        cpus: The RAPL packages Zeus finds (``[]``: none).
        cpu_permission_denied: RAPL exists but is root-only (Zeus drops CPUs, or raises
            ``RuntimeError`` when ``cpu_indices`` names some).
        cuda_sync_available: Whether ``sync_execution=True`` can synchronise (needs torch+CUDA).
    """

    def __init__(
        self,
        gpus: list[FakeZeusGpu],
        cpus: list[FakeZeusCpu],
        *,
        cpu_permission_denied: bool = False,
        cuda_sync_available: bool = False,
    ) -> None:
        self.gpus = gpus
        self.cpus = cpus
        self.cpu_permission_denied = cpu_permission_denied
        self.cuda_sync_available = cuda_sync_available
        self.monitors: list[ZeusMonitorBase] = []
        self.sync_calls = 0
        self.lock = threading.Lock()

    def module(self) -> dict[str, types.ModuleType]:
        """The fake package's modules, by their names in ``sys.modules``."""
        monitor_class = type("ZeusMonitor", (ZeusMonitorBase,), {"fake": self})
        zeus = types.ModuleType("zeus", "fake zeus (tests/fakes/fake_zeus.py)")
        zeus.__version__ = "0.16.0"  # type: ignore[attr-defined]
        exception = types.ModuleType("zeus.exception")
        exception.ZeusBaseError = ZeusBaseError  # type: ignore[attr-defined]
        device = types.ModuleType("zeus.device")
        device_exception = types.ModuleType("zeus.device.exception")
        device_exception.ZeusBaseGPUError = ZeusBaseGPUError  # type: ignore[attr-defined]
        energy = types.ModuleType("zeus.monitor.energy")
        monitor = types.ModuleType("zeus.monitor")
        for module in (energy, monitor):
            module.ZeusMonitor = monitor_class  # type: ignore[attr-defined]
            module.Measurement = Measurement  # type: ignore[attr-defined]
        monitor.energy = energy  # type: ignore[attr-defined]
        device.exception = device_exception  # type: ignore[attr-defined]
        zeus.monitor = monitor  # type: ignore[attr-defined]
        zeus.exception = exception  # type: ignore[attr-defined]
        zeus.device = device  # type: ignore[attr-defined]
        return {
            "zeus": zeus,
            "zeus.exception": exception,
            "zeus.device": device,
            "zeus.device.exception": device_exception,
            "zeus.monitor": monitor,
            "zeus.monitor.energy": energy,
        }


@dataclass
class _State:
    time: float
    gpu_mj: dict[int, int]
    cpu_j: dict[int, float]
    dram_j: dict[int, float]


class _FakeCpus:
    """``ZeusMonitor.cpus``: Zeus's CPU manager (``RAPLCPUs``, or ``EmptyCPUs`` when empty)."""

    def __init__(self, cpus: list[FakeZeusCpu]) -> None:
        self._cpus = cpus

    def __len__(self) -> int:
        return len(self._cpus)

    def supports_get_dram_energy_consumption(self, index: int) -> bool:
        """Whether the package has a DRAM zone."""
        return self._cpus[index].dram_w is not None


class ZeusMonitorBase:
    """``ZeusMonitor`` with the real constructor and window methods; ``fake`` is the state."""

    fake: FakeZeus

    def __init__(
        self,
        gpu_indices: list[int] | None = None,
        cpu_indices: list[int] | None = None,
        approx_instant_energy: bool = False,
        log_file: str | None = None,
        sync_execution_with: str = "torch",
    ) -> None:
        fake = self.fake
        if approx_instant_energy:
            raise NotImplementedError("the fake does not approximate instant energy")
        cpu_count = len(fake.cpus)
        if fake.cpu_permission_denied:
            if cpu_indices:
                raise RuntimeError(
                    "Permission error while initializing CPU energy monitoring. On Linux, RAPL "
                    "requires root privileges. Alternatively, disable CPU measurement by "
                    "passing cpu_indices=[] to ZeusMonitor."
                )
            cpu_count = 0
        self.cpus = _FakeCpus(fake.cpus[:cpu_count])
        try:
            self.gpus = _visible_gpus(fake.gpus)
        except ZeusGPUInitError:
            self.gpus = []  # Zeus's EmptyGPUs: no GPU, and no word of why
        self.gpu_indices = gpu_indices if gpu_indices is not None else list(range(len(self.gpus)))
        self.cpu_indices = cpu_indices if cpu_indices is not None else list(range(cpu_count))
        self.sync_with = sync_execution_with
        self.measurement_states: dict[str, _State] = {}
        fake.monitors.append(self)

    def _sync(self, sync_execution: bool) -> None:
        if sync_execution and self.gpu_indices:
            self.fake.sync_calls += 1
            if not self.fake.cuda_sync_available:
                raise RuntimeError("PyTorch is available but does not have CUDA support.")

    def _read(self) -> _State:
        fake = self.fake
        with fake.lock:
            now = time.perf_counter()
            gpu = {i: self.gpus[i].read_mj(now) for i in self.gpu_indices}
            cpu: dict[int, float] = {}
            dram: dict[int, float] = {}
            for i in self.cpu_indices:
                cpu[i], dram_j = fake.cpus[i].read_j(now)
                if dram_j is not None:
                    dram[i] = dram_j
        return _State(time.time(), gpu, cpu, dram)

    def begin_window(self, key: str, sync_execution: bool = True, restart: bool = False) -> None:
        """Begin a named window (several may be open at once)."""
        if key in self.measurement_states and not restart:
            raise ValueError(f"Measurement window '{key}' already exists")
        self._sync(sync_execution)
        self.measurement_states[key] = self._read()

    def end_window(
        self, key: str, sync_execution: bool = True, cancel: bool = False
    ) -> Measurement:
        """End a named window: seconds and joules since its ``begin_window``."""
        try:
            start = self.measurement_states.pop(key)
        except KeyError:
            raise ValueError(f"Measurement window '{key}' does not exist") from None
        self._sync(sync_execution)
        if cancel:
            return Measurement(
                time=0.0,
                gpu_energy=dict.fromkeys(self.gpu_indices, 0.0),
                cpu_energy=dict.fromkeys(self.cpu_indices, 0.0),
            )
        end = self._read()
        gpu = {i: (end.gpu_mj[i] - start.gpu_mj[i]) / 1000.0 for i in self.gpu_indices}
        cpu = {i: end.cpu_j[i] - start.cpu_j[i] for i in self.cpu_indices}
        dram = {i: end.dram_j[i] - start.dram_j[i] for i in start.dram_j}
        if any(joules == 0.0 for joules in gpu.values()):
            warnings.warn(ZERO_ENERGY_WARNING, stacklevel=1)
        return Measurement(
            time=end.time - start.time,
            gpu_energy=gpu,
            cpu_energy=cpu or None,
            dram_energy=dram or None,
        )


def install(
    monkeypatch: pytest.MonkeyPatch,
    gpus: list[FakeZeusGpu] | None = None,
    cpus: list[FakeZeusCpu] | None = None,
    **switches: bool,
) -> FakeZeus:
    """Install the fake Zeus for the test; one 200 W GPU and one 50 W package by default.

    Args:
        monkeypatch: The test's monkeypatch, which removes the fake afterwards.
        gpus: The GPUs Zeus finds.
        cpus: The RAPL packages Zeus finds.
        **switches: ``cpu_permission_denied``, ``cuda_sync_available`` (see :class:`FakeZeus`).

    Returns:
        The fake's state.
    """
    fake = FakeZeus(
        [FakeZeusGpu()] if gpus is None else gpus,
        [FakeZeusCpu()] if cpus is None else cpus,
        **switches,
    )
    for name, module in fake.module().items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return fake

"""The NVML energy meter: NVIDIA GPU energy from the driver's counters, in joules.

Reads ``nvmlDeviceGetTotalEnergyConsumption`` (millijoules) at the window's edges, or, on a GPU
without that counter, integrates ``nvmlDeviceGetPowerUsage`` (milliwatts) polled by a thread.
NVML's units are converted here and nowhere else.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pytest_llem.exceptions import ConfigurationError, EnergyMeterError, MeterUnavailableError
from pytest_llem.meters.base import DomainReading, EnergyReading, MeterInfo, MeterResolution

__all__ = [
    "COUNTER_UPDATE_PERIOD_S",
    "POWER_POLL_PERIOD_S",
    "NvmlGpu",
    "NvmlMeter",
    "nvml_gpus",
    "parse_cuda_visible_devices",
]

logger = logging.getLogger("pytest_llem")

#: Nominal update period of the energy counter (seen on H100); the runner measures the real one.
COUNTER_UPDATE_PERIOD_S = 0.1
#: The counter counts millijoules.
_COUNTER_QUANTUM_J = 0.001
#: How often the power-integration fallback polls ``nvmlDeviceGetPowerUsage``.
POWER_POLL_PERIOD_S = 0.02

_COUNTER = "energy counter"
_POWER = "power integration"


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


@dataclass
class _Device:
    """One measured GPU: its label, NVML handle and how its energy is obtained."""

    label: str
    nvml_index: int
    handle: Any
    name: str
    uuid: str
    method: str
    why_power: str | None = None


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


def parse_cuda_visible_devices(value: str | None, uuids: Sequence[str]) -> list[int]:
    """Map ``CUDA_VISIBLE_DEVICES`` to NVML device indices, in the order the process sees them.

    Follows CUDA's rules: entries are integer indices or (prefixes of) ``GPU-...`` UUIDs, and the
    first entry that names no device ends the list. Integer indices are taken in NVML's order,
    which is CUDA's order when ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` (and on machines of identical
    GPUs).

    Args:
        value: The variable's value; None when it is not set.
        uuids: The UUID of every NVML device, by NVML index.

    Returns:
        NVML indices of the visible devices; empty when none is visible.

    Raises:
        MeterUnavailableError: An entry names a MIG instance, whose energy NVML does not count.
    """
    if value is None:
        return list(range(len(uuids)))
    visible: list[int] = []
    for raw in value.split(","):
        entry = raw.strip()
        found = _match_entry(entry, uuids)
        if found is None or found in visible:
            break
        visible.append(found)
    return visible


def _match_entry(entry: str, uuids: Sequence[str]) -> int | None:
    if not entry:
        return None
    if entry.upper().startswith("MIG-"):
        raise MeterUnavailableError(
            "nvml",
            f"CUDA_VISIBLE_DEVICES names a MIG instance ({entry}); its energy is not counted",
        )
    if entry.isdigit():
        index = int(entry)
        return index if index < len(uuids) else None
    prefix = entry.lower() if entry.upper().startswith("GPU-") else f"gpu-{entry.lower()}"
    matches = [i for i, uuid in enumerate(uuids) if uuid.lower().startswith(prefix)]
    return matches[0] if len(matches) == 1 else None


def _visible_nvml_indices(pynvml: Any) -> list[int]:
    """NVML indices of the GPUs this process sees; raises MeterUnavailableError for none."""
    count = int(pynvml.nvmlDeviceGetCount())
    if count == 0:
        raise MeterUnavailableError("nvml", "no NVIDIA GPU visible")
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    uuids = [
        _text(pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(i))) for i in range(count)
    ]
    visible = parse_cuda_visible_devices(env, uuids)
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


def nvml_gpus() -> tuple[list[NvmlGpu], str | None]:
    """Describe the GPUs this process can see, for the run record's machine section.

    Never raises: where NVML cannot answer, the list is empty and the reason says why.

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
        for index, nvml_index in enumerate(_visible_nvml_indices(pynvml)):
            handle = pynvml.nvmlDeviceGetHandleByIndex(nvml_index)
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


class _PowerPoller:
    """Polls power of some GPUs in a thread and integrates it (trapezoid) over the window."""

    def __init__(self, pynvml: Any, devices: Sequence[_Device], period_s: float) -> None:
        self._pynvml = pynvml
        self._devices = list(devices)
        self._period_s = period_s
        self._times: list[float] = []
        self._watts: list[list[float]] = []
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        watts = [
            float(self._pynvml.nvmlDeviceGetPowerUsage(d.handle)) / 1000.0 for d in self._devices
        ]
        self._times.append(time.perf_counter())
        self._watts.append(watts)

    def _run(self) -> None:
        while not self._stop.wait(self._period_s):
            try:
                self._sample()
            except Exception as e:  # surfaced by stop() as an EnergyMeterError
                self._error = e
                return

    def start(self) -> None:
        self._sample()
        self._thread = threading.Thread(
            target=self._run, name="pytest-llem-nvml-power", daemon=True
        )
        self._thread.start()

    def cancel(self) -> None:
        """Stop polling and discard the samples."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def stop(self) -> tuple[dict[str, float], int]:
        """Join the thread, take a last sample and return joules per device label."""
        self.cancel()
        if self._error is not None:
            raise EnergyMeterError(
                f"nvml: reading GPU power failed: {self._error}"
            ) from self._error
        self._sample()
        energy = dict.fromkeys((d.label for d in self._devices), 0.0)
        for k in range(1, len(self._times)):
            dt = self._times[k] - self._times[k - 1]
            for i, device in enumerate(self._devices):
                energy[device.label] += 0.5 * (self._watts[k][i] + self._watts[k - 1][i]) * dt
        return energy, len(self._times)


class NvmlMeter:
    """GPU energy from NVML: the driver's energy counter, or integrated power where it is absent.

    Args:
        gpu_indices: GPUs to measure, as indices the process sees (after
            ``CUDA_VISIBLE_DEVICES``); None measures every visible GPU.
        poll_period_s: Power polling period for GPUs without an energy counter.

    Raises:
        MeterUnavailableError: NVML or a GPU is missing, or a GPU offers neither energy nor power.
        ConfigurationError: ``gpu_indices`` is empty.
    """

    name = "nvml"

    def __init__(
        self,
        gpu_indices: Sequence[int] | None = None,
        *,
        poll_period_s: float = POWER_POLL_PERIOD_S,
    ) -> None:
        self._pynvml = _import_pynvml()
        try:
            self._pynvml.nvmlInit()
        except Exception as e:
            raise MeterUnavailableError("nvml", _init_reason(self._pynvml, e)) from e
        self._closed = False
        self._poll_period_s = poll_period_s
        self._window_start: float | None = None
        self._counters_mj: dict[str, int] = {}
        self._poller: _PowerPoller | None = None
        try:
            self._driver = _driver_version(self._pynvml)
            self._devices = self._open_devices(gpu_indices)
        except BaseException:
            self.close()
            raise

    def _open_devices(self, gpu_indices: Sequence[int] | None) -> list[_Device]:
        pynvml = self._pynvml
        try:
            visible = _visible_nvml_indices(pynvml)
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

    def _open_device(self, label: str, nvml_index: int) -> _Device:
        pynvml = self._pynvml
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(nvml_index)
            name = _text(pynvml.nvmlDeviceGetName(handle))
            uuid = _text(pynvml.nvmlDeviceGetUUID(handle))
        except pynvml.NVMLError as e:
            raise MeterUnavailableError("nvml", f"{label}: NVML cannot open the device: {e}") from e
        device = _Device(label, nvml_index, handle, name, uuid, _COUNTER)
        try:
            pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
            return device
        except (pynvml.NVMLError, AttributeError) as e:
            if not _is_unsupported(pynvml, e):
                raise MeterUnavailableError(
                    "nvml", f"{label}: reading the energy counter failed: {e}"
                ) from e
            device.method, device.why_power = _POWER, f"energy counter not supported ({e})"
        try:
            pynvml.nvmlDeviceGetPowerUsage(handle)
        except (pynvml.NVMLError, AttributeError) as e:
            raise MeterUnavailableError(
                "nvml", f"{label}: neither the energy counter nor power usage is available: {e}"
            ) from e
        logger.info("nvml: %s has no energy counter; integrating its power instead", label)
        return device

    def info(self) -> MeterInfo:
        """What this meter covers: the GPU domain, measured, per device."""
        details: dict[str, str] = {
            f"{d.label}.method": d.method + (f" ({d.why_power})" if d.why_power else "")
            for d in self._devices
        }
        details["driver_version"] = self._driver or "unknown"
        details["index_order"] = (
            "CUDA_VISIBLE_DEVICES integers are taken in NVML (PCI bus) order, CUDA's order "
            "under CUDA_DEVICE_ORDER=PCI_BUS_ID"
        )
        if any(d.method == _POWER for d in self._devices):
            details["power_poll_period_s"] = f"{self._poll_period_s:g}"
        return MeterInfo(
            name=self.name,
            domains=("gpu",),
            sources={"gpu": "measured"},
            resolution=MeterResolution(
                update_period_s=COUNTER_UPDATE_PERIOD_S, energy_quantum_j=_COUNTER_QUANTUM_J
            ),
            devices=tuple(
                f"{d.label}: {d.name} (nvml index {d.nvml_index}, {d.uuid})" for d in self._devices
            ),
            details=details,
        )

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
        """Open a window: read the counters and start polling power where needed."""
        if self._closed:
            raise EnergyMeterError("nvml: the meter is closed")
        if self._window_start is not None:
            raise EnergyMeterError("nvml: a window is already open")
        power_devices = [d for d in self._devices if d.method == _POWER]
        self._counters_mj = self._read_counters()
        if power_devices:
            self._poller = _PowerPoller(self._pynvml, power_devices, self._poll_period_s)
            try:
                self._poller.start()
            except self._pynvml.NVMLError as e:
                self._poller = None
                raise EnergyMeterError(f"nvml: reading GPU power failed: {e}") from e
        self._window_start = time.perf_counter()

    def stop(self) -> EnergyReading:
        """Close the window and return the GPU energy over it.

        Raises:
            EnergyMeterError: No window is open, a read failed, or a counter went backwards.
        """
        if self._window_start is None:
            raise EnergyMeterError("nvml: stop() without start()")
        duration_s = time.perf_counter() - self._window_start
        self._window_start = None
        poller, self._poller = self._poller, None
        try:
            end = self._read_counters()
        except EnergyMeterError:
            if poller is not None:
                poller.cancel()
            raise
        energy: dict[str, float] = {}
        notes: list[str] = []
        if poller is not None:
            integrated, samples = poller.stop()
            energy.update(integrated)
            notes.append(
                f"power integration for {', '.join(integrated)} ({samples} samples, "
                f"energy counter not supported)"
            )
        for label, start_mj in self._counters_mj.items():
            if end[label] < start_mj:
                raise EnergyMeterError(
                    f"nvml: the energy counter of {label} went backwards "
                    f"({start_mj} mJ -> {end[label]} mJ; driver reload or counter reset)"
                )
            energy[label] = (end[label] - start_mj) / 1000.0
        return EnergyReading(
            meter=self.name,
            duration_s=duration_s,
            domains={"gpu": self._gpu_reading(energy, duration_s)},
            notes=tuple(notes),
        )

    def lap(self) -> EnergyReading:
        """The energy since ``start()``, leaving the window open (a counter read per GPU).

        Raises:
            EnergyMeterError: no window is open, or a GPU has no energy counter (its power is
                integrated only when the window closes).
        """
        if self._window_start is None:
            raise EnergyMeterError("nvml: lap() without start()")
        if any(d.method != _COUNTER for d in self._devices):
            raise EnergyMeterError("nvml: reading mid-window needs the energy counter on every GPU")
        duration_s = time.perf_counter() - self._window_start
        now = self._read_counters()
        energy = {
            label: (now[label] - start) / 1000.0 for label, start in self._counters_mj.items()
        }
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
        why = "; ".join(
            f"{d.label}: energy counter did not advance over the {duration_s:.3f} s window "
            f"(shorter than its ~{COUNTER_UPDATE_PERIOD_S:g} s update period?)"
            if d.method == _COUNTER
            else f"{d.label}: reported 0 W over the window"
            for d in missing
        )
        return DomainReading("gpu", None, "measured", reason=why, devices=devices)

    def close(self) -> None:
        """Stop any polling and shut NVML down (once)."""
        if self._closed:
            return
        self._closed = True
        poller, self._poller = self._poller, None
        if poller is not None:
            poller.cancel()
        self._window_start = None
        try:
            self._pynvml.nvmlShutdown()
        except Exception:
            logger.warning("nvml: nvmlShutdown failed", exc_info=True)

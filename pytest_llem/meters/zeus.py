"""The Zeus meter: GPU, CPU and DRAM energy from Zeus's ``ZeusMonitor`` measurement windows.

How it measures: one ``zeus.monitor.ZeusMonitor`` serves the meter; each window is one Zeus
window (``begin_window``/``end_window``), whose ``Measurement`` gives joules per GPU
(``gpu_energy``, from NVML's energy counter on Volta and newer, or Zeus's own power polling on
older GPUs), per RAPL package (``cpu_energy``) and per package's DRAM (``dram_energy``); the
last two are None where Zeus has no readable RAPL. Zeus already works in joules; nothing is
converted here. The runner synchronises the backend at the window's edges, so Zeus's own
``torch.cuda.synchronize`` is turned off (``sync_execution=False``).

``lap()`` ends the Zeus window and begins the next one at once, adding the parts up: the
energy between the two counter reads (microseconds) is lost.

Resolution: NVML's GPU counter counts millijoules and updates about every 100 ms; RAPL
updates about every millisecond in microjoules. Zeus exposes neither period, so the meter
reports the nominal one for the domains it covers (not measured).

Known errors: for a window shorter than a counter update Zeus reports 0.0 J for that GPU (and
warns); this meter reports such a GPU as not measured, with the reason, never 0 J, and never
uses Zeus's ``approx_instant_energy`` estimate. Zeus silently drops CPU measurement when RAPL
is root-only (the ``rapl`` meter says how to grant access). Zeus takes every top-level
``intel-rapl:N`` zone for a CPU package, so on a laptop with a ``psys`` (platform) zone its CPU
figure also counts the platform; the ``rapl`` meter leaves ``psys`` out. On first use Zeus
spawns one wrap-around tracker process per RAPL file (importing Zeus again, about a second of
CPU): the meter runs one warm-up window at construction so that this happens before the first
real window. Zeus reads ``CUDA_VISIBLE_DEVICES`` as integer indices only: a GPU UUID makes it
fail with "invalid literal for int()", and a MIG instance makes it drop every GPU without a
word, so the meter refuses such a selection at start-up with the reason. Zeus errors are
reported as ``EnergyMeterError`` (while measuring) or ``MeterUnavailableError`` (at start-up).
Checked against Zeus 0.16.0 (API unchanged since 0.11, when the package was renamed from
``zeus-ml``).
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import logging
import math
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from pytest_llem.exceptions import ConfigurationError, EnergyMeterError, MeterUnavailableError
from pytest_llem.meters.base import (
    Domain,
    DomainReading,
    EnergyReading,
    MeterInfo,
    MeterResolution,
)
from pytest_llem.meters.window import WindowedMeter

__all__ = ["INSTALL_HINT", "ZeusMeter", "zeus_unavailable_reason"]

logger = logging.getLogger("pytest_llem")

INSTALL_HINT = "pip install 'pytest-llem[zeus]'"

#: Nominal update period and step of NVML's GPU energy counter (the nvml meter's figures).
_GPU_PERIOD_S = 0.1
_GPU_QUANTUM_J = 0.001
#: Nominal update period and file unit of a RAPL counter.
_RAPL_PERIOD_S = 0.001
_RAPL_QUANTUM_J = 1e-6


def zeus_unavailable_reason() -> str | None:
    """Why Zeus cannot be used here, or None when it is installed (without importing it)."""
    if "zeus" in sys.modules:
        return None if sys.modules["zeus"] is not None else f"zeus not installed ({INSTALL_HINT})"
    try:
        spec = importlib.util.find_spec("zeus")
    except (ImportError, ValueError):
        spec = None
    return None if spec is not None else f"zeus not installed ({INSTALL_HINT})"


def _import_monitor_module() -> Any:
    try:
        return importlib.import_module("zeus.monitor")
    except ImportError as e:
        raise MeterUnavailableError("zeus", f"zeus not installed ({INSTALL_HINT})") from e


def _zeus_version() -> str:
    module = sys.modules.get("zeus")
    return str(getattr(module, "__version__", "unknown"))


def _visible_devices_problem(value: str | None) -> str | None:
    """Why Zeus cannot measure the GPUs ``CUDA_VISIBLE_DEVICES`` selects, or None when it can.

    Zeus 0.16 takes each entry through ``int()``: a ``GPU-...`` UUID fails, and a value that
    starts with ``MIG`` leaves it with no GPU at all (it measures the CPU only, without saying
    so). An empty value hides every GPU from CUDA too, so it is no problem of Zeus's.
    """
    if not value:
        return None
    names = [entry.strip() for entry in value.split(",") if not entry.strip().isdigit()]
    if not names:
        return None
    return (
        f"Zeus cannot measure the GPUs CUDA_VISIBLE_DEVICES={value!r} selects: it reads only "
        f"integer indices, and {', '.join(names)} is a GPU UUID or MIG instance (Zeus fails on "
        "a UUID and silently drops every GPU for a MIG name); set CUDA_VISIBLE_DEVICES to "
        "integer indices, or use the nvml meter"
    )


def _dram_supported(monitor: Any, cpu_indices: Sequence[int]) -> bool | None:
    """Whether Zeus reads DRAM for any measured package; None when this Zeus cannot say."""
    cpus = getattr(monitor, "cpus", None)
    for method in ("supports_get_dram_energy_consumption", "supportsGetDramEnergyConsumption"):
        check = getattr(cpus, method, None)
        if check is None:
            continue
        try:
            return any(bool(check(i)) for i in cpu_indices)
        except Exception:  # a courtesy for info(): the windows say what Zeus really gives
            logger.debug("zeus: cannot ask about DRAM support", exc_info=True)
            return None
    return None


class ZeusMeter(WindowedMeter[list[Any]]):
    """GPU, CPU and DRAM energy from one Zeus ``ZeusMonitor``.

    Args:
        gpu_indices: GPUs to measure, as indices the process sees (after
            ``CUDA_VISIBLE_DEVICES``); None measures every GPU Zeus finds.
        cpu_indices: RAPL packages to measure; None measures every package Zeus can read, ``[]``
            none.

    Raises:
        MeterUnavailableError: Zeus is not installed, its monitor fails to start, it finds
            neither a GPU nor a readable CPU package, or ``CUDA_VISIBLE_DEVICES`` names GPUs by
            UUID or MIG instance (which Zeus cannot read).
        ConfigurationError: ``gpu_indices`` is empty.
    """

    name = "zeus"

    def __init__(
        self,
        gpu_indices: Sequence[int] | None = None,
        *,
        cpu_indices: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if gpu_indices is not None and not list(gpu_indices):
            raise ConfigurationError("zeus: gpu_indices is empty; give None to measure every GPU")
        problem = _visible_devices_problem(os.environ.get("CUDA_VISIBLE_DEVICES"))
        if problem is not None:
            raise MeterUnavailableError("zeus", problem)
        monitor_module = _import_monitor_module()
        self._version = _zeus_version()
        try:
            self._monitor: Any = monitor_module.ZeusMonitor(
                gpu_indices=None if gpu_indices is None else list(gpu_indices),
                cpu_indices=None if cpu_indices is None else list(cpu_indices),
                approx_instant_energy=False,
            )
            self._gpus = [int(i) for i in self._monitor.gpu_indices]
            self._cpus = [int(i) for i in self._monitor.cpu_indices]
        except Exception as e:  # any failure of Zeus's set-up means the meter cannot run
            raise MeterUnavailableError("zeus", f"ZeusMonitor failed to start: {e}") from e
        if not self._gpus and not self._cpus:
            raise MeterUnavailableError(
                "zeus", "Zeus found neither a GPU nor a readable RAPL CPU package"
            )
        self._dram = _dram_supported(self._monitor, self._cpus) if self._cpus else False
        self._keys = (f"pytest-llem-{n}" for n in itertools.count())
        self._key: str | None = None
        try:  # a window read at once: bad GPU indices and driver faults show up here
            self._begin()
            self._end(cancel=True)
        except EnergyMeterError as e:
            raise MeterUnavailableError("zeus", f"a warm-up window failed: {e}") from e

    def info(self) -> MeterInfo:
        """The domains Zeus covers here: ``gpu``, and ``cpu``/``dram`` where RAPL is readable."""
        domains: list[Domain] = []
        if self._gpus:
            domains.append("gpu")
        if self._cpus:
            domains.append("cpu")
        if self._cpus and self._dram is not False:
            domains.append("dram")
        details = {
            "method": (
                "one ZeusMonitor; a begin_window/end_window per window (lap() ends it and "
                "begins the next); sync_execution off, approx_instant_energy off"
            ),
            "zeus_version": self._version,
            "gpu": f"Zeus GPUs {self._gpus}" if self._gpus else "not covered: Zeus found no GPU",
            "cpu": (
                f"Zeus RAPL packages {self._cpus}"
                if self._cpus
                else "not covered: Zeus found no readable RAPL package"
            ),
        }
        if self._dram is None:
            details["dram"] = "covered where Zeus reports DRAM energy"
        period, quantum = (
            (_GPU_PERIOD_S, _GPU_QUANTUM_J) if self._gpus else (_RAPL_PERIOD_S, _RAPL_QUANTUM_J)
        )
        return MeterInfo(
            name=self.name,
            domains=tuple(domains),
            sources=dict.fromkeys(domains, "measured"),
            resolution=MeterResolution(
                update_period_s=period,
                energy_quantum_j=quantum,
                note="nominal: Zeus does not expose its counters' update period",
            ),
            devices=tuple(f"gpu{i}" for i in self._gpus)
            + tuple(f"cpu{i} (RAPL package {i})" for i in self._cpus),
            details=details,
        )

    def _begin(self) -> None:
        key = next(self._keys)
        try:
            self._monitor.begin_window(key, sync_execution=False)
        except Exception as e:
            raise EnergyMeterError(f"zeus: begin_window failed: {e}") from e
        self._key = key

    def _end(self, *, cancel: bool = False) -> Any:
        key, self._key = self._key, None
        try:
            with warnings.catch_warnings():
                # Zeus warns when a GPU read 0 J; the reading says so in its reason instead.
                warnings.simplefilter("ignore")
                return self._monitor.end_window(key, sync_execution=False, cancel=cancel)
        except Exception as e:
            raise EnergyMeterError(f"zeus: end_window failed: {e}") from e

    def start(self) -> None:
        """Open a window: begin a Zeus window.

        Raises:
            EnergyMeterError: The meter is closed, a window is open, or Zeus failed.
        """
        self._check_can_start()
        self._begin()
        self._opened([])

    def lap(self) -> EnergyReading:
        """The energy since ``start()``: ends the Zeus window and begins the next at once.

        Raises:
            EnergyMeterError: No window is open, or Zeus failed.
        """
        window = self._current_window("lap")
        duration_s = window.elapsed_s()
        window.state.append(self._end())
        self._begin()
        return self._reading(window.state, duration_s)

    def stop(self) -> EnergyReading:
        """Close the window and return Zeus's energy per domain.

        Raises:
            EnergyMeterError: No window is open, Zeus failed, or a counter went backwards.
        """
        window = self._take_window()
        duration_s, parts = window.elapsed_s(), window.state
        parts.append(self._end())
        return self._reading(parts, duration_s)

    def _reading(self, parts: Sequence[Any], duration_s: float) -> EnergyReading:
        domains = {
            "gpu": self._domain_reading("gpu", parts, duration_s),
            "cpu": self._domain_reading("cpu", parts, duration_s),
            "dram": self._domain_reading("dram", parts, duration_s),
        }
        zeus_time = math.fsum(float(part.time) for part in parts)
        notes = (f"zeus: {len(parts)} Zeus window(s), {zeus_time:.4f} s by Zeus's clock",)
        return EnergyReading(meter=self.name, duration_s=duration_s, domains=domains, notes=notes)

    def _domain_reading(
        self, domain: Domain, parts: Sequence[Any], duration_s: float
    ) -> DomainReading:
        """Add a domain's joules over the parts; 0 J or a missing part makes it not measured."""
        indices, prefix = (self._gpus, "gpu") if domain == "gpu" else (self._cpus, domain)
        if not indices:
            why = "Zeus found no GPU" if domain == "gpu" else "Zeus found no readable RAPL package"
            return DomainReading(domain, None, "measured", reason=why)
        totals: dict[int, float] = dict.fromkeys(indices, 0.0)
        for part in parts:
            energy = getattr(part, f"{domain}_energy", None)
            if energy is None:
                why = f"Zeus reported no {domain} energy" + (
                    " (no dram RAPL zone?)" if domain == "dram" else ""
                )
                return DomainReading(domain, None, "measured", reason=why)
            for index in indices:
                if index not in energy:
                    return DomainReading(
                        domain,
                        None,
                        "measured",
                        reason=f"Zeus reported no energy for {prefix}{index}",
                    )
                totals[index] += float(energy[index])
        backwards = [i for i, joules in totals.items() if joules < 0]
        if backwards:
            raise EnergyMeterError(
                f"zeus: the {domain} energy of {', '.join(f'{prefix}{i}' for i in backwards)} "
                "went backwards (counter reset or driver reload)"
            )
        devices = {f"{prefix}{i}": joules for i, joules in totals.items() if joules > 0}
        if len(devices) == len(indices):
            return DomainReading(domain, math.fsum(devices.values()), "measured", devices=devices)
        zero = [f"{prefix}{i}" for i in indices if f"{prefix}{i}" not in devices]
        period = _GPU_PERIOD_S if domain == "gpu" else _RAPL_PERIOD_S
        reason = (
            f"Zeus reported 0 J for {', '.join(zero)} over the {duration_s:.4f} s window "
            f"(shorter than the counter's ~{period:g} s update period?)"
        )
        return DomainReading(domain, None, "measured", reason=reason, devices=devices)

    def close(self) -> None:
        """Cancel any open Zeus window; the meter can no longer open one."""
        if self.closed:
            return
        self._shut()
        if self._key is not None:
            try:
                self._end(cancel=True)
            except EnergyMeterError:
                logger.debug("zeus: cancelling the open window failed", exc_info=True)

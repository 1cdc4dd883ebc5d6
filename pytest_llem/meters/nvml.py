"""The NVML energy meter: NVIDIA GPU energy from the driver's counters, in joules.

At construction the meter measures how often each GPU's energy counter
(``nvmlDeviceGetTotalEnergyConsumption``, millijoules) updates, which becomes its resolution. A
window reads the counters at its edges while a thread samples power (the
``NVML_FI_DEV_POWER_INSTANT`` field, else ``nvmlDeviceGetPowerUsage``, milliwatts): the samples
give the window's power timeline, a cross-check of the counter, and the energy of a GPU that has
no counter. Where the samples are ``nvmlDeviceGetPowerUsage``'s one-second average (Ampere and
newer), their integral is corrected for the average's lag. Each window edge also records every
GPU's temperature, clocks and clock event reasons, and ``running_processes()`` lists who else
computes on the GPUs (or why it cannot). NVML's units are converted here and in the modules
beside it, and nowhere else: :mod:`~pytest_llem.meters.nvml_devices` finds the GPUs and asks
them, :mod:`~pytest_llem.meters.nvml_power` reads and samples their power and probes the
counters' update period, :mod:`~pytest_llem.meters.power` integrates power series.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from pytest_llem.exceptions import ConfigurationError, EnergyMeterError, MeterUnavailableError
from pytest_llem.meters.base import (
    DeviceState,
    DomainReading,
    EnergyReading,
    MeterInfo,
    PowerTimeline,
    ProcessesUnknown,
)
from pytest_llem.meters.capabilities import DeviceProcesses
from pytest_llem.meters.nvml_devices import (
    VisibleGpu,
    compute_processes,
    decode_clock_event_reasons,
    device_state,
    driver_version,
    import_pynvml,
    init_failure_reason,
    is_unsupported,
    mig_enabled,
    nvml_text,
    parse_cuda_visible_devices,
    visible_gpus,
)
from pytest_llem.meters.nvml_power import (
    COUNTER_METHOD,
    COUNTER_UPDATE_PERIOD_S,
    POWER_METHOD,
    POWER_USAGE_AVERAGE_S,
    SAMPLE_PERIOD_MAX_S,
    SAMPLE_PERIOD_MIN_S,
    SAMPLER_COST_FACTOR,
    MeasuredGpu,
    PowerSampler,
    PowerSamples,
    choose_power_method,
    probe_update_periods,
    sample_period_s,
    sampled_energy,
)
from pytest_llem.meters.power import (
    TIMELINE_MAX_POINTS,
    averaged_power_energy,
    downsample_power,
    integrate_power,
)
from pytest_llem.meters.window import WindowedMeter

# The pure functions and constants tests and users reach through this module live in the
# modules above; they are named here so ``pytest_llem.meters.nvml`` keeps offering them.
__all__ = [
    "COUNTER_UPDATE_PERIOD_S",
    "POWER_USAGE_AVERAGE_S",
    "SAMPLER_COST_FACTOR",
    "SAMPLE_PERIOD_MAX_S",
    "SAMPLE_PERIOD_MIN_S",
    "TIMELINE_MAX_POINTS",
    "UPDATE_PERIOD_PROBE_MAX_S",
    "UPDATE_PERIOD_PROBE_S",
    "NvmlMeter",
    "averaged_power_energy",
    "decode_clock_event_reasons",
    "downsample_power",
    "integrate_power",
    "parse_cuda_visible_devices",
    "sample_period_s",
]

logger = logging.getLogger("pytest_llem")

#: How long the meter polls the energy counters at construction to measure their period.
UPDATE_PERIOD_PROBE_S = 1.0
#: The longest it goes on polling a counter that has not yet changed twice (a slow counter).
UPDATE_PERIOD_PROBE_MAX_S = 5.0


@dataclass(frozen=True)
class _NvmlWindow:
    """What an open window keeps: the counters and device states at its start, and the power
    sampler (None with ``sampler_note`` saying why, where sampling failed to start)."""

    counters_mj: dict[str, int]
    start_states: dict[str, DeviceState]
    sampler: PowerSampler | None
    sampler_note: str | None


def _cross_check(
    devices: Sequence[MeasuredGpu], energy: dict[str, float], integrated: dict[str, float]
) -> dict[str, float]:
    """``counter_vs_power_diff`` over the GPUs that have both a counter and samples."""
    counters = [d.label for d in devices if d.method == COUNTER_METHOD]
    if not counters or any(label not in integrated or energy[label] <= 0 for label in counters):
        return {}
    power_j = math.fsum(integrated[label] for label in counters)
    if power_j <= 0:
        return {}
    counter_j = math.fsum(energy[label] for label in counters)
    return {"gpu": (counter_j - power_j) / power_j}


class NvmlMeter(WindowedMeter[_NvmlWindow]):
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
        super().__init__()
        self._pynvml = import_pynvml()
        try:
            self._pynvml.nvmlInit()
        except Exception as e:
            raise MeterUnavailableError("nvml", init_failure_reason(self._pynvml, e)) from e
        try:
            self._driver = driver_version(self._pynvml)
            self._devices = self._open_devices(gpu_indices)
            self._resolution = probe_update_periods(
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

    def _open_devices(self, gpu_indices: Sequence[int] | None) -> list[MeasuredGpu]:
        pynvml = self._pynvml
        try:
            visible = visible_gpus(pynvml)
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

    def _open_device(self, label: str, visible: VisibleGpu) -> MeasuredGpu:
        pynvml = self._pynvml
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(visible.nvml_index)
            name = nvml_text(pynvml.nvmlDeviceGetName(handle))
            uuid = nvml_text(pynvml.nvmlDeviceGetUUID(handle))
        except pynvml.NVMLError as e:
            raise MeterUnavailableError("nvml", f"{label}: NVML cannot open the device: {e}") from e
        device = MeasuredGpu(label, visible.nvml_index, handle, name, uuid, COUNTER_METHOD)
        device.mig_note = self._mig_note(device, visible.mig)
        try:
            pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        except (pynvml.NVMLError, AttributeError) as e:
            if not is_unsupported(pynvml, e):
                raise MeterUnavailableError(
                    "nvml", f"{label}: reading the energy counter failed: {e}"
                ) from e
            device.method, device.why_power = POWER_METHOD, f"energy counter not supported ({e})"
        choose_power_method(pynvml, device)
        if device.method == POWER_METHOD:
            if device.power_method is None:
                raise MeterUnavailableError(
                    "nvml",
                    f"{label}: neither the energy counter nor power is available: "
                    f"{device.why_no_power}",
                )
            logger.info("nvml: %s has no energy counter; integrating its power instead", label)
        return device

    def _mig_note(self, device: MeasuredGpu, mig: str | None) -> str | None:
        if mig is not None:
            note = (
                f"MIG instance {mig} measured at its parent GPU {device.uuid}: the energy "
                "includes every instance on that GPU"
            )
        elif mig_enabled(self._pynvml, device.handle):
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
        self._check_usable()
        return {d.label: device_state(self._pynvml, d.handle) for d in self._devices}

    def running_processes(self) -> DeviceProcesses:
        """Per GPU label, the ``(pid, used GPU memory in MiB or None)`` of its compute processes.

        A GPU that cannot list its processes (an old driver, a MIG-enabled GPU asked by an
        unprivileged user) gets :class:`ProcessesUnknown` with the reason; an empty list means
        none run.
        """
        self._check_usable()
        running: DeviceProcesses = {}
        for device in self._devices:
            processes = compute_processes(self._pynvml, device.handle)
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
            if device.method != COUNTER_METHOD:
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
        self._check_can_start()
        start_states = self.device_states()
        counters_mj = self._read_counters()
        sampler: PowerSampler | None = None
        sampler_note: str | None = None
        window_start = time.perf_counter()
        if self._sampled:
            sampler = PowerSampler(self._pynvml, self._sampled, self._sample_period_s)
            try:
                sampler.start()
            except Exception as e:
                if any(d.method == POWER_METHOD for d in self._devices):
                    raise EnergyMeterError(f"nvml: reading GPU power failed: {e}") from e
                sampler = None
                sampler_note = f"no power timeline: reading power failed at start ({e})"
        self._opened(
            _NvmlWindow(counters_mj, start_states, sampler, sampler_note), started_at=window_start
        )

    def stop(self) -> EnergyReading:
        """Close the window and return the GPU energy over it, its power timeline and states.

        Raises:
            EnergyMeterError: No window is open, a counter read failed or went backwards, or
                sampling the power of a GPU without an energy counter failed.
        """
        window = self._take_window()
        opened = window.state
        samples = opened.sampler.finish() if opened.sampler is not None else None
        duration_s = window.elapsed_s()
        energy = self._counter_energy(opened.counters_mj, self._read_counters())
        notes = [opened.sampler_note] if opened.sampler_note else []
        timelines: tuple[PowerTimeline, ...] = ()
        cross_check: dict[str, float] = {}
        if samples is not None:
            integrated = self._integrate(samples, notes)
            energy.update(
                {d.label: integrated[d.label] for d in self._devices if d.method == POWER_METHOD}
            )
            if integrated:
                timelines = self._timelines(samples, window.started_at)
                cross_check = _cross_check(self._devices, energy, integrated)
        return EnergyReading(
            meter=self.name,
            duration_s=duration_s,
            domains={"gpu": self._gpu_reading(energy, duration_s)},
            notes=tuple(notes),
            timelines=timelines,
            cross_check=cross_check,
            start_states=opened.start_states,
            end_states=self.device_states(),
        )

    def _counter_energy(self, start: dict[str, int], end: dict[str, int]) -> dict[str, float]:
        energy: dict[str, float] = {}
        for label, start_mj in start.items():
            if end[label] < start_mj:
                raise EnergyMeterError(
                    f"nvml: the energy counter of {label} went backwards "
                    f"({start_mj} mJ -> {end[label]} mJ; driver reload or counter reset)"
                )
            energy[label] = (end[label] - start_mj) / 1000.0
        return energy

    def _integrate(self, samples: PowerSamples, notes: list[str]) -> dict[str, float]:
        """Joules per sampled GPU; {} (with a note) when sampling failed on counter GPUs only.

        Raises:
            EnergyMeterError: Sampling failed and a GPU without a counter depended on it.
        """
        power_only = [d.label for d in self._devices if d.method == POWER_METHOD]
        if samples.error is not None:
            if power_only:
                raise EnergyMeterError(
                    f"nvml: reading GPU power failed: {samples.error}"
                ) from samples.error
            notes.append(f"no power timeline: reading power failed mid-window ({samples.error})")
            return {}
        integrated = {
            d.label: sampled_energy(d, samples.times, [row[i] for row in samples.watts])
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

    def _timelines(self, samples: PowerSamples, window_start: float) -> tuple[PowerTimeline, ...]:
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

    @property
    def reads_mid_window(self) -> bool:
        """Whether ``lap()`` works: every measured GPU has an energy counter (power-integrated
        energy is only known when the window closes)."""
        return all(d.method == COUNTER_METHOD for d in self._devices)

    def lap(self) -> EnergyReading:
        """The energy since ``start()``, leaving the window open (a counter read per GPU).

        The lap carries no timeline (the samples stay with the window until ``stop()``).

        Raises:
            EnergyMeterError: no window is open, or a GPU has no energy counter (its power is
                integrated only when the window closes).
        """
        window = self._current_window("lap")
        if not self.reads_mid_window:
            raise EnergyMeterError("nvml: reading mid-window needs the energy counter on every GPU")
        duration_s = window.elapsed_s()
        energy = self._counter_energy(window.state.counters_mj, self._read_counters())
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
            if d.method == COUNTER_METHOD
            else f"{d.label}: reported 0 W over the window"
            for d in missing
        )
        still = tuple(d.label for d in missing if d.method == COUNTER_METHOD)
        return DomainReading(
            "gpu", None, "measured", reason=why, devices=devices, not_advanced=still
        )

    def close(self) -> None:
        """Stop any sampling (joining its thread) and shut NVML down (once)."""
        if self.closed:
            return
        window = self._shut()
        if window is not None and window.state.sampler is not None:
            window.state.sampler.cancel()
        try:
            self._pynvml.nvmlShutdown()
        except Exception:
            logger.warning("nvml: nvmlShutdown failed", exc_info=True)

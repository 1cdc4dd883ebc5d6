"""The CodeCarbon meter: CPU, GPU and RAM energy from CodeCarbon, mostly estimated.

One ``OfflineEmissionsTracker`` serves the whole session; each window is one of its tasks
(``start_task``/``stop_task``), which CodeCarbon measures at the task's edges, so short windows
still get energy. CodeCarbon's kilowatt-hours are converted to joules here and nowhere else.
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import logging
import tempfile
from dataclasses import dataclass
from typing import Any

from pytest_llem.exceptions import ConfigurationError, EnergyMeterError, MeterUnavailableError
from pytest_llem.meters.base import (
    DOMAINS,
    Domain,
    DomainReading,
    EnergyReading,
    MeterInfo,
    MeterResolution,
    Source,
)
from pytest_llem.meters.window import WindowedMeter

__all__ = ["INSTALL_HINT", "CodeCarbonMeter", "codecarbon_unavailable_reason"]

logger = logging.getLogger("pytest_llem")

INSTALL_HINT = "pip install 'pytest-llem[codecarbon]'"

_J_PER_KWH = 3.6e6
#: CPU modes in which CodeCarbon reads a hardware energy counter or power sensor.
_MEASURED_CPU_MODES = {
    "intel_rapl": "RAPL energy counters",
    "windows_emi": "Windows Energy Meter Interface",
    "intel_power_gadget": "Intel Power Gadget",
    "apple_powermetrics": "powermetrics",
}
_WINDOW_METHOD = (
    "one tracker, one start_task/stop_task per window; CodeCarbon reads every source at "
    "stop_task (counter deltas, or power x window time for estimates) and samples power once a "
    "second in between, so a 0.2 s window still gets energy; measure_power_secs paces only "
    "start()/stop() tracking, which this meter does not use"
)


@dataclass(frozen=True)
class _Coverage:
    """How CodeCarbon obtains one domain: ``method`` None means it does not see the domain."""

    source: Source
    method: str | None
    reason: str | None = None


def codecarbon_unavailable_reason() -> str | None:
    """Why CodeCarbon cannot be used here, or None when it is installed (without importing it)."""
    try:
        spec = importlib.util.find_spec("codecarbon")
    except (ImportError, ValueError):
        spec = None
    return None if spec is not None else f"codecarbon not installed ({INSTALL_HINT})"


def _import_codecarbon() -> Any:
    try:
        return importlib.import_module("codecarbon")
    except ImportError as e:
        raise MeterUnavailableError("codecarbon", INSTALL_HINT) from e


def _check_country(country_iso_code: str) -> None:
    """Reject a country CodeCarbon has no energy mix for (it would silently fall back)."""
    try:
        known = (
            importlib.import_module("codecarbon.input").DataSource().get_global_energy_mix_data()
        )
    except Exception:  # the check is a courtesy: an unexpected layout must not stop the meter
        logger.debug("codecarbon: cannot list known countries", exc_info=True)
        return
    if country_iso_code not in known:
        raise ConfigurationError(
            f"codecarbon knows no country with ISO code {country_iso_code!r} "
            f"(three letters, such as USA, FRA, DEU)"
        )


def _cpu_coverage(hardware: Any) -> _Coverage:
    kind = type(hardware).__name__
    if kind == "CPU":
        mode = str(getattr(hardware, "_mode", "unknown"))
        if mode in _MEASURED_CPU_MODES:
            return _Coverage("measured", f"{_MEASURED_CPU_MODES[mode]} ({mode})")
        tdp = getattr(hardware, "_tdp", None)
        generic = " (generic)" if getattr(hardware, "_is_generic_tdp", False) else ""
        model = "constant half of TDP" if mode == "constant" else "TDP x CPU-load model"
        return _Coverage("estimated", f"{model}, TDP {tdp} W{generic} ({mode})")
    if kind == "AppleSiliconChip":
        return _Coverage("measured", "powermetrics (apple silicon)")
    return _Coverage("measured", "Raspberry Pi PMIC")


def _monitored_gpus(hardware: Any) -> list[tuple[int, str]]:
    """The ``(index, name)`` of the GPUs a CodeCarbon ``GPU`` measures.

    ``num_gpus`` counts every device on the machine; ``gpu_ids`` (set from the tracker's
    ``gpu_ids`` or ``CUDA_VISIBLE_DEVICES``, resolved to indices) are those it adds up.
    """
    try:
        details = list(hardware.devices.get_gpu_static_info())
    except Exception:  # a courtesy for the label: the indices alone still say which
        logger.debug("codecarbon: cannot read its GPU details", exc_info=True)
        details = []
    names = {int(d["gpu_index"]): str(d.get("name", "?")) for d in details if "gpu_index" in d}
    ids = getattr(hardware, "gpu_ids", None)
    if ids is None:
        ids = range(int(getattr(hardware, "num_gpus", 0) or 0))
    indices = sorted({int(i) for i in ids if isinstance(i, int) or str(i).isdigit()})
    return [(i, names.get(i, "?")) for i in indices]


def _gpu_coverage(hardware: Any) -> _Coverage:
    monitored = _monitored_gpus(hardware)
    total = getattr(hardware, "num_gpus", "?")
    if not monitored:
        return _Coverage(
            "measured", None, f"codecarbon monitors none of the machine's {total} GPU(s)"
        )
    listed = ", ".join(f"{index}: {name}" for index, name in monitored)
    return _Coverage(
        "measured",
        f"{len(monitored)} of {total} GPU(s) via NVML or AMD SMI (indices {listed})",
    )


def _coverage(tracker: Any) -> dict[Domain, _Coverage]:
    """Which domains the tracker sees and whether it measures or estimates each."""
    found: dict[Domain, _Coverage] = {}
    for hardware in getattr(tracker, "_hardware", []):
        kind = type(hardware).__name__
        part = str(getattr(hardware, "chip_part", ""))
        if kind == "CPU" or (kind in ("AppleSiliconChip", "Raspberry") and part == "CPU"):
            found["cpu"] = _cpu_coverage(hardware)
        elif kind == "GPU":
            found["gpu"] = _gpu_coverage(hardware)
        elif kind == "AppleSiliconChip" and part == "GPU":
            found["gpu"] = _Coverage("measured", "powermetrics (apple silicon)")
        elif kind == "RAM":
            forced = getattr(hardware, "_force_ram_power", None)
            method = (
                f"user-set constant {forced} W"
                if forced is not None
                else "CodeCarbon's RAM power model"
            )
            found["dram"] = _Coverage("estimated", method)
        elif kind == "Raspberry" and part == "RAM":
            found["dram"] = _Coverage("measured", "Raspberry Pi PMIC")
    found.setdefault(
        "cpu", _Coverage("estimated", None, "codecarbon set up no CPU tracking on this machine")
    )
    found.setdefault(
        "gpu", _Coverage("measured", None, "codecarbon found no GPU (no NVML or AMD SMI device)")
    )
    found.setdefault(
        "dram", _Coverage("estimated", None, "codecarbon set up no RAM tracking on this machine")
    )
    return {domain: found[domain] for domain in DOMAINS}


class CodeCarbonMeter(WindowedMeter[str]):
    """CPU, GPU and DRAM energy from one CodeCarbon ``OfflineEmissionsTracker``.

    Nothing is written to disk and nothing is sent over the network. Creating the meter takes
    about 1.5 s the first time in a process (CodeCarbon probes the hardware) and runs one short
    warm-up task so that the first real window carries no set-up time.

    Args:
        country_iso_code: Three-letter country code for the carbon intensity of emissions.
        measure_power_secs: CodeCarbon's sampling period, reported as the meter's resolution.
        log_level: Level of the ``codecarbon`` logger (CodeCarbon is chatty at ``info``).

    Raises:
        MeterUnavailableError: CodeCarbon is not installed or its tracker cannot start.
        ConfigurationError: CodeCarbon does not know the country.
    """

    name = "codecarbon"

    def __init__(
        self,
        country_iso_code: str = "USA",
        *,
        measure_power_secs: float = 1.0,
        log_level: str = "error",
    ) -> None:
        super().__init__()
        codecarbon = _import_codecarbon()
        # CodeCarbon logs on its own handler (propagate=False) from import on; quiet it first.
        logging.getLogger("codecarbon").setLevel(log_level.upper())
        _check_country(country_iso_code)
        self._country = country_iso_code
        self._measure_power_secs = measure_power_secs
        self._version = str(getattr(codecarbon, "__version__", "unknown"))
        self._names = itertools.count()
        try:
            self._tracker: Any = codecarbon.OfflineEmissionsTracker(
                country_iso_code=country_iso_code,
                project_name="pytest-llem",
                measure_power_secs=measure_power_secs,
                output_methods=[],  # no emissions.csv; replaces the deprecated save_to_file
                emissions_endpoint="",
                api_call_interval=-1,
                output_dir=tempfile.gettempdir(),  # only macOS/Intel helpers write logs there
                allow_multiple_runs=True,  # no lock file
                tracking_mode="machine",
                pue=1.0,
                wue=0.0,
                log_level=log_level,
            )
            # Public; probes the hardware once per process (the slow part).
            self._hardware = dict(self._tracker.get_detected_hardware())
        except Exception as e:  # CodeCarbon swallows errors in its constructor: check here
            raise MeterUnavailableError("codecarbon", f"the tracker failed to start: {e}") from e
        self._coverage = _coverage(self._tracker)
        try:
            self.start()
            self.stop()
        except EnergyMeterError as e:
            raise MeterUnavailableError("codecarbon", f"a warm-up window failed: {e}") from e

    def info(self) -> MeterInfo:
        """The domains CodeCarbon sees, and whether each is measured or estimated."""
        covered = [d for d, c in self._coverage.items() if c.method is not None]
        details = {
            f"{domain}_method": (
                f"{c.method} ({c.source})" if c.method else f"not covered: {c.reason}"
            )
            for domain, c in self._coverage.items()
        }
        details.update(
            country_iso_code=self._country,
            codecarbon_version=self._version,
            cpu_model=str(self._hardware.get("cpu_model")),
            tracking_mode="machine",
            window_method=_WINDOW_METHOD,
            emissions=(
                "estimated: CodeCarbon's energy x the grid carbon intensity of "
                f"{self._country} (kg CO2eq; --llem-country sets the country)"
            ),
        )
        return MeterInfo(
            name=self.name,
            domains=tuple(covered),
            sources={d: self._coverage[d].source for d in covered},
            resolution=self._resolution(),
            devices=self._gpu_devices(),
            details=details,
        )

    def _gpu_devices(self) -> tuple[str, ...]:
        """The GPUs CodeCarbon adds up (its ``gpu_model`` names every GPU on the machine)."""
        for hardware in getattr(self._tracker, "_hardware", []):
            if type(hardware).__name__ == "GPU":
                return tuple(f"gpu{index}: {name}" for index, name in _monitored_gpus(hardware))
        return ()

    def _resolution(self) -> MeterResolution:
        """CodeCarbon reads every source at the task's edges: estimates scale with the window's
        length (no quantisation); a GPU is read through NVML's energy counter, which updates
        about every 0.1 s; RAPL counters update about every millisecond."""
        if self._coverage["gpu"].method is not None:
            return MeterResolution(
                update_period_s=0.1,
                note="GPU energy through NVML's counter (nominal 0.1 s update period)",
            )
        return MeterResolution(
            note="read at each window's edges; estimates are power x time, not quantised"
        )

    def start(self) -> None:
        """Open a window: start a CodeCarbon task."""
        self._check_can_start()
        task = f"pytest-llem-{next(self._names)}"
        try:
            self._tracker.start_task(task)
        except Exception as e:
            raise EnergyMeterError(f"codecarbon: start_task failed: {e}") from e
        active = getattr(self._tracker, "_active_task", task)
        if active != task:  # start_task logs and returns on failure instead of raising
            raise EnergyMeterError(
                f"codecarbon: start_task did not start the task (active task: {active!r})"
            )
        self._opened(task)

    def stop(self) -> EnergyReading:
        """Close the window and return CodeCarbon's energy per domain in joules.

        Raises:
            EnergyMeterError: No window is open, or CodeCarbon returned no data or failed.
        """
        window = self._take_window()
        duration_s, task = window.elapsed_s(), window.state
        try:
            data = self._tracker.stop_task(task)
        except Exception as e:
            raise EnergyMeterError(f"codecarbon: stop_task failed: {e}") from e
        finally:
            # CodeCarbon keeps every task; drop ours so a long session does not grow.
            tasks = getattr(self._tracker, "_tasks", None)
            if isinstance(tasks, dict):
                tasks.pop(task, None)
        if data is None:
            raise EnergyMeterError(
                f"codecarbon: stop_task returned no data for task {task!r} "
                "(see the codecarbon logger for why)"
            )
        kwh = {"cpu": data.cpu_energy, "gpu": data.gpu_energy, "dram": data.ram_energy}
        domains: dict[str, DomainReading] = {
            domain: self._domain_reading(domain, kwh[domain], duration_s)
            for domain in self._coverage
        }
        return EnergyReading(
            meter=self.name,
            duration_s=duration_s,
            domains=domains,
            emissions_kg=float(data.emissions),
            notes=(f"codecarbon task duration {float(data.duration):.4f} s",),
        )

    def _domain_reading(self, domain: Domain, kwh: Any, duration_s: float) -> DomainReading:
        coverage = self._coverage[domain]
        if coverage.method is None:
            return DomainReading(domain, None, coverage.source, reason=coverage.reason)
        joules = float(kwh) * _J_PER_KWH
        if joules > 0:
            return DomainReading(domain, joules, coverage.source)
        return DomainReading(
            domain,
            None,
            coverage.source,
            reason=f"codecarbon reported {joules:g} J over a {duration_s:.3f} s window",
        )

    def close(self) -> None:
        """End any open task and release the tracker."""
        if self.closed:
            return
        window = self._shut()
        if window is not None:
            try:
                self._tracker.stop_task(window.state)
            except Exception:
                logger.debug("codecarbon: stop_task failed while closing", exc_info=True)

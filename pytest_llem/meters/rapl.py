"""The RAPL energy meter: CPU package and DRAM energy from Linux powercap counters, in joules.

How it measures: every RAPL zone of the ``intel-rapl`` powercap control type (Intel, and AMD
Zen and Hygon CPUs, whose kernel driver registers under the same name) has a cumulative counter,
``energy_uj``, in microjoules. The meter reads the counters of the package zones (``package-N``
or ``package-N-die-M``; domain ``cpu``) and of their ``dram`` subzones (domain ``dram``) at the
window's edges. ``core`` and ``uncore`` subzones lie inside their package and are never added;
``psys`` (the whole platform) includes the package and is left out; ``intel-rapl-mmio`` zones
repeat the MSR package counter and are left out. Microjoules are converted here and nowhere
else.

Wrap-around: each counter wraps at ``max_energy_range_uj`` (about 262 kJ on Intel, 65 kJ on
AMD: minutes at full load). A read that is lower than the previous one is taken as one wrap and
the range is added. So that no counter wraps twice between two reads, a daemon thread reads
every counter every ``poll_s`` while a window is open, with ``poll_s = min(1 s, range /
max_power_w / 4)`` for an assumed upper bound of the zone's power (2 kW by default), and the
meter adds up the per-read deltas. A wrap that would imply more than ``max_power_w`` is
reported as an error (a counter reset looks the same as a wrap).

Resolution: RAPL updates its counters about every millisecond; the meter measures the update
period at construction by polling one package counter for at most 0.3 s (up to 2 s while it has
not changed twice: a slow counter, as in some virtual machines, must not be taken for a fast
one). The file's unit is 1 uJ; the hardware's own step is coarser (15.3 uJ on AMD, 61 uJ on most
Intel parts).

Known errors: RAPL is a model-assisted estimate on some older Intel parts (before Haswell) and
on AMD client parts, though it is reported as ``measured`` because it comes from the CPU's own
counter. On AMD, ``core`` energy is per core complex and the package counter is per socket; on
kernels that exposed per-die package zones for AMD, those zones repeat one socket counter, so
only one zone per socket is counted. Since the 2020 PLATYPUS fix (CVE-2020-8694) ``energy_uj``
is readable by root only on most distributions: the meter then reports itself unavailable with
the command that grants read access. A file being rewritten may read empty or partial: reads
are retried a few times before failing.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pytest_llem.exceptions import ConfigurationError, EnergyMeterError, MeterUnavailableError
from pytest_llem.meters.base import (
    Domain,
    DomainReading,
    EnergyReading,
    MeterInfo,
    MeterResolution,
    PowerTimeline,
    update_period_from_changes,
)
from pytest_llem.meters.rapl_zones import (
    DEFAULT_ROOT,
    ROOT_ENV_VAR,
    RaplZone,
    check_readable,
    drop_repeated_dies,
    rapl_root,
    rapl_unavailable_reason,
    rapl_zones,
    read_cpu_vendor,
    read_uj,
)
from pytest_llem.meters.window import WindowedMeter

# Zone discovery lives in rapl_zones; its public names are offered here too.
__all__ = [
    "ASSUMED_MAX_POWER_W",
    "DEFAULT_ROOT",
    "NOMINAL_UPDATE_PERIOD_S",
    "ROOT_ENV_VAR",
    "UPDATE_PERIOD_PROBE_MAX_S",
    "UPDATE_PERIOD_PROBE_S",
    "RaplMeter",
    "RaplZone",
    "rapl_root",
    "rapl_unavailable_reason",
    "rapl_zones",
]

logger = logging.getLogger("pytest_llem")

#: Upper bound of one zone's power used to pace the wrap-around reads.
ASSUMED_MAX_POWER_W = 2000.0
#: RAPL's documented update period (the probe at construction measures the real one).
NOMINAL_UPDATE_PERIOD_S = 0.001
#: How long the meter polls a package counter at construction to measure its update period.
UPDATE_PERIOD_PROBE_S = 0.3
#: The longest it goes on polling a counter that has not yet changed twice.
UPDATE_PERIOD_PROBE_MAX_S = 2.0

_J_PER_UJ = 1e-6
_MAX_POLL_S = 1.0
_MIN_POLL_S = 0.001
_PROBE_INTERVALS = 20
_PROBE_SLEEP_S = 0.0001
#: Slack added to a read interval before a wrap is judged impossible (scheduling jitter).
_WRAP_SLACK_S = 0.05


def _counter_change_times(zone: RaplZone, budget_s: float, max_s: float) -> list[float]:
    """When the zone's counter changed: polled until ``_PROBE_INTERVALS`` intervals are seen,
    or ``budget_s`` has passed with at least two changes, or ``max_s`` has passed."""
    began = time.perf_counter()
    last = read_uj(zone)
    changes: list[float] = []
    while len(changes) <= _PROBE_INTERVALS:
        elapsed = time.perf_counter() - began
        if elapsed >= max_s or (elapsed >= budget_s and len(changes) >= 2):
            break
        value = read_uj(zone)
        if value != last:
            changes.append(time.perf_counter())
            last = value
        else:
            time.sleep(_PROBE_SLEEP_S)
    return changes


class _Accumulator:
    """Per-zone energy since the window opened, from successive counter reads.

    Thread-safe: the poller thread and the caller's ``lap()``/``stop()`` both call ``sample``.
    """

    def __init__(self, zones: Sequence[RaplZone], max_power_w: float) -> None:
        self._zones = list(zones)
        self._max_power_w = max_power_w
        self._lock = threading.Lock()
        self.total_uj = dict.fromkeys((z.label for z in zones), 0)
        self.wraps = 0
        self.reads = 0
        now = time.perf_counter()
        self._last = {z.label: (read_uj(z), now) for z in zones}
        self.opened = now
        #: After each read: (seconds since opening, joules per domain so far), for the
        #: window's power timeline.
        self.history: list[tuple[float, dict[Domain, float]]] = []

    def sample(self) -> None:
        """Read every counter and add its advance since the previous read."""
        with self._lock:
            for zone in self._zones:
                raw = read_uj(zone)
                now = time.perf_counter()
                last_raw, last_time = self._last[zone.label]
                delta = raw - last_raw
                if delta < 0:
                    delta += zone.max_energy_range_uj
                    self._check_wrap(zone, delta, now - last_time, last_raw, raw)
                    self.wraps += 1
                self.total_uj[zone.label] += delta
                self._last[zone.label] = (raw, now)
            self.reads += 1
            self.history.append((now - self.opened, self._domain_joules()))

    def _domain_joules(self) -> dict[Domain, float]:
        joules: dict[Domain, float] = {}
        for zone in self._zones:
            joules[zone.domain] = (
                joules.get(zone.domain, 0.0) + self.total_uj[zone.label] * _J_PER_UJ
            )
        return joules

    def timelines(self, poll_s: float) -> tuple[PowerTimeline, ...]:
        """Per domain, the mean power between consecutive reads (each at the later read)."""
        with self._lock:
            history = list(self.history)
        out = []
        for domain in sorted({d for _, joules in history for d in joules}):
            times, watts, last_t, last_j = [], [], 0.0, 0.0
            for t, joules in history:
                if t > last_t:
                    times.append(t)
                    watts.append((joules[domain] - last_j) / (t - last_t))
                    last_t, last_j = t, joules[domain]
            if times:
                method = "RAPL energy counter polled; mean power between reads"
                out.append(
                    PowerTimeline(domain, tuple(times), tuple(watts), method, poll_s, len(times))
                )
        return tuple(out)

    def _check_wrap(
        self, zone: RaplZone, delta_uj: int, interval_s: float, before: int, after: int
    ) -> None:
        allowed_uj = self._max_power_w * (interval_s + _WRAP_SLACK_S) / _J_PER_UJ
        if delta_uj > allowed_uj:
            raise EnergyMeterError(
                f"rapl: the counter of {zone.label} went back from {before} to {after} uJ, "
                f"more than one wrap at up to {self._max_power_w:g} W allows in "
                f"{interval_s:.3f} s (counter reset or driver reload?)"
            )

    def joules(self) -> dict[str, float]:
        """Energy per zone label so far, in joules."""
        with self._lock:
            return {label: uj * _J_PER_UJ for label, uj in self.total_uj.items()}


class _Poller:
    """Samples an accumulator every ``period_s`` in a daemon thread, keeping the first error."""

    def __init__(self, accumulator: _Accumulator, period_s: float) -> None:
        self._accumulator = accumulator
        self._period_s = period_s
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="pytest-llem-rapl-poll", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._period_s):
            try:
                self._accumulator.sample()
            except (EnergyMeterError, OSError) as e:  # surfaced by lap()/stop()
                self.error = e
                return

    def stop(self) -> None:
        """Stop sampling and wait for the thread."""
        self._stop.set()
        self._thread.join()


def _raise_poller_error(poller: _Poller) -> None:
    if poller.error is not None:
        raise EnergyMeterError(f"rapl: reading the counters failed: {poller.error}") from (
            poller.error
        )


def _sample(accumulator: _Accumulator) -> None:
    try:
        accumulator.sample()
    except PermissionError as e:
        raise EnergyMeterError(f"rapl: {e}") from e


@dataclass(frozen=True)
class _OpenRapl:
    """What an open window keeps: the running energy sums and the thread feeding them."""

    accumulator: _Accumulator
    poller: _Poller


def _safe_poll_s(zones: Sequence[RaplZone], max_power_w: float) -> float:
    """The longest poll period in which no counter can wrap twice, capped at one second."""
    shortest_j = min(zone.max_energy_range_uj for zone in zones) * _J_PER_UJ
    return min(_MAX_POLL_S, max(_MIN_POLL_S, shortest_j / max_power_w / 4.0))


class RaplMeter(WindowedMeter["_OpenRapl"]):
    """CPU package and DRAM energy from the Linux powercap RAPL counters.

    Args:
        root: The powercap folder; None means ``$LLEM_RAPL_ROOT``, else ``/sys/class/powercap``.
        poll_s: How often a thread reads the counters during a window to count wrap-arounds;
            None derives it from the counters' range and ``max_power_w``.
        max_power_w: Upper bound of any one zone's power, for the derived ``poll_s`` and for
            telling a wrap from a counter reset.
        cpu_vendor: The CPU vendor (``GenuineIntel``, ``AuthenticAMD``); None reads
            ``/proc/cpuinfo``. On AMD only one package zone per socket is counted.
        update_period_probe_s: How long to poll a package counter at construction.
        update_period_probe_max_s: The longest to poll a counter that has not changed twice.

    Raises:
        MeterUnavailableError: No powercap folder, no RAPL package zone, or a counter that this
            user may not read (the reason says how to grant access).
        ConfigurationError: ``poll_s`` or ``max_power_w`` is not positive.
    """

    name = "rapl"

    def __init__(
        self,
        root: Path | str | None = None,
        *,
        poll_s: float | None = None,
        max_power_w: float = ASSUMED_MAX_POWER_W,
        cpu_vendor: str | None = None,
        update_period_probe_s: float = UPDATE_PERIOD_PROBE_S,
        update_period_probe_max_s: float = UPDATE_PERIOD_PROBE_MAX_S,
    ) -> None:
        super().__init__()
        if not max_power_w > 0 or (poll_s is not None and not poll_s > 0):
            raise ConfigurationError("rapl: poll_s and max_power_w must be positive")
        self._probe_s = (
            update_period_probe_s,
            max(update_period_probe_s, update_period_probe_max_s),
        )
        self._root = rapl_root(root)
        zones, self._skipped = rapl_zones(self._root)
        self._vendor = cpu_vendor if cpu_vendor is not None else read_cpu_vendor()
        self._zones, dropped = drop_repeated_dies(zones, self._vendor)
        self._skipped += dropped
        check_readable(self._zones, self._root)
        self._max_power_w = max_power_w
        self._poll_s = poll_s if poll_s is not None else _safe_poll_s(self._zones, max_power_w)
        self._resolution = self._measure_resolution()

    def _measure_resolution(self) -> MeterResolution:
        package = next(zone for zone in self._zones if zone.domain == "cpu")
        began = time.perf_counter()
        try:
            changes = _counter_change_times(package, *self._probe_s)
        except EnergyMeterError as e:
            raise MeterUnavailableError("rapl", str(e).removeprefix("rapl: ")) from e
        spent = time.perf_counter() - began
        period = update_period_from_changes(changes)
        if period is None:
            # Fewer than two changes in the whole poll: the counter is about as slow as the
            # poll was long, or slower; RAPL's nominal 1 ms would make windows far too short.
            return MeterResolution(
                update_period_s=max(spent, NOMINAL_UPDATE_PERIOD_S),
                energy_quantum_j=_J_PER_UJ,
                note=(
                    f"{package.label} changed fewer than twice in {spent:.2f} s of polling, so "
                    f"its update period is about that long or longer: {spent:.3g} s assumed"
                ),
            )
        return MeterResolution(
            update_period_s=period,
            energy_quantum_j=_J_PER_UJ,
            update_period_measured=True,
            note=(
                f"median interval between changes of {package.label}'s counter, polled for "
                f"{spent:.2f} s at start-up; the file counts 1 uJ, the hardware steps 15.3-61 uJ"
            ),
        )

    @property
    def zones(self) -> tuple[RaplZone, ...]:
        """The zones this meter reads."""
        return tuple(self._zones)

    def info(self) -> MeterInfo:
        """The domains covered (``cpu``, and ``dram`` where a dram zone exists), per zone."""
        domains: tuple[Domain, ...] = tuple(
            d for d in ("cpu", "dram") if any(z.domain == d for z in self._zones)
        )
        details = {
            "method": (
                "Linux powercap RAPL energy_uj counters (uJ), read at the window's edges; a "
                f"thread reads them every {self._poll_s:g} s during a window to count "
                "wrap-arounds"
            ),
            "root": str(self._root),
            "poll_s": f"{self._poll_s:g}",
            "max_power_w": f"{self._max_power_w:g}",
            "cpu_vendor": self._vendor or "unknown",
            "cpu": "sum of the package zones (core and uncore lie inside them)",
        }
        if "dram" not in domains:
            details["dram"] = "not covered: no dram RAPL zone"
        if self._skipped:
            details["zones_not_added"] = "; ".join(self._skipped)
        return MeterInfo(
            name=self.name,
            domains=domains,
            sources=dict.fromkeys(domains, "measured"),
            resolution=self._resolution,
            devices=tuple(f"{z.label} ({z.zone_id})" for z in self._zones),
            details=details,
        )

    def start(self) -> None:
        """Open a window: read every counter and start the wrap-around poller.

        Raises:
            EnergyMeterError: The meter is closed, a window is open, or a read failed.
        """
        self._check_can_start()
        try:
            accumulator = _Accumulator(self._zones, self._max_power_w)
        except PermissionError as e:
            raise EnergyMeterError(f"rapl: {e}") from e
        self._opened(_OpenRapl(accumulator, _Poller(accumulator, self._poll_s)))

    def lap(self) -> EnergyReading:
        """The energy since ``start()``, leaving the window open (one read per zone).

        Raises:
            EnergyMeterError: No window is open, or a read failed.
        """
        window = self._current_window("lap")
        duration_s = window.elapsed_s()
        _raise_poller_error(window.state.poller)
        _sample(window.state.accumulator)
        return self._reading(window.state.accumulator, duration_s)

    def stop(self) -> EnergyReading:
        """Close the window and return the CPU and DRAM energy over it.

        Raises:
            EnergyMeterError: No window is open, a read failed, or a counter reset.
        """
        window = self._take_window()
        duration_s = window.elapsed_s()
        accumulator, poller = window.state.accumulator, window.state.poller
        poller.stop()
        _raise_poller_error(poller)
        _sample(accumulator)
        reading = self._reading(accumulator, duration_s)
        return dataclasses.replace(reading, timelines=accumulator.timelines(self._poll_s))

    def _reading(self, accumulator: _Accumulator, duration_s: float) -> EnergyReading:
        joules = accumulator.joules()
        domains = {
            domain: self._domain_reading(domain, joules, duration_s) for domain in ("cpu", "dram")
        }
        notes = (
            f"rapl: {accumulator.reads} counter reads after the first, "
            f"{accumulator.wraps} wrap-around(s) counted",
        )
        return EnergyReading(meter=self.name, duration_s=duration_s, domains=domains, notes=notes)

    def _domain_reading(
        self, domain: Domain, joules: dict[str, float], duration_s: float
    ) -> DomainReading:
        """Sum a domain's zones; a zone whose counter did not move makes it not measured."""
        zones = [z for z in self._zones if z.domain == domain]
        if not zones:
            return DomainReading(domain, None, "measured", reason=f"no {domain} RAPL zone")
        devices = {z.label: joules[z.label] for z in zones if joules[z.label] > 0}
        still = [z.label for z in zones if z.label not in devices]
        if not still:
            return DomainReading(domain, math.fsum(devices.values()), "measured", devices=devices)
        reason = (
            f"RAPL counter of {', '.join(still)} did not advance over the {duration_s:.4f} s "
            f"window (shorter than its ~{self._resolution.update_period_s or 0:.2g} s update "
            "period?)"
        )
        return DomainReading(
            domain, None, "measured", reason=reason, devices=devices, not_advanced=tuple(still)
        )

    def close(self) -> None:
        """Stop the poller of any open window; the meter can no longer open one."""
        window = self._shut()
        if window is not None:
            window.state.poller.stop()

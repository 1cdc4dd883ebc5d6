"""The idle baseline: power per domain with nothing running, so cases can report dynamic energy.

Before the first case the session's meters measure the idle machine for ``--llem-baseline-s``
seconds (at least the window floor: 20 update periods of the slowest meter), split into
sub-windows so the baseline carries its own spread. The result is cached
per machine, meters and devices in the cache folder for :data:`BASELINE_TTL_S` and reused while
fresh; ``--llem-baseline-s`` given on the command line measures afresh. Dynamic energy is
``energy_j - idle_power_w * duration_s`` (METRICS.md), computed by the runner.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import socket
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path

from pydantic import ValidationError

from pytest_llem.exceptions import EnergyMeterError
from pytest_llem.harness.thermal import device_temperatures
from pytest_llem.harness.windows import abandon_meters, start_meters, stop_meters
from pytest_llem.meters.base import EnergyMeter, EnergyReading, reading_between
from pytest_llem.meters.capabilities import LapsMidWindow, reads_mid_window
from pytest_llem.results.models import BaselineDomain, BaselineRecord, MeterRecord

__all__ = [
    "BASELINE_SUBWINDOWS",
    "BASELINE_TTL_S",
    "baseline_cache_key",
    "baseline_cache_path",
    "idle_power",
    "load_cached_baseline",
    "measure_baseline",
    "store_baseline",
]

logger = logging.getLogger("pytest_llem")

#: How long a cached baseline is reused, seconds (idle power drifts with temperature and load).
BASELINE_TTL_S = 3600.0
#: Sub-windows of one baseline measurement; their spread is the baseline's spread.
BASELINE_SUBWINDOWS = 5


def baseline_cache_key(records: Sequence[MeterRecord]) -> str:
    """A key naming this machine, its meters and their devices (different GPUs: other key)."""
    identity = {
        "host": socket.gethostname(),
        "meters": [
            {"name": r.name, "devices": list(r.devices), "domains": list(r.used_for)}
            for r in records
        ],
    }
    text = json.dumps(identity, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def baseline_cache_path(key: str, root: Path | None = None) -> Path:
    """Where the baseline of ``key`` is cached (under the project's cache folder)."""
    if root is None:
        from pytest_llem.data.tiny_model import cache_root

        root = cache_root()
    return root / "baselines" / f"{key}.json"


def load_cached_baseline(
    path: Path, *, ttl_s: float = BASELINE_TTL_S, now: datetime | None = None
) -> BaselineRecord | None:
    """The cached baseline at ``path`` if it exists, parses and is younger than ``ttl_s``."""
    try:
        record = BaselineRecord.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, ValidationError, ValueError):
        return None
    now = now or datetime.now(timezone.utc)
    if now - record.taken_at > timedelta(seconds=ttl_s) or record.taken_at > now:
        return None
    return record.model_copy(update={"cached": True})


def store_baseline(path: Path, record: BaselineRecord) -> None:
    """Write ``record`` to the cache atomically; a cache that cannot be written only warns."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(record.model_dump_json(indent=2), encoding="utf-8")
        os.replace(temporary, path)
    except OSError as e:
        logger.warning("cannot cache the idle baseline at %s: %s", path, e)


def _separate_windows(
    meters: Sequence[EnergyMeter], seconds: float, count: int, sleep: Callable[[float], None]
) -> list[list[EnergyReading]]:
    """``count`` windows one after the other (for meters that cannot read mid-window)."""
    windows = []
    for _ in range(count):
        start_meters(meters)
        try:
            sleep(seconds / count)
        except BaseException:
            abandon_meters(meters)
            raise
        windows.append(stop_meters(meters))
    return windows


def _lapped_window(
    meters: Sequence[EnergyMeter], seconds: float, count: int, sleep: Callable[[float], None]
) -> list[list[EnergyReading]]:
    """One window read at ``count`` laps: sub-windows with no gap and a single pair of edges,
    so each sub-window's power is not quantised at edges of its own."""
    lappers = [meter for meter in meters if isinstance(meter, LapsMidWindow)]
    if len(lappers) != len(meters):
        raise EnergyMeterError("a meter of a lapped baseline window cannot read mid-window")
    start_meters(meters)
    try:
        previous: list[EnergyReading] | None = None
        windows = []
        for _ in range(count):
            sleep(seconds / count)
            laps = [meter.lap() for meter in lappers]
            if previous is None:
                windows.append(laps)
            else:
                windows.append([reading_between(a, b) for a, b in zip(previous, laps, strict=True)])
            previous = laps
    except BaseException:
        abandon_meters(meters)
        raise
    stop_meters(meters)
    return windows


def _length(seconds: float, floor_s: float, count: int, lapped: bool) -> tuple[float, str | None]:
    """The baseline's length: ``seconds``, lengthened so that each window with edges of its
    own (the one lapped window, or each separate one) lasts at least ``floor_s``."""
    needed = floor_s if lapped else count * floor_s
    if seconds >= needed:
        return seconds, None
    what = "its window" if lapped else f"each of its {count} windows"
    return needed, (
        f"baseline lengthened from {seconds:g} s to {needed:g} s so that {what} lasts at least "
        f"{floor_s:g} s (20 update periods of the slowest meter)"
    )


def measure_baseline(
    meters: Sequence[EnergyMeter],
    *,
    seconds: float,
    assignment: Mapping[str, str],
    subwindows: int = BASELINE_SUBWINDOWS,
    sleep: Callable[[float], None] = time.sleep,
    now: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
    floor_s: float = 0.0,
) -> BaselineRecord:
    """Measure idle power per domain over ``seconds``, as ``subwindows`` windows.

    Meters that all read mid-window (``lap``) measure one window read at each sub-window's
    end; otherwise (CodeCarbon, NVML on a GPU without an energy counter) the sub-windows are
    measured one after the other. Whatever fails, no meter's window is left open.

    Args:
        meters: The session's meters.
        seconds: Total idle time asked for.
        assignment: The meter each domain is taken from.
        subwindows: Windows the time is split into (their powers give the spread).
        sleep: How to wait while idle.
        now: Wall-clock time of the measurement.
        floor_s: The shortest a window with edges of its own may last (20 update periods of
            the slowest meter); ``seconds`` is lengthened to meet it, with a note.

    Returns:
        Idle power, its standard deviation and relative spread per domain a meter measured in
        every sub-window; domains without a figure are named in the notes.

    Raises:
        EnergyMeterError: A meter failed.
    """
    taken_at = now()
    lapped = all(reads_mid_window(meter) for meter in meters)
    length, lengthened = _length(seconds, floor_s, subwindows, lapped)
    measure = _lapped_window if lapped else _separate_windows
    windows = measure(meters, length, subwindows, sleep)
    domains, missing = _idle_domains(windows, assignment)
    notes = [f"{domain}: no idle power ({why})" for domain, why in missing.items()]
    if lengthened is not None:
        notes.append(lengthened)
    return BaselineRecord(
        domains=domains,
        taken_at=taken_at,
        seconds=length,
        cached=False,
        idle_temperature_c=device_temperatures(meters),
        notes=notes,
    )


def _idle_domains(
    windows: Sequence[Sequence[EnergyReading]], assignment: Mapping[str, str]
) -> tuple[dict[str, BaselineDomain], dict[str, str]]:
    """Idle power per domain over the sub-windows, and why the others have none."""
    powers: dict[str, list[float]] = {domain: [] for domain in assignment}
    energy: dict[str, float] = dict.fromkeys(assignment, 0.0)
    time_s: dict[str, float] = dict.fromkeys(assignment, 0.0)
    sources: dict[str, str] = {}
    missing: dict[str, str] = {}
    for readings in windows:
        by_meter = {reading.meter: reading for reading in readings}
        for domain, meter in assignment.items():
            reading = by_meter.get(meter)
            got = reading.domains.get(domain) if reading is not None else None
            if reading is None or got is None or got.energy_j is None or reading.duration_s <= 0:
                why = got.reason if got is not None and got.reason else "not measured"
                missing.setdefault(domain, f"{meter}: {why}")
                continue
            powers[domain].append(got.energy_j / reading.duration_s)
            energy[domain] += got.energy_j
            time_s[domain] += reading.duration_s
            sources[domain] = got.source
    domains: dict[str, BaselineDomain] = {}
    for domain, meter in assignment.items():
        if domain in missing or not powers[domain]:
            continue
        mean = energy[domain] / time_s[domain]
        stdev = statistics.stdev(powers[domain]) if len(powers[domain]) > 1 else None
        domains[domain] = BaselineDomain(
            idle_power_w=mean,
            stdev_w=stdev,
            relative_spread=stdev / mean if stdev is not None and mean > 0 else None,
            seconds=time_s[domain],
            windows=len(powers[domain]),
            source=sources[domain],
            meter=meter,
        )
    return domains, missing


def idle_power(
    baseline: BaselineRecord | None, domains: Sequence[str], *, problem: str | None = None
) -> tuple[float | None, str | None]:
    """Total idle power of ``domains`` (the domains a window covered).

    Args:
        baseline: The session's idle baseline, if there is one.
        domains: The domains the window covered.
        problem: Why there is no baseline, where known (it failed, was interrupted...).

    Returns:
        The summed idle power and None, or None and why it is unknown.
    """
    if baseline is None:
        return None, problem or "no idle baseline (disabled with --llem-baseline-s=0, or no meter)"
    if not domains:
        return None, "no energy domain measured"
    missing = [d for d in domains if d not in baseline.domains]
    if missing:
        return None, f"no idle baseline for {', '.join(missing)}"
    return math.fsum(baseline.domains[d].idle_power_w for d in domains), None

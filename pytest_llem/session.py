"""Session state of a pytest-llem run: the backend cache, the meters, the idle baseline and the
cases recorded so far.

Built once in ``pytest_configure`` (from the options, :mod:`pytest_llem.options`) and kept in
``config.stash``; the ``llem`` fixture reads it, the session-finish hook turns the recorded cases
into the run record.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from pytest_llem.config.meter_names import METER_CHOICES
from pytest_llem.config.models import CaseConfig
from pytest_llem.exceptions import EnergyMeterError, LlemError, MeterUnavailableError
from pytest_llem.options.model import EnergyOptions, LlemOptions
from pytest_llem.results.models import (
    BaselineRecord,
    CaseRecord,
    LoadRecord,
    MeterRecord,
    RunRecord,
    ShardManifest,
)

if TYPE_CHECKING:
    from pytest_llem.backends.base import Backend, BackendInfo
    from pytest_llem.meters.base import EnergyMeter, MeterInfo
    from pytest_llem.meters.registry import DomainAssignment

__all__ = [
    "METER_NAMES",
    "BackendCache",
    "BaselineState",
    "LlemSession",
    "MeterState",
    "describe_error",
    "meter_record",
]

logger = logging.getLogger("pytest_llem")

METER_NAMES: tuple[str, ...] = METER_CHOICES


class BackendCache:
    """Keeps one loaded backend and hands it to every case with the same load configuration.

    A case with another load configuration closes the resident backend first, so only one model
    is in memory at a time. Load time is spent here, never inside a measured window.
    """

    def __init__(self, make: Callable[[CaseConfig], Backend]) -> None:
        self._make = make
        self._key: object = None
        self._backend: Backend | None = None
        self._info: BackendInfo | None = None

    def get(self, case: CaseConfig) -> tuple[Backend, BackendInfo, LoadRecord]:
        """The backend for ``case``, loading it unless the resident one fits."""
        from pytest_llem.backends.base import load_key

        key = load_key(case)
        if self._backend is not None and self._info is not None and key == self._key:
            return self._backend, self._info, LoadRecord(reused=True, seconds=0.0)
        self.close()
        backend = self._make(case)
        started = time.perf_counter()
        try:
            info = backend.load()
        except BaseException:
            _close_quietly(backend)
            raise
        seconds = time.perf_counter() - started
        self._key, self._backend, self._info = key, backend, info
        return backend, info, LoadRecord(reused=False, seconds=seconds)

    def close(self) -> None:
        """Release the resident backend, if any."""
        if self._backend is not None:
            _close_quietly(self._backend)
        self._key, self._backend, self._info = None, None, None


def _close_quietly(closable: Backend | EnergyMeter) -> None:
    try:
        closable.close()
    except Exception:  # a failing close must not hide the error that led here
        logger.warning("closing %s failed", getattr(closable, "name", closable), exc_info=True)


def meter_record(info: MeterInfo) -> MeterRecord:
    """A meter's description as written into the run record."""
    return MeterRecord(
        name=info.name,
        domains=list(info.domains),
        sources=dict(info.sources),
        update_period_s=info.resolution.update_period_s,
        update_period_measured=info.resolution.update_period_measured,
        resolution_note=info.resolution.note,
        energy_quantum_j=info.resolution.energy_quantum_j,
        used_for=list(info.domains),
        devices=list(info.devices),
        selected_because=info.selected_because,
        details=dict(info.details),
    )


class MeterState:
    """The session's meters, created on first use so collection alone never touches hardware.

    ``requested`` is ``auto``, ``none`` or one or more meter names joined with commas. Each
    domain is taken from one meter only (:func:`~pytest_llem.meters.registry.assign_domains`).
    With ``auto`` a meter that fails to start is dropped (``none`` when none is left) and the
    record says why; a meter the user named that cannot measure here makes every case skip with
    the reason.
    """

    def __init__(
        self,
        requested: str,
        *,
        make: Callable[[str], EnergyMeter],
        select_auto: Callable[[], tuple[str, str]],
    ) -> None:
        self.requested = requested
        self._make = make
        self._select_auto = select_auto
        self._meters: list[EnergyMeter] | None = None
        self._records: list[MeterRecord] = []
        self._unavailable: MeterUnavailableError | None = None
        self._assignment: DomainAssignment | None = None

    @property
    def assignment(self) -> DomainAssignment:
        """Which meter supplies each domain (empty until ``get`` creates the meters)."""
        if self._assignment is None:
            from pytest_llem.meters.registry import DomainAssignment

            self._assignment = DomainAssignment()
        return self._assignment

    def get(self) -> tuple[list[EnergyMeter], list[MeterRecord]]:
        """The meters and their records. Raises MeterUnavailableError for a named meter that
        cannot measure on this machine."""
        if self._unavailable is not None:
            raise self._unavailable
        if self._meters is None:
            self._meters, why = self._create()
            from pytest_llem.meters.registry import assign_domains

            infos = [meter.info() for meter in self._meters]
            self._assignment = assign_domains(infos)
            self._records = []
            for info in infos:
                record = meter_record(info)
                record.selected_because = why
                record.used_for = self.assignment.used_for(info.name)
                record.notes = [n for n in self.assignment.notes if f"{info.name}'s " in n]
                self._records.append(record)
        return self._meters, self._records

    def _create_named(self, names: Sequence[str]) -> list[EnergyMeter]:
        meters: list[EnergyMeter] = []
        try:
            for name in names:
                meters.append(self._make(name))
        except BaseException:
            for meter in meters:
                _close_quietly(meter)
            raise
        return meters

    def _create(self) -> tuple[list[EnergyMeter], str]:
        if self.requested != "auto":
            try:
                meters = self._create_named(self.requested.split(","))
            except MeterUnavailableError as e:
                self._unavailable = e
                raise
            return meters, f"requested with --llem-meter={self.requested}"
        names, why = self._select_auto()
        meters = []
        for name in names.split(","):
            try:
                meters.append(self._make(name))
            except MeterUnavailableError as e:
                logger.warning("meter %s could not start (%s)", name, e.reason)
                why = f"{why}; but {name} failed to start: {e.reason}"
        if not meters:
            return [self._make("none")], f"auto: {why}"
        return meters, f"auto: {why}"

    def close(self) -> None:
        """Release every meter."""
        for meter in self._meters or []:
            _close_quietly(meter)
        self._meters = None


class BaselineState:
    """The session's idle baseline: measured (or taken from the cache) before the first case.

    ``record`` is None when ``--llem-baseline-s=0``, when no meter covers a domain, or when
    measuring failed; ``problem`` then says why, and every case without a baseline carries it.
    A measurement that was interrupted (Ctrl-C, ``--llem-timeout-s``) is noted and re-raised,
    and the next case measures it again (once: a second interruption leaves the session
    without it, saying so).
    """

    #: Tries at an interrupted baseline before the session goes without one.
    ATTEMPTS = 2

    def __init__(
        self,
        options: EnergyOptions,
        progress: Callable[[str], None],
        *,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.options = options
        self._progress = progress
        self._sleep = sleep
        self._done = False
        self._interrupted = 0
        self.record: BaselineRecord | None = None
        self.problem: str | None = None

    def get(
        self,
        meters: Sequence[EnergyMeter],
        records: Sequence[MeterRecord],
        assignment: DomainAssignment,
    ) -> BaselineRecord | None:
        """The baseline, measuring it on the first call (again after an interruption).

        Raises:
            BaseException: Whatever interrupted the measurement (after noting it).
        """
        if self._done:
            return self.record
        if self.options.baseline_s <= 0 or not assignment.meters:
            self._done = True
            self.problem = (
                "idle baseline disabled (--llem-baseline-s=0)"
                if self.options.baseline_s <= 0
                else "no energy meter: no idle baseline"
            )
            return None
        from pytest_llem.harness.baseline import (
            baseline_cache_key,
            baseline_cache_path,
            load_cached_baseline,
            store_baseline,
        )

        key = baseline_cache_key(records)
        path = baseline_cache_path(key)
        cached = None if self.options.baseline_forced else load_cached_baseline(path)
        record = cached if cached is not None else self._measure(meters, records, assignment)
        self._done = True
        if record is None:
            return None
        self.problem = None
        self.record = record if cached is not None else record.model_copy(update={"cache_key": key})
        if cached is None:
            store_baseline(path, self.record)
        return self.record

    def _measure(
        self,
        meters: Sequence[EnergyMeter],
        records: Sequence[MeterRecord],
        assignment: DomainAssignment,
    ) -> BaselineRecord | None:
        """Measure idle power; None (with ``problem`` set) when a meter failed."""
        from pytest_llem.harness.baseline import measure_baseline
        from pytest_llem.harness.runner import WindowPolicy

        floor = WindowPolicy.for_meters(
            min_window_s=0.0, update_periods=[r.update_period_s for r in records if r.used_for]
        ).floor_s
        seconds = self.options.baseline_s
        self._progress(
            f"measuring idle power for {max(seconds, floor):g} s or more (baseline; cached "
            "for an hour; --llem-baseline-s=0 skips it)"
        )
        try:
            return measure_baseline(
                meters,
                seconds=seconds,
                assignment=assignment.meters,
                sleep=self._sleep,
                floor_s=floor,
            )
        except EnergyMeterError as e:
            self.problem = f"the idle baseline could not be measured: {e}"
            logger.warning("llem: %s", self.problem)
            return None
        except BaseException as e:
            self._interrupted += 1
            last = self._interrupted >= self.ATTEMPTS
            then = (
                "no dynamic energy in this session" if last else "the next case measures it again"
            )
            what = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            self.problem = f"the idle baseline was interrupted ({what}); {then}"
            self._done = last
            logger.warning("llem: %s", self.problem)
            raise


@dataclass
class LlemSession:
    """Everything the plugin keeps for one pytest session."""

    options: LlemOptions
    backends: BackendCache
    meters: MeterState
    progress: Callable[[str], None]
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    started_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    cases: list[CaseRecord] = field(default_factory=list)
    record: RunRecord | None = None
    finish: Any = None
    journal: Any = None
    llem_items: set[str] = field(default_factory=set)
    shard: ShardManifest | None = None
    store_error: str | None = None
    journal_error: str | None = None
    baseline: BaselineState | None = None

    def close(self) -> None:
        """Release the backend and the meters."""
        self.backends.close()
        self.meters.close()


def describe_error(error: BaseException) -> str:
    """``Type: message`` for a failure line."""
    kind = type(error).__name__ if isinstance(error, LlemError) else f"{type(error).__name__}"
    return f"{kind}: {error}"

"""The ``llem`` fixture: resolve a case's config, run it on the session's backend and meters,
and record the result for the run record.

A test calls ``llem.run(**overrides)`` and gets a :class:`~pytest_llem.results.CaseResult`;
the result is also attached to the test's report (``user_properties``), so it reaches the run
record whether the test then passes, fails, or runs on an xdist worker.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, NoReturn

import pytest

from pytest_llem.collection import (
    budget_rules,
    case_node_id,
    overruled_overrides,
    resolve_for,
    skipped_params,
    sweep_case_of,
    sweep_conflict,
    sweep_mismatch,
)
from pytest_llem.config.models import CaseConfig
from pytest_llem.config.profiles import resolve_profile_values
from pytest_llem.exceptions import ConfigurationError, LlemError
from pytest_llem.interop import record_benchmark
from pytest_llem.options import StoreOptions
from pytest_llem.results.models import CaseError, CaseRecord, CaseResult, RunRecord
from pytest_llem.session import LlemSession
from pytest_llem.sweep import SweepCase
from pytest_llem.workers import SHARED_DOMAINS, worker_info

if TYPE_CHECKING:
    from collections.abc import Sequence

    from pytest_llem.harness.capacity import CapacityAnswer
    from pytest_llem.harness.case import CaseOutcome, CaseRunner
    from pytest_llem.harness.search import SearchAnswer
    from pytest_llem.searching import Points

__all__ = [
    "CASE_PROPERTY",
    "CASE_START_PROPERTY",
    "SESSION_KEY",
    "LlemFixture",
    "case_runner",
    "llem",
    "llem_sweep_params",
    "record_test_failure",
    "skipped_sweep_case",
    "started_case",
]

CASE_PROPERTY = "llem_case"
#: The report property that carries a started case's facts from a worker to the controller.
CASE_START_PROPERTY = "llem_case_start"
SESSION_KEY = pytest.StashKey[LlemSession]()


class LlemFixture:
    """What the ``llem`` fixture gives a test: its resolved config and ``run()``.

    The case itself runs in the harness (:class:`~pytest_llem.harness.case.CaseRunner`); this
    class resolves the case from the test's markers and options, and maps what became of it to
    pytest: a skip with the reason, a failure, the record in ``user_properties``.
    """

    def __init__(
        self,
        item: pytest.Item,
        session: LlemSession,
        sweep: SweepCase | None = None,
        request: pytest.FixtureRequest | None = None,
    ) -> None:
        self._item = item
        self._request = request
        self._session = session
        self._sweep = sweep
        self._runs = 0

    @property
    def profile(self) -> str:
        """The run's workload profile: ``smoke``, ``standard`` or ``full``."""
        return self._session.options.profile.name

    @property
    def config(self) -> CaseConfig:
        """The case's config as resolved from markers, ini and command line."""
        return resolve_for(self._item, self._session, {}, self._sweep)

    def run(self, **overrides: Any) -> CaseResult:
        """Run the benchmark case and return its result.

        Keyword arguments override the ``llem`` markers and a marker sweep's values; the ini
        keys and the command line (their sweeps included) still win, and an override that
        contradicts a marker sweep's value in the test id fails the case. The result is
        recorded for the run record automatically.
        """
        overrides = resolve_profile_values(overrides, self.profile)
        case, base = self._resolve(overrides, self._identity())
        outcome = self._measure(case, base)
        self._record(outcome.record)
        if outcome.exception is not None:
            raise outcome.exception
        if outcome.skip_reason is not None:
            pytest.skip(outcome.skip_reason)
        if outcome.result is not None and self._request is not None and self._runs == 1:
            record_benchmark(self._request, outcome.result)
        if outcome.failure is not None:
            pytest.fail(outcome.failure, pytrace=False)
        assert outcome.result is not None  # a case neither skipped nor failed was measured
        return outcome.result

    def _measure(self, case: CaseConfig, base: CaseRecord) -> CaseOutcome:
        """Run the case once, or N times under ``--llem-calibrate=N``."""
        runner = case_runner(self._session)
        budget = budget_rules(self._item, self.profile)
        store = self._session.options.store
        if store is not None and store.calibrate:
            from pytest_llem.harness.calibration import run_calibrated

            return run_calibrated(runner, case, base, runs=store.calibrate, budget=budget)
        return runner.run(case, base, budget=budget)

    def capacity(
        self,
        *,
        slo: dict[str, float],
        good_fraction: float = 0.9,
        rate: tuple[float, float] | None = None,
        tolerance: float = 0.05,
        max_measurements: int = 30,
        **overrides: Any,
    ) -> CapacityAnswer:
        """The highest arrival rate at which at least ``good_fraction`` of requests meet ``slo``.

        The case runs in the ``server`` scenario at each rate tried (same seeded arrivals, same
        requests); see :func:`pytest_llem.harness.capacity.find_capacity` for the stopping
        rules. Each rate is recorded as a case of its own; this test's case gets the result at
        the answer and the ``capacity`` section.

        Args:
            slo: Bounds in ms: ``ttft_ms``, ``tpot_ms``, ``e2e_ms``.
            good_fraction: Share of requests that must meet every bound.
            rate: (low, high) requests/s to search between; None: bracket from the case's
                ``traffic.rate`` by doubling or halving.
            tolerance: Relative width of the final bracket.
            max_measurements: The most measurements.
            **overrides: Case parameters, as for :meth:`run`.

        Returns:
            ``rate_rps``, ``good_fraction``, ``result`` (the CaseResult at that rate) and
            ``tried`` (each rate with its good fraction and whether it saturated).
        """
        from pytest_llem.harness.search import PointFailedError
        from pytest_llem.searching import run_capacity

        points, base = self._points({**overrides, "scenario": "server"})
        try:
            return run_capacity(
                points,
                base,
                overrides,
                slo=slo,
                good_fraction=good_fraction,
                rate=rate,
                tolerance=tolerance,
                max_measurements=max_measurements,
            )
        except (ConfigurationError, PointFailedError) as e:
            problem = str(e)
        _fail("llem.capacity", problem)  # outside the except: no chained traceback

    def search(
        self,
        *,
        space: dict[str, Sequence[Any]],
        minimize: str | None = None,
        maximize: str | None = None,
        subject_to: dict[str, float] | None = None,
        budget: int | None = None,
        frontier: bool = False,
        monotone: Sequence[str] | None = None,
        screen: bool = False,
        **overrides: Any,
    ) -> SearchAnswer:
        """The configuration of ``space`` that minimises (or maximises) a metric under bounds.

        Fewer points than the grid are evaluated (:func:`pytest_llem.harness.search.find_best`);
        each is a case of its own, and this test's case gets the best point's result and the
        ``search`` section.

        Args:
            space: Parameter path -> values, e.g. ``{"batch_size": [1, 2, 4, 8, 16]}``.
            minimize: The metric to minimise (default ``energy_per_output_token_j``).
            maximize: The metric to maximise instead.
            subject_to: Bounds, e.g. ``{"ttft_ms.p99": 500}`` (a lower-is-better metric at most
                its limit, a higher-is-better one at least).
            budget: The most evaluations (None: no cap).
            frontier: Evaluate every point not proven infeasible, for the full frontier.
            monotone: Axes along which more is more load (default: batch_size, traffic.rate,
                traffic.max_concurrency); ``()`` assumes nothing.
            screen: Rank the lines on one window each first and search only the better half
                in full (successive halving).
            **overrides: Case parameters, as for :meth:`run`.

        Returns:
            ``best`` (``params``, ``objective``, ``result``), ``frontier``, ``evaluated``.
        """
        from pytest_llem.harness.search import DEFAULT_MONOTONE
        from pytest_llem.searching import run_search

        if minimize is not None and maximize is not None:
            pytest.fail("llem.search: give minimize or maximize, not both", pytrace=False)
        objective = maximize or minimize or "energy_per_output_token_j"
        points, _ = self._points(overrides)
        try:
            return run_search(
                points,
                overrides,
                space=space,
                objective=objective,
                direction="maximize" if maximize is not None else "minimize",
                subject_to=subject_to or {},
                monotone=DEFAULT_MONOTONE if monotone is None else monotone,
                budget=budget,
                frontier=frontier,
                screen=screen,
            )
        except ConfigurationError as e:
            problem = str(e)
        _fail("llem.search", problem)  # outside the except: no chained traceback

    def _identity(self) -> CaseRecord:
        """The next case's id and name: the node id, then ``#2``, ``#3`` for later cases."""
        self._runs += 1
        node_id = case_node_id(self._item)
        case_id = node_id if self._runs == 1 else f"{node_id}#{self._runs}"
        name = self._item.name if self._runs == 1 else f"{self._item.name}#{self._runs}"
        return CaseRecord(id=case_id, name=name)

    def _points(self, overrides: dict[str, Any]) -> tuple[Points, CaseConfig]:
        """How a search measures and records its points, and the case as the test resolves."""
        from pytest_llem.backends.support.failures import says_out_of_memory
        from pytest_llem.harness.search import PointFailedError
        from pytest_llem.searching import Points

        identity = self._identity()
        overrides = resolve_profile_values(overrides, self.profile)
        base, _ = self._resolve(overrides, identity)

        def resolve(
            point: dict[str, Any], case_id: str, name: str
        ) -> tuple[CaseConfig, CaseRecord]:
            return self._resolve(point, CaseRecord(id=case_id, name=name))

        def run(case: CaseConfig, start: CaseRecord) -> tuple[CaseResult, CaseRecord]:
            outcome = case_runner(self._session).run(case, start)
            if outcome.result is not None and outcome.failure is None:
                return outcome.result, outcome.record
            self._record(outcome.record)
            if outcome.exception is not None:
                raise outcome.exception
            if outcome.skip_reason is not None:
                pytest.skip(outcome.skip_reason)
            error = outcome.record.error
            oom = error is not None and (
                error.type == "RetryableError" or says_out_of_memory(error.message)
            )
            message = f"{start.name}: {outcome.failure}"
            raise PointFailedError(message, out_of_memory=oom, case_id=start.id)

        budgeted = bool(budget_rules(self._item, self.profile))
        points = Points(resolve, run, self._record, identity.id, identity.name, budgeted=budgeted)
        return points, base

    def _resolve(
        self, overrides: dict[str, Any], identity: CaseRecord
    ) -> tuple[CaseConfig, CaseRecord]:
        """The case's config and the start of its record; a config that cannot run under its
        test id is recorded as failed and fails the test."""
        from pytest_llem.harness.case import case_error, start_record

        swept = dict(self._sweep.values) if self._sweep is not None else {}
        try:
            conflict = sweep_conflict(overrides, self._sweep)
            if conflict is not None:
                raise ConfigurationError(conflict)
            case = resolve_for(self._item, self._session, overrides, self._sweep)
            mismatch = sweep_mismatch(case, self._sweep)
            if mismatch is not None:
                raise ConfigurationError(mismatch)
        except ConfigurationError as e:
            failed = {"outcome": "failed", "error": case_error(e), "sweep": swept}
            self._record(identity.model_copy(update=failed))
            pytest.fail(f"invalid llem parameters: {e}", pytrace=False)
        base = start_record(
            case,
            case_id=identity.id,
            name=identity.name,
            sweep=swept,
            notes=overruled_overrides(overrides, self._session, self._sweep),
            **_placement(self._item),
        )
        return case, base

    def _record(self, record: CaseRecord) -> None:
        self._item.user_properties.append((CASE_PROPERTY, record.model_dump(mode="json")))


def _placement(item: pytest.Item) -> dict[str, Any]:
    """Where a case runs: its xdist worker, the GPUs it sees, the domains it shares."""
    worker = worker_info(getattr(item.config, "workerinput", None))
    return {
        "worker": worker.id,
        "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "shared_domains": list(SHARED_DOMAINS) if worker.count > 1 else [],
    }


def case_runner(session: LlemSession) -> CaseRunner:
    """A case runner on the session's backend cache, meters and baseline, under its options."""
    from pytest_llem.harness.case import CaseRunner, CaseSettings
    from pytest_llem.results.drift import DEFAULT_DRIFT_MARGIN

    options = session.options
    energy = options.energy
    store = options.store
    settings = CaseSettings(
        isolation=options.isolation,
        min_window_s=energy.min_window_s,
        cooldown=energy.cooldown.mode,
        cooldown_s=energy.cooldown.seconds,
        timeout_s=options.timeout_s,
        gate_estimated=store.gate_estimated if store is not None else False,
        drift_margin=store.drift_margin if store is not None else DEFAULT_DRIFT_MARGIN,
        adaptive=options.adaptive,
        gate_baseline=_gate_baseline(store),
        gate_rules=tuple(store.rules) if store is not None else (),
    )
    return CaseRunner(
        backends=session.backends,
        meters=session.meters,
        baseline=session.baseline,
        settings=settings,
        progress=session.progress,
    )


def _gate_baseline(store: StoreOptions | None) -> RunRecord | None:
    """The baseline an adaptive case measures against until its verdicts are decided: the
    ``--llem-compare`` run when ``--llem-fail-on`` gates (None otherwise)."""
    if store is None or store.compare_baseline is None or not store.rules:
        return None
    return store.compare_baseline.record


def record_test_failure(properties: list[tuple[str, object]], error: CaseError) -> None:
    """Give the cases a test recorded as passed the error that then failed the test (an
    ``assert`` after ``llem.run``, say): the record must not show a failed case without why.

    Args:
        properties: The test report's ``user_properties``; its case entries are updated.
        error: The failure's type and one-line message.
    """
    for name, value in properties:
        if name != CASE_PROPERTY or not isinstance(value, dict):
            continue
        if value.get("outcome") == "passed" and value.get("error") is None:
            value["outcome"] = "failed"
            value["error"] = error.model_dump(mode="json")


def skipped_sweep_case(item: pytest.Item, session: LlemSession) -> dict[str, Any] | None:
    """The run-record entry of a sweep combination skipped at collection (a rule forbids it, or
    it needs a GPU that is not there), or None when ``item`` is no such combination.

    It never reaches ``llem.run``, so without this the grid would have a hole in every report.
    """
    sweep = sweep_case_of(item)
    if sweep is None or sweep.skip_reason is None:
        return None
    params = skipped_params(item, session, sweep)
    record = CaseRecord(
        id=case_node_id(item),
        name=item.name,
        outcome="skipped",
        params=params,
        backend=str(params.get("backend") or ""),
        model=str(params.get("model") or ""),
        sweep=dict(sweep.values),
        notes=[sweep.skip_reason],
    )
    return record.model_dump(mode="json")


def started_case(item: pytest.Item, session: LlemSession) -> dict[str, Any] | None:
    """What an xdist worker tells the controller about an llem case as it starts (on the setup
    report), so that a case whose worker dies while running it can still be recorded: its id,
    name, parameters as its markers and the options resolve them, sweep values and placement.

    Returns:
        The start of the case's record (JSON), or None when ``item`` is no llem test.
    """
    if "llem" not in getattr(item, "fixturenames", ()):
        return None
    sweep = sweep_case_of(item)
    try:
        params = resolve_for(item, session, {}, sweep).model_dump(mode="json")
    except LlemError:
        params = {}  # llem.run() fails such a case with the reason
    record = CaseRecord(
        id=case_node_id(item),
        name=item.name,
        params=params,
        backend=str(params.get("backend") or ""),
        model=str(params.get("model") or ""),
        sweep=dict(sweep.values) if sweep is not None else {},
        **_placement(item),
    )
    return record.model_dump(mode="json", exclude_defaults=True)


@pytest.fixture
def llem_sweep_params(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The values of this test's sweep combination, by parameter path (empty without a sweep).

    ``@pytest.mark.llem_sweep``, ``--llem-sweep`` and the ``llem_sweep`` ini key parametrize
    it; the ``llem`` fixture applies them.
    """
    case = getattr(request, "param", None)
    return dict(case.values) if isinstance(case, SweepCase) else {}


@pytest.fixture
def llem(request: pytest.FixtureRequest, llem_sweep_params: dict[str, Any]) -> LlemFixture:
    """Run an LLM inference energy benchmark: ``result = llem.run()``.

    Parameters come from ``@pytest.mark.llem(...)``, ``@pytest.mark.llem_sweep(...)``,
    ``llem.run(**overrides)``, the ini keys and the ``--llem-*`` options.
    ``result["energy_per_output_token_j"].median`` and friends give each metric's summary over
    the measured repetitions.
    """
    del llem_sweep_params  # requested so a sweep parametrizes it; the item keeps the case
    session = request.config.stash[SESSION_KEY]
    item = request.node
    assert isinstance(item, pytest.Item)
    return LlemFixture(item, session, sweep_case_of(item), request)


def _fail(method: str, problem: str) -> NoReturn:
    """Fail the test with ``problem``, named by the fixture method once."""
    message = problem if problem.startswith(f"{method} ") else f"{method}: {problem}"
    pytest.fail(message, pytrace=False)

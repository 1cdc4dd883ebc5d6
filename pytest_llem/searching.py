"""``llem.capacity`` and ``llem.search``: the two searches a test runs from the ``llem``
fixture, on top of the harness's search algorithms (``harness.capacity``, ``harness.search``).

Each point the search measures runs through the case runner like ``llem.run`` and is recorded
as a case of its own (id: the test's case id, ``@`` and the point's values; ``part_of`` names
the test's case); the test's own case is recorded last with the result at the answer and the
``capacity`` or ``search`` section.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pytest_llem.config.models import CaseConfig
from pytest_llem.exceptions import ConfigurationError
from pytest_llem.harness.capacity import CapacityAnswer, find_capacity
from pytest_llem.harness.search import DEFAULT_MONOTONE, SearchAnswer, find_best
from pytest_llem.results.catalogue import SLO_BOUNDS
from pytest_llem.results.models import CaseError, CaseRecord, CaseResult

__all__ = ["Points", "run_capacity", "run_search"]

#: Windows of a screening measurement (``llem.search(screen=True)``).
SCREEN_REPEAT = 1
#: A budget marker is not applied to the points of a search; the record says so.
BUDGET_NOTE = (
    "llem_budget is not checked by llem.capacity or llem.search: assert on the answer's result"
)


@dataclass
class Points:
    """How the searches measure a point and record cases (the fixture supplies these).

    Attributes:
        resolve: The case with these overrides, and the start of its record as the case
            ``(id, name)`` (a test whose case cannot resolve fails, as with ``llem.run``).
        run: Runs a resolved case; returns its result and record (the test fails or skips as
            with ``llem.run``; a case that failed raises
            :class:`~pytest_llem.harness.search.PointFailedError` after recording it).
        record: Adds a case record to the run record.
        case_id: The test's case id; points are ``case_id@values``.
        name: The test's case name.
        budgeted: Whether the test has budget rules (they are not applied; a note says so).
    """

    resolve: Callable[[dict[str, Any], str, str], tuple[CaseConfig, CaseRecord]]
    run: Callable[[CaseConfig, CaseRecord], tuple[CaseResult, CaseRecord]]
    record: Callable[[CaseRecord], None]
    case_id: str
    name: str
    budgeted: bool = False

    def point(
        self, overrides: dict[str, Any], values: Mapping[str, Any], label: str
    ) -> tuple[CaseResult, CaseRecord]:
        """Measure and record one point, after checking that its values reached the case.

        Raises:
            ConfigurationError: The command line or ini fixes one of the values.
        """
        case, start = self.resolve(overrides, f"{self.case_id}@{label}", f"{self.name}@{label}")
        dumped = case.model_dump(mode="json")
        for path, value in values.items():
            got = _at(dumped, path)
            if got != value:
                raise ConfigurationError(
                    f"{path} is fixed at {got!r} by the command line or ini; the search cannot "
                    f"set it to {value!r}"
                )
        start = start.model_copy(
            update={"part_of": self.case_id, "sweep": {**start.sweep, **values}}
        )
        result, record = self.run(case, start)
        record = record.model_copy(update={"part_of": self.case_id, "sweep": start.sweep})
        self.record(record)
        return result, record

    def finish(self, record: CaseRecord, **section: Any) -> None:
        """Record the test's own case: ``record``'s figures under the test's id, with the
        search's section."""
        notes = [*record.notes, BUDGET_NOTE] if self.budgeted else record.notes
        update = {"id": self.case_id, "name": self.name, "part_of": None, "notes": notes}
        self.record(record.model_copy(update={**update, **section}))


def _at(dumped: Mapping[str, Any], path: str) -> Any:
    value: Any = dumped
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def run_capacity(
    points: Points,
    base: CaseConfig,
    overrides: dict[str, Any],
    *,
    slo: Mapping[str, float],
    good_fraction: float,
    rate: tuple[float, float] | None,
    tolerance: float,
    max_measurements: int,
) -> CapacityAnswer:
    """Run the capacity search for a server case (see :func:`find_capacity`).

    Raises:
        ConfigurationError: An SLO bound that is not ``ttft_ms``, ``tpot_ms`` or ``e2e_ms``,
            or arguments the search cannot work with.
    """
    unknown = sorted(set(slo) - set(SLO_BOUNDS))
    if unknown:
        raise ConfigurationError(
            f"unknown SLO bound {', '.join(unknown)} (use {', '.join(SLO_BOUNDS)})"
        )
    bounds = {f"slo.{name}": float(limit) for name, limit in slo.items()}
    records: dict[float, CaseRecord] = {}

    def measure(rate_rps: float, attempt: int) -> tuple[CaseResult, str | None]:
        seed = base.traffic.seed + attempt
        values = {"traffic.rate": rate_rps, "traffic.seed": seed}
        label = f"rate={rate_rps:.4g}" + (f",seed={seed}" if attempt else "")
        point = {**overrides, "scenario": "server", **bounds, **values}
        result, record = points.point(point, values, label)
        if attempt == 0:
            records[rate_rps] = record
        return result, record.id

    answer = find_capacity(
        measure,
        slo={name: float(limit) for name, limit in slo.items()},
        good_fraction=good_fraction,
        rate=rate,
        start_rps=base.traffic.rate,
        tolerance=tolerance,
        max_measurements=max_measurements,
    )
    shown = answer.rate_rps if answer.rate_rps is not None else answer.tried[0].rate_rps
    points.finish(records[shown], capacity=answer.record)
    return answer


def run_search(
    points: Points,
    overrides: dict[str, Any],
    *,
    space: Mapping[str, Sequence[Any]],
    objective: str,
    direction: str,
    subject_to: Mapping[str, float],
    monotone: Sequence[str] = DEFAULT_MONOTONE,
    budget: int | None = None,
    frontier: bool = False,
    screen: bool = False,
) -> SearchAnswer:
    """Run the configuration search (see :func:`find_best`); with ``screen``, lines are
    ranked on one measured window each first (``repeat=1``; ids end in ``,screen``)."""
    records: dict[str, CaseRecord] = {}

    def evaluate(params: dict[str, Any], *, short: bool = False) -> tuple[CaseResult, str | None]:
        label = ",".join(f"{path}={value}" for path, value in params.items())
        point = {**overrides, **params}
        if short:
            point["repeat"] = SCREEN_REPEAT
            label += ",screen"
        result, record = points.point(point, params, label)
        records[record.id] = record
        return result, record.id

    def screened(params: dict[str, Any]) -> tuple[CaseResult, str | None]:
        return evaluate(params, short=True)

    answer = find_best(
        evaluate,
        space=space,
        objective=objective,
        direction=direction,
        subject_to=subject_to,
        monotone=monotone,
        budget=budget,
        frontier=frontier,
        screen=screened if screen else None,
    )
    measured = [p for p in answer.evaluated if p.case_id in records]
    chosen = answer.best if answer.best is not None else (measured[-1] if measured else None)
    if chosen is None:
        error = CaseError(type="SearchFailed", message="every point evaluated failed")
        empty = CaseRecord(id=points.case_id, name=points.name, outcome="failed", error=error)
        points.finish(empty, search=answer.record)
    else:
        points.finish(records[str(chosen.case_id)], search=answer.record)
    return answer

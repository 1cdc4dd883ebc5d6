"""Search for the configuration that optimises a metric under bounds on others, evaluating
fewer points than the full grid.

Like the capacity search it knows nothing of pytest: ``evaluate(params)`` measures the case
with those parameter values (the ``llem`` fixture runs it through the case runner) and returns
its :class:`~pytest_llem.results.CaseResult`.

How points are skipped. The grid is split into *lines*: the values of the last monotone axis
for each combination of the other axes. Along a monotone axis (``batch_size``,
``traffic.rate``, ``traffic.max_concurrency`` by default: more load) latency bounds only get
harder to meet and efficiency or throughput objectives only get better. So:

- a point that broke a latency bound proves every point with at least as much of every
  monotone axis (the other axes equal) infeasible: those are never evaluated;
- with an objective that improves with load, a line's best is its highest feasible value:
  the top of the line is tried first, then the boundary is bisected (at most
  1 + ceil(log2(n)) evaluations for n values);
- the assumption is checked on what was evaluated: a line where a lower feasible value did
  better than its highest feasible one (beyond the medians' intervals, or by more than 5%
  without them) is evaluated in full below its boundary, and a note says so.

A point whose case fails (``evaluate`` raises :class:`PointFailedError`) is infeasible, and says
why; running out of memory counts like a latency breach (more load, more memory). Other
objectives (a latency, say) are evaluated on every point not proven infeasible. With
``frontier=True`` every point not proven infeasible is evaluated after the best, so that the
frontier is the full grid's. ``budget`` caps the evaluations. Points that share a loaded
model are evaluated one after another (the axes that need a new load change least).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pytest_llem.exceptions import ConfigurationError, LlemError
from pytest_llem.results.catalogue import lookup
from pytest_llem.results.models import CaseResult
from pytest_llem.results.search import FrontierPoint, SearchPoint, SearchRecord

__all__ = [
    "DEFAULT_MONOTONE",
    "Evaluate",
    "Point",
    "PointFailedError",
    "SearchAnswer",
    "find_best",
]

#: Axes along which more means more load (see the module docstring).
DEFAULT_MONOTONE: tuple[str, ...] = ("batch_size", "traffic.rate", "traffic.max_concurrency")
#: Without intervals, a lower point must beat a line's top by this share to break monotonicity.
MONOTONE_SLACK = 0.05
#: The frontier's other axis when no bound is given.
DEFAULT_FRONTIER_METRIC = "e2e_ms.p99"


class PointFailedError(LlemError):
    """A point's case failed (``evaluate`` raises it): the point is infeasible, and when memory
    ran out, so is every point with more of each monotone axis."""

    def __init__(
        self, message: str, *, out_of_memory: bool = False, case_id: str | None = None
    ) -> None:
        super().__init__(message)
        self.out_of_memory = out_of_memory
        self.case_id = case_id


#: Start of a failed point's ``broke`` entry when memory ran out (it grows with load).
OUT_OF_MEMORY = "out of memory"

#: ``evaluate(params)``: the case's result with those values and its point's case id.
Evaluate = Callable[[dict[str, Any]], tuple[CaseResult, str | None]]
Key = tuple[Any, ...]


@dataclass
class Point:
    """One evaluated point as a test sees it: the record's fields and the measured result.

    Attributes:
        params: The searched parameters' values.
        result: Its :class:`CaseResult` (None when its case failed).
        objective: The objective's median (None: unmeasured or failed).
        values: Each bounded metric's median.
        feasible: Whether it met every bound.
        broke: The bounds it broke (``ttft_ms.p99 812 > 500``) or why it failed.
        uncertain: Bounds decided on the median whose interval holds the limit.
        case_id: Its case in the run record.
    """

    params: dict[str, Any]
    result: CaseResult | None
    objective: float | None
    values: dict[str, float | None]
    feasible: bool
    broke: list[str]
    uncertain: list[str]
    case_id: str | None
    screening: bool = False

    @classmethod
    def of(cls, point: SearchPoint, result: CaseResult | None) -> Point:
        """The point of the record's entry and its result."""
        return cls(
            params=dict(point.params),
            result=result,
            objective=point.objective,
            values=dict(point.values),
            feasible=point.feasible,
            broke=list(point.broke),
            uncertain=list(point.uncertain),
            case_id=point.case_id,
            screening=point.screening,
        )


@dataclass
class SearchAnswer:
    """What :func:`find_best` returns (the fixture's ``llem.search`` answer).

    Attributes:
        best: The best feasible point (``params``, ``result``, ``objective``, ...), None when
            none was feasible.
        result: The best point's :class:`CaseResult` (None with no feasible point).
        frontier: The objective / first-bound Pareto points among the feasible evaluated ones.
        evaluated: Every point evaluated, in order, feasible or with the bounds it broke.
        record: The ``search`` section of the case's record.
    """

    best: Point | None
    result: CaseResult | None
    frontier: list[FrontierPoint]
    evaluated: list[Point]
    record: SearchRecord


@dataclass(frozen=True)
class _Problem:
    axes: list[str]
    values: dict[str, list[Any]]
    objective: str
    direction: Literal["minimize", "maximize"]
    subject_to: dict[str, float]
    monotone: list[str]

    def better(self, a: float, b: float) -> bool:
        return a < b if self.direction == "minimize" else a > b

    def params(self, key: Key) -> dict[str, Any]:
        return dict(zip(self.axes, key, strict=True))

    def improves_with_load(self) -> bool:
        entry = lookup(self.objective)
        if entry is None or entry.kind not in ("efficiency", "throughput"):
            return False
        return (entry.better == "lower") == (self.direction == "minimize")


def _problem(
    space: Mapping[str, Sequence[Any]],
    objective: str,
    direction: str,
    subject_to: Mapping[str, float],
    monotone: Sequence[str],
) -> _Problem:
    """The checked search problem; monotone axes sorted ascending."""
    if not space or any(len(list(v)) == 0 for v in space.values()):
        raise ConfigurationError("llem.search needs a space with at least one value per axis")
    if direction not in ("minimize", "maximize"):
        raise ConfigurationError(f"direction must be minimize or maximize, got {direction!r}")
    for name in (objective, *subject_to):
        entry = lookup(name)
        if entry is None or entry.better == "neither":
            raise ConfigurationError(f"llem.search cannot optimise or bound {name!r}")
    values = {axis: list(v) for axis, v in space.items()}
    axes_monotone = [axis for axis in values if axis in monotone]
    for axis in axes_monotone:
        if not all(isinstance(v, (int, float)) for v in values[axis]):
            raise ConfigurationError(f"monotone axis {axis!r} needs numbers, got {values[axis]}")
        values[axis] = sorted(values[axis])
    return _Problem(
        axes=list(values),
        values=values,
        objective=objective,
        direction=direction,  # type: ignore[arg-type]  # checked above
        subject_to=dict(subject_to),
        monotone=axes_monotone,
    )


def _broken(problem: _Problem, result: CaseResult) -> tuple[dict[str, float | None], list[str]]:
    """Each bounded metric's median, and the bounds it broke ('name value > limit')."""
    values: dict[str, float | None] = {}
    broke = []
    for name, limit in problem.subject_to.items():
        value = result.value(name) if name in result else None
        values[name] = value
        entry = lookup(name)
        higher = entry is not None and entry.better == "higher"
        if value is None:
            broke.append(f"{name} unmeasured")
        elif (value < limit) if higher else (value > limit):
            broke.append(f"{name} {value:.4g} {'<' if higher else '>'} {limit:g}")
    return values, broke


def _uncertain(problem: _Problem, result: CaseResult) -> list[str]:
    """The bounds whose limit lies inside the metric's 95% interval of the median: decided on
    the median, but within noise."""
    within = []
    for name, limit in problem.subject_to.items():
        summary = result.metrics.get(name)
        if summary is None or summary.ci95_low is None or summary.ci95_high is None:
            continue
        if summary.ci95_low <= limit <= summary.ci95_high:
            within.append(
                f"{name} [{summary.ci95_low:.4g}, {summary.ci95_high:.4g}] holds {limit:g}"
            )
    return within


@dataclass
class _Search:
    problem: _Problem
    evaluate: Evaluate
    budget: int | None
    points: dict[Key, SearchPoint] = field(default_factory=dict)
    results: dict[Key, CaseResult] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    exhausted: bool = False

    def at(self, key: Key) -> SearchPoint | None:
        """The point evaluated at ``key`` (evaluating it now), None when out of budget."""
        if key in self.points:
            return self.points[key]
        if self.budget is not None and len(self.points) >= self.budget:
            self.exhausted = True
            return None
        params = self.problem.params(key)
        try:
            result, case_id = self.evaluate(params)
        except PointFailedError as e:
            failed = f"{OUT_OF_MEMORY}: {e}" if e.out_of_memory else f"failed: {e}"
            point = SearchPoint(
                params=params, case_id=e.case_id, objective=None, feasible=False, broke=[failed]
            )
            self.points[key] = point
            return point
        values, broke = _broken(self.problem, result)
        uncertain = _uncertain(self.problem, result)
        objective = (
            result.value(self.problem.objective) if self.problem.objective in result else None
        )
        if objective is None:
            broke.append(f"{self.problem.objective} unmeasured")
        point = SearchPoint(
            params=params,
            case_id=case_id,
            objective=objective,
            values=values,
            feasible=not broke,
            broke=broke,
            uncertain=uncertain,
        )
        self.points[key], self.results[key] = point, result
        return point

    def proven_infeasible(self, key: Key) -> bool:
        """Whether an evaluated point that broke only latency bounds has no more of every
        monotone axis than ``key`` and equals it on the other axes."""
        problem = self.problem
        for done, point in self.points.items():
            if point.feasible or not _latency_only(point):
                continue
            if all(
                (a <= b) if axis in problem.monotone else (a == b)
                for axis, a, b in zip(problem.axes, done, key, strict=True)
            ):
                return True
        return False


def _latency_only(point: SearchPoint) -> bool:
    """Whether every bound it broke only gets harder with load: latency, or memory."""
    for broke in point.broke:
        if broke.startswith(f"{OUT_OF_MEMORY}: "):
            continue
        entry = lookup(broke.split(" ", 1)[0])
        if entry is None or entry.kind != "latency" or broke.endswith("unmeasured"):
            return False
    return True


def _grid(problem: _Problem) -> list[Key]:
    """Every point, the axes that need a new model load (``model``, ``dtype``, engine
    settings) changing least, so that points sharing a loaded model run one after another;
    then the axes in the order given."""
    from pytest_llem.config.models import load_fields

    loads = set(load_fields())
    order = sorted(range(len(problem.axes)), key=lambda i: problem.axes[i] not in loads)
    walked = itertools.product(*(problem.values[problem.axes[i]] for i in order))
    grid = []
    for values in walked:
        key: list[Any] = [None] * len(order)
        for i, value in zip(order, values, strict=True):
            key[i] = value
        grid.append(tuple(key))
    return grid


def _lines(problem: _Problem) -> list[list[Key]]:
    """The grid as lines along the last monotone axis (single points without one), in the
    order of :func:`_grid`."""
    grid = _grid(problem)
    if not problem.monotone:
        return [[key] for key in grid]
    along = problem.axes.index(problem.monotone[-1])
    lines: dict[Key, list[Key]] = {}
    for key in grid:
        lines.setdefault(key[:along] + key[along + 1 :], []).append(key)
    return list(lines.values())


def _clearly_better(search: _Search, low: Key, top: Key) -> bool:
    """Whether the lower point beat the line's top beyond noise (intervals, else 5%)."""
    problem = search.problem
    a, b = search.points[low].objective, search.points[top].objective
    if a is None or b is None or not problem.better(a, b):
        return False
    if low not in search.results or top not in search.results:
        return False
    low_m = search.results[low][problem.objective]
    top_m = search.results[top][problem.objective]
    if None not in (low_m.ci95_low, low_m.ci95_high, top_m.ci95_low, top_m.ci95_high):
        if problem.direction == "minimize":
            return float(low_m.ci95_high or 0) < float(top_m.ci95_low or 0)
        return float(low_m.ci95_low or 0) > float(top_m.ci95_high or 0)
    return abs(a - b) > MONOTONE_SLACK * abs(b)


def _exhaust(search: _Search, line: Sequence[Key]) -> None:
    """Evaluate the line upwards, skipping what a latency breach proved infeasible."""
    for key in line:
        if search.proven_infeasible(key):
            continue
        if search.at(key) is None:
            return


def _boundary(search: _Search, candidates: list[Key]) -> int | None:
    """Index of the highest feasible candidate (-1: none), None when the line needs to be
    evaluated in full (a bound other than latency broke, so nothing can be assumed)."""
    top = search.at(candidates[-1])
    if top is None:
        return -1
    if top.feasible:
        return len(candidates) - 1
    if not _latency_only(top):
        return None
    low, high = -1, len(candidates) - 1
    while high - low > 1:
        mid = (low + high) // 2
        point = search.at(candidates[mid])
        if point is None:
            return low
        if point.feasible:
            low = mid
        elif _latency_only(point):
            high = mid
        else:
            return None
    return low


def _search_line(search: _Search, line: list[Key]) -> None:
    """The highest feasible point of a line, checked against what was seen below it."""
    candidates = [key for key in line if not search.proven_infeasible(key)]
    if not candidates:
        return
    if not search.problem.improves_with_load():
        _exhaust(search, candidates)
        return
    boundary = _boundary(search, candidates)
    if boundary is None:
        _exhaust(search, candidates)
        return
    if boundary < 0:
        return
    top = candidates[boundary]
    below = [
        key for key in candidates[:boundary] if key in search.points and search.points[key].feasible
    ]
    if any(_clearly_better(search, key, top) for key in below):
        params = search.problem.params(top)
        search.notes.append(
            f"the objective did not improve along {search.problem.monotone[-1]} up to "
            f"{params}: evaluated that line in full below its boundary"
        )
        _exhaust(search, candidates[:boundary])


def _interval(result: CaseResult, name: str) -> tuple[float, float] | None:
    summary = result[name]
    if summary.ci95_low is None or summary.ci95_high is None:
        return None
    return (float(summary.ci95_low), float(summary.ci95_high))


def _frontier(search: _Search, other: str) -> list[FrontierPoint]:
    """The Pareto points of the objective against ``other`` among the feasible ones."""
    problem = search.problem
    entry = lookup(other)
    other_higher = entry is not None and entry.better == "higher"
    rows = []
    for key, point in search.points.items():
        result = search.results.get(key)
        if result is None:
            continue
        value = result.value(other) if other in result else None
        if point.feasible and point.objective is not None and value is not None:
            rows.append((key, point.objective, value))

    def dominates(a: tuple[Key, float, float], b: tuple[Key, float, float]) -> bool:
        obj_ok = a[1] == b[1] or problem.better(a[1], b[1])
        oth_ok = a[2] == b[2] or ((a[2] > b[2]) if other_higher else (a[2] < b[2]))
        return obj_ok and oth_ok and (a[1], a[2]) != (b[1], b[2])

    front = [row for row in rows if not any(dominates(o, row) for o in rows)]
    front.sort(key=lambda row: row[2])
    return [
        FrontierPoint(
            params=problem.params(key),
            objective=objective,
            objective_ci=_interval(search.results[key], problem.objective),
            other=value,
            other_ci=_interval(search.results[key], other),
        )
        for key, objective, value in front
    ]


def _best(search: _Search) -> Key | None:
    best: Key | None = None
    for key, point in search.points.items():
        if not point.feasible or point.objective is None:
            continue
        current = search.points[best].objective if best is not None else None
        if current is None or search.problem.better(point.objective, current):
            best = key
    return best


def find_best(
    evaluate: Evaluate,
    *,
    space: Mapping[str, Sequence[Any]],
    objective: str = "energy_per_output_token_j",
    direction: str = "minimize",
    subject_to: Mapping[str, float] | None = None,
    monotone: Sequence[str] = DEFAULT_MONOTONE,
    budget: int | None = None,
    frontier: bool = False,
    screen: Evaluate | None = None,
) -> SearchAnswer:
    """Find the feasible point of ``space`` with the best ``objective``.

    Args:
        evaluate: Measures the case at a point (see :data:`Evaluate`).
        space: Parameter path -> the values to try.
        objective: The metric to optimise (a catalogue name, ``ttft_ms.p99`` style allowed).
        direction: ``minimize`` or ``maximize``.
        subject_to: Bounds, metric -> limit: a lower-is-better metric must be at most its
            limit, a higher-is-better one at least.
        monotone: Axes along which more is more load (see the module docstring).
        budget: The most evaluations (None: no cap).
        frontier: Also evaluate every point not proven infeasible, for the full frontier.
        screen: Measures a point on a short window: with it and an objective that improves
            with load, every line is searched on short windows first and only the better half
            of the lines (at least one) is searched again in full (successive halving).

    Raises:
        ConfigurationError: An empty space, an unknown metric or direction, a monotone axis
            with values that are not numbers.
    """
    if budget is not None and budget < 1:
        raise ConfigurationError(f"budget must be at least 1 evaluation, got {budget}")
    problem = _problem(space, objective, direction, subject_to or {}, monotone)
    lines = _lines(problem)
    quick: _Search | None = None
    chosen = lines
    if screen is not None and len(lines) > 1 and problem.improves_with_load():
        quick = _Search(problem, screen, budget)
        chosen = _halve(quick, lines)
    spent = len(quick.points) if quick is not None else 0
    search = _Search(problem, evaluate, None if budget is None else max(budget - spent, 0))
    if quick is not None:
        search.exhausted = quick.exhausted
        search.notes.append(
            f"screened {len(lines)} lines on short windows ({spent} evaluations); searched "
            f"the better {len(chosen)} in full"
        )
    for line in chosen:
        _search_line(search, line)
    if frontier:
        for line in lines:
            _exhaust(search, line)
    return _answer(search, lines, quick)


def _line_best(search: _Search, line: Sequence[Key]) -> float | None:
    """The best objective among the line's feasible evaluated points."""
    best: float | None = None
    for key in line:
        point = search.points.get(key)
        if point is None or not point.feasible or point.objective is None:
            continue
        if best is None or search.problem.better(point.objective, best):
            best = point.objective
    return best


def _halve(quick: _Search, lines: list[list[Key]]) -> list[list[Key]]:
    """Search every line on short windows; the better half of the lines with a feasible
    point (at least one), in their walking order."""
    ranked = []
    for index, line in enumerate(lines):
        _search_line(quick, line)
        best = _line_best(quick, line)
        if best is not None:
            ranked.append((best if quick.problem.direction == "minimize" else -best, index))
    ranked.sort()
    kept = sorted(index for _, index in ranked[: max(1, math.ceil(len(ranked) / 2))])
    return [lines[index] for index in kept]


def _answer(search: _Search, lines: list[list[Key]], quick: _Search | None) -> SearchAnswer:
    problem = search.problem
    best = _best(search)
    other = next(iter(problem.subject_to), DEFAULT_FRONTIER_METRIC)
    front = _frontier(search, other)
    screened = [
        point.model_copy(update={"screening": True})
        for point in (quick.points.values() if quick is not None else ())
    ]
    evaluated = [*screened, *search.points.values()]
    grid = [key for line in lines for key in line]
    grid_size = len(grid)
    complete = all(key in search.points or search.proven_infeasible(key) for key in grid)
    notes = list(search.notes)
    if search.exhausted:
        notes.append(f"stopped at the budget of {search.budget} evaluations")
    record = SearchRecord(
        objective=problem.objective,
        direction=problem.direction,
        subject_to=problem.subject_to,
        space=problem.values,
        monotone=problem.monotone,
        grid_size=grid_size,
        best=search.points[best] if best is not None else None,
        evaluated=evaluated,
        frontier_metric=other,
        frontier=front,
        frontier_complete=complete,
        skipped=grid_size - len(search.points),
        stop_reason="budget" if search.exhausted else "done",
        notes=notes,
    )
    points = {key: Point.of(point, search.results.get(key)) for key, point in search.points.items()}
    early = [
        Point.of(point, quick.results.get(key) if quick is not None else None)
        for key, point in zip(quick.points if quick is not None else (), screened, strict=True)
    ]
    return SearchAnswer(
        best=points[best] if best is not None else None,
        result=search.results[best] if best is not None else None,
        frontier=front,
        evaluated=[*early, *points.values()],
        record=record,
    )

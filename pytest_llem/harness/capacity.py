"""Capacity search: the highest arrival rate at which a server case meets its SLO.

The search knows nothing of pytest or of how a rate is measured: it calls ``measure(rate,
attempt)`` and gets the :class:`~pytest_llem.results.CaseResult` of the case at that target
rate (the ``llem`` fixture runs it through the case runner, with the same seeded arrivals and
request set at every rate). A rate *passes* when at least ``good_fraction`` of its requests met
every SLO bound and the server kept up: not saturated (a backlog that grows through the run
would break the SLO on a longer run, whatever this run's fraction says), and not above the
most requests per second the server completed in any saturated run (a seeded schedule of a
finite request set can realise less than its target rate, and so look sustainable above the
server's throughput).

Stopping rules: the two ends of ``rate`` are measured first (the low end failing ends the
search with ``below_range``, the high end passing with ``above_range``); without ``rate``, the
case's own rate is doubled while it passes (halved while it fails), at most 8 times, until
one rate passes and the next fails (else ``above_range`` / ``below_range``); then the bracket
(highest passing, lowest failing) is bisected at its geometric mean until high / low - 1 is at
most ``tolerance``, or until ``max_measurements``. A rate whose good fraction lies within
1.96 binomial standard errors of the bound is measured again (arrival seed + 1) and decided on
both measurements pooled.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from pytest_llem.exceptions import ConfigurationError
from pytest_llem.results.models import CaseResult
from pytest_llem.results.search import CapacityPoint, CapacityRecord

__all__ = [
    "NOISE_Z",
    "CapacityAnswer",
    "Measure",
    "check_capacity_args",
    "find_capacity",
    "good_requests",
]

#: Doublings (or halvings) tried to bracket the capacity when no range is given.
BRACKET_STEPS = 8
#: A good fraction within this many binomial standard errors of the bound is measured again.
NOISE_Z = 1.96

StopReason = Literal["tolerance", "below_range", "above_range", "budget"]

#: ``measure(rate_rps, attempt)``: the case's result at that target rate and the id of the
#: point's case in the record (attempt 0 first, 1 for the measurement again).
Measure = Callable[[float, int], tuple[CaseResult, str | None]]


@dataclass
class CapacityAnswer:
    """What :func:`find_capacity` returns (the fixture's ``llem.capacity`` answer).

    Attributes:
        rate_rps: The highest rate that passed, requests/s; None when even the lowest failed.
        good_fraction: The good fraction measured at that rate.
        result: The case's result at that rate (None when no rate passed).
        tried: Every rate measured, in order, with its good fraction and saturation.
        record: The ``capacity`` section of the case's record.
    """

    rate_rps: float | None
    good_fraction: float | None
    result: CaseResult | None
    tried: list[CapacityPoint]
    record: CapacityRecord


def good_requests(result: CaseResult) -> tuple[float, int]:
    """Requests that met the SLO and requests in all, over the result's windows."""
    good, total = 0.0, 0
    for rep in result.repetitions:
        fraction = rep.values.get("slo_met_fraction")
        if fraction is None:
            continue
        good += fraction * rep.requests
        total += rep.requests
    return good, total


def check_capacity_args(
    slo: Mapping[str, float], good_fraction: float, rate: tuple[float, float], tolerance: float
) -> None:
    """Reject arguments the search cannot work with, with one line saying why.

    Raises:
        ConfigurationError: No bound, a fraction outside (0, 1], a range that is not
            0 < low < high, or a tolerance that is not above 0.
    """
    if not slo:
        raise ConfigurationError("llem.capacity needs at least one SLO bound, e.g. e2e_ms=400")
    if not 0 < good_fraction <= 1:
        raise ConfigurationError(f"good_fraction must be in (0, 1], got {good_fraction}")
    low, high = rate
    if not 0 < low < high:
        raise ConfigurationError(f"rate must be (low, high) with 0 < low < high, got {rate}")
    if not tolerance > 0:
        raise ConfigurationError(f"tolerance must be above 0, got {tolerance}")


@dataclass
class _Search:
    measure: Measure
    target: float
    max_measurements: int
    points: list[CapacityPoint] = field(default_factory=list)
    results: dict[float, CaseResult] = field(default_factory=dict)
    measurements: int = 0
    #: The most requests/s the server completed in a saturated run: no rate above it is
    #: sustainable, whatever a finite run's good fraction says.
    ceiling: float | None = None

    def passes(self, point: CapacityPoint) -> bool:
        """Enough good requests, not saturated, and not above the saturated throughput."""
        if point.good_fraction is None or point.good_fraction < self.target or point.saturated:
            return False
        return self.ceiling is None or point.rate_rps <= self.ceiling

    def bracket(self) -> tuple[CapacityPoint | None, CapacityPoint | None]:
        """The highest passing rate and the lowest failing rate above it."""
        passing = max(
            (p for p in self.points if self.passes(p)), key=lambda p: p.rate_rps, default=None
        )
        floor = passing.rate_rps if passing is not None else 0.0
        failing = min(
            (p for p in self.points if not self.passes(p) and p.rate_rps > floor),
            key=lambda p: p.rate_rps,
            default=None,
        )
        return passing, failing

    def try_rate(self, rate: float) -> CapacityPoint:
        result, case_id = self.measure(rate, 0)
        self.measurements += 1
        self.results[rate] = result
        good, total = good_requests(result)
        saturated = _saturated(result)
        note = None
        noisy = not saturated and total > 0 and self._within_noise(good / total, total)
        if noisy and self.measurements < self.max_measurements:
            again, _ = self.measure(rate, 1)
            self.measurements += 1
            more_good, more_total = good_requests(again)
            saturated = _saturated(again)
            again_fraction = more_good / more_total if more_total else float("nan")
            note = (
                f"{good / total:.3f} was within noise of {self.target:g}; measured again "
                f"({again_fraction:.3f}) and pooled"
            )
            good, total = good + more_good, total + more_total
        fraction = good / total if total else None
        energy = "energy_per_good_request_j"
        point = CapacityPoint(
            rate_rps=rate,
            good_fraction=fraction,
            achieved_rate_rps=_achieved(result),
            requests=total,
            measurements=2 if note else 1,
            saturated=saturated,
            passed=fraction is not None and fraction >= self.target and not saturated,
            energy_per_good_request_j=result.value(energy) if energy in result else None,
            case_id=case_id,
            note=note,
        )
        throughput = result.value("requests_per_s") if "requests_per_s" in result else None
        if saturated and throughput is not None:
            self.ceiling = max(self.ceiling or 0.0, throughput)
        self.points.append(point)
        return point

    def _within_noise(self, fraction: float, total: int) -> bool:
        error = math.sqrt(self.target * (1 - self.target) / total)
        return abs(fraction - self.target) < NOISE_Z * max(error, 1 / total)


def _judged(search: _Search, point: CapacityPoint) -> CapacityPoint:
    """The point as finally judged: a rate above the saturated throughput fails, and says so."""
    passed = search.passes(point)
    if passed or not point.passed:
        return point.model_copy(update={"passed": passed})
    why = (
        f"above the {search.ceiling:.3g} requests/s the server completed when saturated: not "
        "sustainable"
    )
    note = f"{point.note}; {why}" if point.note else why
    return point.model_copy(update={"passed": False, "note": note})


def _achieved(result: CaseResult) -> float | None:
    rates = sorted(
        rep.server.achieved_rate_rps
        for rep in result.repetitions
        if rep.server is not None and rep.server.achieved_rate_rps is not None
    )
    return rates[len(rates) // 2] if rates else None


def _saturated(result: CaseResult) -> bool:
    return any(rep.server is not None and rep.server.saturated for rep in result.repetitions)


def find_capacity(
    measure: Measure,
    *,
    slo: Mapping[str, float],
    good_fraction: float = 0.9,
    rate: tuple[float, float] | None = None,
    start_rps: float = 4.0,
    tolerance: float = 0.05,
    max_measurements: int = 30,
) -> CapacityAnswer:
    """Bracket and bisect the arrival rate for the highest one that meets the SLO.

    Args:
        measure: Measures the case at a target rate (see :data:`Measure`).
        slo: The bounds a request must meet (recorded; ``measure`` applies them).
        good_fraction: Share of requests that must meet every bound.
        rate: The (low, high) rates, requests/s, to search between; None: bracket from
            ``start_rps`` by doubling (or halving) until one rate passes and one fails.
        start_rps: Where bracketing starts without ``rate`` (the case's ``traffic.rate``).
        tolerance: Bisection stops when high / low - 1 is at most this.
        max_measurements: The most measurements (re-measurements included).

    Raises:
        ConfigurationError: The arguments cannot be searched (:func:`check_capacity_args`).
    """
    check_capacity_args(slo, good_fraction, rate or (start_rps, 2 * start_rps), tolerance)
    search = _Search(measure, good_fraction, max_measurements)
    if rate is None:
        _bracket(search, start_rps)
    else:
        _ends(search, rate)
    while True:
        passing, failing = search.bracket()
        stop: StopReason = "tolerance"
        if passing is None:
            stop = "below_range"
        elif failing is None:
            stop = "above_range"
        elif failing.rate_rps / passing.rate_rps - 1 <= tolerance:
            stop = "tolerance"
        elif search.measurements >= max_measurements:
            stop = "budget"
        else:
            search.try_rate(math.sqrt(passing.rate_rps * failing.rate_rps))
            continue
        return _answer(search, passing, failing, stop, slo=slo, rate=rate, tolerance=tolerance)


def _ends(search: _Search, rate: tuple[float, float]) -> None:
    """Measure the range's low end and, when it passes, its high end."""
    if search.passes(search.try_rate(rate[0])):
        search.try_rate(rate[1])


def _bracket(search: _Search, start: float) -> None:
    """Double (or halve) from ``start`` until one rate passes and a higher one fails."""
    search.try_rate(start)
    for _ in range(BRACKET_STEPS):
        passing, failing = search.bracket()
        if (passing is not None and failing is not None) or (
            search.measurements >= search.max_measurements
        ):
            return
        if failing is None:
            assert passing is not None  # a point was measured: one of the two exists
            search.try_rate(passing.rate_rps * 2)
        else:
            search.try_rate(failing.rate_rps / 2)


def _answer(
    search: _Search,
    passing: CapacityPoint | None,
    failing: CapacityPoint | None,
    stop: StopReason,
    *,
    slo: Mapping[str, float],
    rate: tuple[float, float] | None,
    tolerance: float,
) -> CapacityAnswer:
    notes = []
    tried = [point.rate_rps for point in search.points]
    points = [_judged(search, point) for point in search.points]
    if stop == "below_range":
        notes.append(f"the SLO was not met even at the lowest rate, {min(tried):g} requests/s")
    elif stop == "above_range":
        notes.append(f"the SLO was still met at the highest rate, {max(tried):g} requests/s")
    elif stop == "budget":
        notes.append(f"stopped after {search.measurements} measurements (max_measurements)")
    record = CapacityRecord(
        rate_rps=passing.rate_rps if passing is not None else None,
        good_fraction=passing.good_fraction if passing is not None else None,
        slo=dict(slo),
        target_good_fraction=search.target,
        rate_range=rate,
        tolerance=tolerance,
        bracket=(
            passing.rate_rps if passing is not None else None,
            failing.rate_rps if failing is not None else None,
        ),
        stop_reason=stop,
        tried=points,
        notes=notes,
    )
    return CapacityAnswer(
        rate_rps=record.rate_rps,
        good_fraction=record.good_fraction,
        result=search.results.get(passing.rate_rps) if passing is not None else None,
        tried=record.tried,
        record=record,
    )

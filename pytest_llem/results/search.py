"""The record sections of the two searches a test can run from the ``llem`` fixture: the
capacity search (``llem.capacity``: the highest arrival rate that meets the SLO) and the
search for the best configuration under bounds (``llem.search``).

Each evaluated point is also a case of its own in the run record (its id is the searching
case's id and the point's parameters); these sections hold what the search made of them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "CapacityPoint",
    "CapacityRecord",
    "FrontierPoint",
    "SearchPoint",
    "SearchRecord",
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CapacityPoint(_Section):
    """One arrival rate the capacity search measured."""

    rate_rps: float = Field(description="Target arrival rate, requests/s.")
    good_fraction: float | None = Field(
        description="Requests meeting every SLO bound / requests, over every measurement at "
        "this rate (None: not measured)."
    )
    achieved_rate_rps: float | None = Field(
        default=None,
        description="Requests issued per second, median over the windows (seeded Poisson "
        "arrivals of a finite request set realise the target only to about 1/sqrt(requests)).",
    )
    requests: int = Field(description="Requests the good fraction is counted over.")
    measurements: int = Field(
        default=1, description="Times measured (2: within noise of the bound the first time)."
    )
    saturated: bool = Field(description="Whether the server could not keep up with the rate.")
    passed: bool = Field(
        description="At least good_fraction of requests met the SLO and it was not saturated."
    )
    energy_per_good_request_j: float | None = Field(
        default=None, description="Median over the windows, J/request (None: no meter)."
    )
    case_id: str | None = Field(default=None, description="The point's case in the record.")
    note: str | None = None


class CapacityRecord(_Section):
    """What ``llem.capacity`` found: the highest rate at which the SLO held."""

    rate_rps: float | None = Field(
        description="The highest rate that passed, requests/s (None: not even the lowest)."
    )
    good_fraction: float | None = Field(description="The good fraction at that rate.")
    slo: dict[str, float] = Field(description="The bounds a request had to meet, ms.")
    target_good_fraction: float = Field(description="The share of requests that had to be good.")
    rate_range: tuple[float, float] | None = Field(
        description="The (low, high) rates asked for (None: bracketed from the case's rate)."
    )
    tolerance: float = Field(description="Relative width at which bisection stopped.")
    bracket: tuple[float | None, float | None] = Field(
        description="The highest passing and lowest failing rate at the end."
    )
    stop_reason: Literal["tolerance", "below_range", "above_range", "budget"] = Field(
        description="tolerance: the bracket is narrower than the tolerance; below_range: even "
        "the lowest rate tried failed; above_range: even the highest passed; budget: the most "
        "measurements were spent."
    )
    tried: list[CapacityPoint] = Field(default_factory=list, description="In measuring order.")
    notes: list[str] = Field(default_factory=list)


class SearchPoint(_Section):
    """One configuration the search evaluated."""

    params: dict[str, Any] = Field(description="The searched parameters' values.")
    case_id: str | None = Field(default=None, description="The point's case in the record.")
    objective: float | None = Field(description="The objective's median (None: unmeasured).")
    values: dict[str, float | None] = Field(
        default_factory=dict, description="Each bounded metric's median."
    )
    feasible: bool
    broke: list[str] = Field(
        default_factory=list,
        description="The bounds it broke, e.g. 'ttft_ms.p99 812 > 500' (empty when feasible).",
    )
    screening: bool = Field(
        default=False,
        description="Measured on a short window to rank its line (screen=True), not to decide.",
    )
    uncertain: list[str] = Field(
        default_factory=list,
        description="Bounds whose limit lies inside the metric's 95% interval of the median: "
        "decided on the median, but within noise (more windows would settle it).",
    )


class FrontierPoint(_Section):
    """A point of the objective / first-bound Pareto frontier, with the medians' intervals."""

    params: dict[str, Any]
    objective: float
    objective_ci: tuple[float, float] | None = Field(
        default=None, description="95% bootstrap interval of the median (None: < 3 windows)."
    )
    other: float = Field(description="The other axis's median (the first bounded metric).")
    other_ci: tuple[float, float] | None = None


class SearchRecord(_Section):
    """What ``llem.search`` found: the best feasible configuration and the frontier."""

    objective: str = Field(description="The metric optimised.")
    direction: Literal["minimize", "maximize"]
    subject_to: dict[str, float] = Field(description="Bounds: metric -> limit.")
    space: dict[str, list[Any]] = Field(description="The values of each searched parameter.")
    monotone: list[str] = Field(
        description="Axes assumed monotone (more of it: bounded metrics no better, the "
        "objective no worse), so that the search could skip points."
    )
    grid_size: int = Field(description="Points in the full grid.")
    best: SearchPoint | None = Field(description="The best feasible point (None: none).")
    evaluated: list[SearchPoint] = Field(default_factory=list, description="In evaluation order.")
    frontier_metric: str | None = Field(
        default=None, description="The frontier's other axis (the first bound's metric)."
    )
    frontier: list[FrontierPoint] = Field(default_factory=list)
    frontier_complete: bool = Field(
        default=False,
        description="Whether every point not proven infeasible was evaluated, so the frontier "
        "is the full grid's (otherwise it is the evaluated points' and a point on it may be "
        "dominated by one never evaluated).",
    )
    skipped: int = Field(
        default=0, description="Grid points never evaluated (proven infeasible or not better)."
    )
    stop_reason: Literal["done", "budget"] = "done"
    notes: list[str] = Field(default_factory=list)

"""The capacity search and the configuration search (``harness.capacity``, ``harness.search``)
against simulated cases whose answer is known: a slotted server in closed form, and a cost
surface over batch size and a runtime setting."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from pytest_llem.exceptions import ConfigurationError
from pytest_llem.harness.capacity import find_capacity, good_requests
from pytest_llem.harness.search import PointFailedError, find_best
from pytest_llem.results.models import (
    CaseResult,
    MetricSummary,
    RepetitionRecord,
    ServerLoadRecord,
)


def _result(
    metrics: dict[str, float | None],
    *,
    good_fraction: float | None = None,
    requests: int = 200,
    saturated: bool = False,
    spread: float = 0.0,
) -> CaseResult:
    """A measured case: one window per metric value, with an interval ``spread`` wide."""
    server = ServerLoadRecord(
        target_rate_rps=1.0, peak_concurrency=1, concurrency_bound_share=0.0, saturated=saturated
    )
    values = {"slo_met_fraction": good_fraction} if good_fraction is not None else {}
    rep = RepetitionRecord(
        index=0,
        duration_s=1.0,
        requests=requests,
        input_tokens=requests,
        output_tokens=requests,
        values=values,
        server=server,
    )
    summaries = {
        name: MetricSummary(
            n=3,
            median=value,
            ci95_low=None if value is None else value * (1 - spread),
            ci95_high=None if value is None else value * (1 + spread),
            unit="",
        )
        for name, value in metrics.items()
    }
    return CaseResult(metrics=summaries, repetitions=[rep])


# -- capacity ------------------------------------------------------------------------------------

SLOTS, SERVICE_S, BOUND_S, REQUESTS = 4, 0.09, 0.4, 200
CAPACITY = SLOTS / SERVICE_S  # 44.4 requests/s


def _slotted(rate: float) -> tuple[float, bool]:
    """Good fraction and saturation of a slotted server fed at a constant rate (fluid model):
    above capacity the n-th request waits n * (S/c - 1/r)."""
    if rate <= CAPACITY:
        return 1.0, False
    growth = SERVICE_S / SLOTS - 1 / rate
    good = min(REQUESTS, int((BOUND_S - SERVICE_S) / growth))
    return good / REQUESTS, rate > CAPACITY * 1.01


class Slotted:
    """``measure`` for the capacity search, counting calls."""

    def __init__(self, shift: float = 0.0) -> None:
        self.calls: list[tuple[float, int]] = []
        self.shift = shift

    def __call__(self, rate: float, attempt: int) -> tuple[CaseResult, str | None]:
        self.calls.append((rate, attempt))
        fraction, saturated = _slotted(rate)
        fraction = min(1.0, max(0.0, fraction + (self.shift if attempt == 0 else 0.0)))
        throughput = min(rate, CAPACITY * 0.98)  # a saturated run's window has a tail
        result = _result(
            {"energy_per_good_request_j": 2.0 / max(fraction, 1e-9), "requests_per_s": throughput},
            good_fraction=fraction,
            requests=REQUESTS,
            saturated=saturated,
        )
        return result, f"case@rate={rate:.4g}"


def test_capacity_of_a_slotted_server_is_within_the_tolerance_below_the_analytical_value():
    measure = Slotted()
    answer = find_capacity(measure, slo={"e2e_ms": 400}, rate=(5.0, 100.0), tolerance=0.05)
    assert answer.rate_rps is not None
    assert CAPACITY / 1.05 <= answer.rate_rps <= CAPACITY
    assert answer.record.stop_reason == "tolerance"
    low, high = answer.record.bracket
    assert low == answer.rate_rps
    assert high is not None
    assert high / low - 1 <= 0.05
    assert [p.rate_rps for p in answer.tried][:2] == [5.0, 100.0]
    assert answer.tried[1].saturated
    assert not answer.tried[1].passed
    assert answer.result is not None
    assert good_requests(answer.result) == (REQUESTS, REQUESTS)
    assert answer.record.tried[-1].case_id is not None


def test_a_saturated_rate_fails_even_when_the_short_run_met_the_slo():
    fraction, saturated = _slotted(CAPACITY * 1.05)
    assert fraction >= 0.9
    assert saturated
    answer = find_capacity(Slotted(), slo={"e2e_ms": 400}, rate=(5.0, 100.0), tolerance=0.02)
    # Counting the good fraction alone would have answered about 48 requests/s.
    assert answer.rate_rps is not None
    assert answer.rate_rps <= CAPACITY * 1.01


def test_a_rate_above_the_saturated_throughput_fails_even_when_not_flagged():
    def lucky(rate: float, attempt: int) -> tuple[CaseResult, str | None]:
        # A schedule that realised less than its target: fine up to 1.3 x capacity, and
        # flagged saturated only at twice the capacity, where it completed 43 requests/s.
        del attempt
        saturated = rate > 2 * CAPACITY
        fraction = 1.0 if rate <= 1.3 * CAPACITY else 0.2
        metrics = {"requests_per_s": min(rate, 43.0)}
        return _result(metrics, good_fraction=fraction, saturated=saturated), None

    answer = find_capacity(lucky, slo={"e2e_ms": 400}, rate=(10.0, 100.0))
    assert answer.rate_rps is not None
    assert answer.rate_rps <= 43.0
    above = [p for p in answer.tried if 43.0 < p.rate_rps <= 1.3 * CAPACITY]
    assert above
    assert all(not p.passed for p in above)
    assert "completed when saturated" in (above[0].note or "")


def test_a_fraction_within_noise_of_the_bound_is_measured_again_and_pooled():
    measure = Slotted(shift=-0.11)  # first look at every rate: 0.89, a hair under 0.9
    answer = find_capacity(measure, slo={"e2e_ms": 400}, rate=(5.0, 100.0))
    assert (5.0, 1) in measure.calls
    first = answer.tried[0]
    assert first.measurements == 2
    assert first.requests == 2 * REQUESTS
    assert first.good_fraction == pytest.approx((0.89 + 1.0) / 2)
    assert first.passed
    assert "within noise" in (first.note or "")


def test_without_a_range_capacity_is_bracketed_by_doubling_from_the_cases_rate():
    measure = Slotted()
    answer = find_capacity(measure, slo={"e2e_ms": 400}, start_rps=4.0)
    assert [rate for rate, _ in measure.calls][:5] == [4.0, 8.0, 16.0, 32.0, 64.0]
    assert answer.rate_rps is not None
    assert CAPACITY / 1.05 <= answer.rate_rps <= CAPACITY * 1.01
    assert answer.record.rate_range is None
    down = Slotted()
    answer = find_capacity(down, slo={"e2e_ms": 400}, start_rps=200.0)
    assert [rate for rate, _ in down.calls][:3] == [200.0, 100.0, 50.0]
    assert answer.rate_rps is not None
    assert answer.rate_rps <= CAPACITY * 1.01


def test_capacity_below_and_above_the_range():
    below = find_capacity(Slotted(), slo={"e2e_ms": 400}, rate=(80.0, 100.0))
    assert below.rate_rps is None
    assert below.result is None
    assert below.record.stop_reason == "below_range"
    assert "not met even at the lowest rate" in below.record.notes[0]
    above = find_capacity(Slotted(), slo={"e2e_ms": 400}, rate=(5.0, 20.0))
    assert above.rate_rps == 20.0
    assert above.record.stop_reason == "above_range"


def test_capacity_stops_at_its_measurement_budget():
    measure = Slotted()
    answer = find_capacity(
        measure, slo={"e2e_ms": 400}, rate=(5.0, 100.0), tolerance=0.001, max_measurements=4
    )
    assert len(measure.calls) == 4
    assert answer.record.stop_reason == "budget"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"slo": {}}, "at least one SLO bound"),
        ({"good_fraction": 1.5}, "good_fraction"),
        ({"rate": (10.0, 5.0)}, "0 < low < high"),
        ({"tolerance": 0.0}, "tolerance"),
    ],
)
def test_capacity_rejects_arguments_it_cannot_search(kwargs: dict[str, Any], message: str):
    args: dict[str, Any] = {"slo": {"e2e_ms": 400}, "rate": (1.0, 10.0), **kwargs}
    with pytest.raises(ConfigurationError, match=message):
        find_capacity(Slotted(), **args)


# -- configuration search ------------------------------------------------------------------------

BATCHES = [1, 2, 4, 8, 16, 32, 64]
MODES = ["eager", "graphs", "chunked"]
MODE_COST = {"eager": (1.0, 1.0), "graphs": (0.8, 1.3), "chunked": (0.9, 0.7)}


def _surface(batch: int, mode: str) -> dict[str, float]:
    """Known costs: energy per token falls with batch size, TTFT grows with it."""
    energy_scale, latency_scale = MODE_COST[mode]
    return {
        "energy_per_output_token_j": energy_scale * (0.2 + 1.0 / batch),
        "ttft_ms.p99": latency_scale * (40.0 + 25.0 * batch),
        "output_tokens_per_s": 100.0 * batch / (1 + batch / 16),
    }


class Surface:
    """``evaluate`` for the search over the known surface, counting evaluations."""

    def __init__(self, surface: Any = _surface) -> None:
        self.surface = surface
        self.calls: list[dict[str, Any]] = []

    def __call__(self, params: dict[str, Any]) -> tuple[CaseResult, str | None]:
        self.calls.append(params)
        return _result(self.surface(params["batch_size"], params["mode"])), None


def _grid(surface: Any, bound: float) -> list[tuple[int, str, float, float]]:
    """Every feasible point: batch, mode, energy, TTFT."""
    rows = []
    for batch, mode in itertools.product(BATCHES, MODES):
        costs = surface(batch, mode)
        if costs["ttft_ms.p99"] <= bound:
            rows.append((batch, mode, costs["energy_per_output_token_j"], costs["ttft_ms.p99"]))
    return rows


def _pareto(rows: list[tuple[int, str, float, float]]) -> set[tuple[int, str]]:
    return {
        (b, m)
        for b, m, e, t in rows
        if not any(e2 <= e and t2 <= t and (e2, t2) != (e, t) for _, _, e2, t2 in rows)
    }


SPACE = {"mode": MODES, "batch_size": list(reversed(BATCHES))}  # unsorted on purpose


def test_search_finds_the_true_optimum_with_fewer_evaluations_than_the_grid():
    evaluate = Surface()
    answer = find_best(evaluate, space=SPACE, subject_to={"ttft_ms.p99": 500})
    grid = _grid(_surface, 500)
    truth = min(grid, key=lambda row: row[2])
    assert answer.best is not None
    assert (answer.best.params["batch_size"], answer.best.params["mode"]) == truth[:2]
    assert answer.best.objective == pytest.approx(truth[2])
    # At most the top and a bisection of the rest per mode: 1 + ceil(log2(7)) each.
    assert len(evaluate.calls) <= 4 * len(MODES) < len(BATCHES) * len(MODES)
    assert answer.record.skipped == len(BATCHES) * len(MODES) - len(evaluate.calls)
    assert answer.result is not None
    assert answer.record.space["batch_size"] == BATCHES
    # Its frontier is the evaluated points' (and says so), each one a trade-off among them.
    assert not answer.record.frontier_complete
    evaluated = [
        (p.params["batch_size"], p.params["mode"], p.objective, p.values["ttft_ms.p99"])
        for p in answer.evaluated
        if p.feasible
    ]
    assert {(p.params["batch_size"], p.params["mode"]) for p in answer.frontier} == _pareto(
        evaluated  # type: ignore[arg-type]
    )


def test_infeasible_points_name_the_bound_they_broke_and_prune_larger_batches():
    evaluate = Surface()
    answer = find_best(evaluate, space=SPACE, subject_to={"ttft_ms.p99": 500})
    broken = [p for p in answer.evaluated if not p.feasible]
    assert broken
    for point in broken:
        assert point.broke
        assert point.broke[0].startswith("ttft_ms.p99 ")
        assert "> 500" in point.broke[0]
    for point in broken:  # nothing larger in the same mode was measured after it broke
        later = answer.evaluated[answer.evaluated.index(point) + 1 :]
        assert not any(
            p.params["mode"] == point.params["mode"]
            and p.params["batch_size"] > point.params["batch_size"]
            for p in later
        )


def test_with_frontier_the_frontier_is_the_full_grids_and_still_fewer_evaluations():
    evaluate = Surface()
    answer = find_best(evaluate, space=SPACE, subject_to={"ttft_ms.p99": 500}, frontier=True)
    grid = _grid(_surface, 500)
    assert {(p.params["batch_size"], p.params["mode"]) for p in answer.frontier} == _pareto(grid)
    assert answer.record.frontier_complete
    assert len(evaluate.calls) < len(BATCHES) * len(MODES)
    assert answer.record.frontier_metric == "ttft_ms.p99"
    assert [p.other for p in answer.frontier] == sorted(p.other for p in answer.frontier)


def test_a_surface_that_breaks_monotonicity_is_searched_in_full_and_says_so():
    def bowl(batch: int, mode: str) -> dict[str, float]:
        costs = _surface(batch, mode)
        costs["energy_per_output_token_j"] = MODE_COST[mode][0] * (1 + abs(batch - 4) / 4)
        return costs

    evaluate = Surface(bowl)
    answer = find_best(evaluate, space=SPACE, subject_to={"ttft_ms.p99": 500})
    truth = min(_grid(bowl, 500), key=lambda row: row[2])
    assert answer.best is not None
    assert (answer.best.params["batch_size"], answer.best.params["mode"]) == truth[:2]
    assert any("did not improve along batch_size" in note for note in answer.record.notes)


def test_a_latency_objective_is_searched_on_every_point_not_proven_infeasible():
    evaluate = Surface()
    answer = find_best(
        evaluate,
        space=SPACE,
        objective="ttft_ms.p99",
        subject_to={"energy_per_output_token_j": 0.6},
    )
    feasible = [
        (b, m)
        for b, m in itertools.product(BATCHES, MODES)
        if _surface(b, m)["energy_per_output_token_j"] <= 0.6
    ]
    truth = min(feasible, key=lambda bm: _surface(*bm)["ttft_ms.p99"])
    assert answer.best is not None
    assert (answer.best.params["batch_size"], answer.best.params["mode"]) == truth


def test_maximize_and_budget():
    evaluate = Surface()
    answer = find_best(
        evaluate,
        space=SPACE,
        objective="output_tokens_per_s",
        direction="maximize",
        subject_to={"ttft_ms.p99": 500},
        budget=3,
    )
    assert len(evaluate.calls) == 3
    assert answer.record.stop_reason == "budget"
    assert any("budget of 3" in note for note in answer.record.notes)


def test_no_feasible_point_has_no_best():
    answer = find_best(Surface(), space=SPACE, subject_to={"ttft_ms.p99": 1})
    assert answer.best is None
    assert answer.result is None
    assert answer.frontier == []
    assert answer.evaluated
    assert all(not p.feasible for p in answer.evaluated)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"space": {}}, "at least one value"),
        ({"objective": "no_such_metric"}, "cannot optimise or bound 'no_such_metric'"),
        ({"objective": "requests"}, "cannot optimise or bound 'requests'"),
        ({"direction": "up"}, "minimize or maximize"),
        ({"space": {"batch_size": ["a", "b"]}}, "needs numbers"),
        ({"budget": 0}, "at least 1"),
    ],
)
def test_search_rejects_what_it_cannot_search(kwargs: dict[str, Any], message: str):
    args: dict[str, Any] = {"space": SPACE, **kwargs}
    with pytest.raises(ConfigurationError, match=message):
        find_best(Surface(), **args)


def test_a_point_that_runs_out_of_memory_is_infeasible_and_so_is_every_larger_batch():
    class Oom(Surface):
        def __call__(self, params: dict[str, Any]) -> tuple[CaseResult, str | None]:
            if params["batch_size"] >= 16:
                self.calls.append(params)
                raise PointFailedError("CUDA out of memory", out_of_memory=True)
            return super().__call__(params)

    evaluate = Oom()
    answer = find_best(evaluate, space=SPACE, subject_to={"ttft_ms.p99": 10_000})
    assert answer.best is not None
    assert answer.best.params["batch_size"] == 8
    failed = [p for p in answer.evaluated if not p.feasible]
    assert failed
    assert all(p.broke == ["out of memory: CUDA out of memory"] for p in failed)
    assert all(p.params["batch_size"] != 32 for p in answer.evaluated)  # proven by 16 or 64
    assert len(evaluate.calls) < len(BATCHES) * len(MODES)


def test_a_point_that_fails_otherwise_proves_nothing_about_its_neighbours():
    class Flaky(Surface):
        def __call__(self, params: dict[str, Any]) -> tuple[CaseResult, str | None]:
            if params["batch_size"] == 64:
                self.calls.append(params)
                raise PointFailedError("engine crashed")
            return super().__call__(params)

    evaluate = Flaky()
    answer = find_best(evaluate, space={"mode": ["eager"], "batch_size": BATCHES})
    assert answer.evaluated[0].broke == ["failed: engine crashed"]
    assert len(evaluate.calls) == len(BATCHES)  # the rest of the line was run in full
    assert answer.best is not None
    assert answer.best.params["batch_size"] == 32


def test_a_bound_inside_the_interval_is_marked_uncertain():
    class Noisy(Surface):
        def __call__(self, params: dict[str, Any]) -> tuple[CaseResult, str | None]:
            self.calls.append(params)
            costs = _surface(params["batch_size"], params["mode"])
            return _result(costs, spread=0.2), None

    answer = find_best(
        Noisy(), space={"mode": ["eager"], "batch_size": BATCHES}, subject_to={"ttft_ms.p99": 500}
    )
    by_batch = {p.params["batch_size"]: p for p in answer.evaluated}
    # TTFT at batch 16 is 440 ms: feasible on the median, but its interval [352, 528] holds 500.
    assert by_batch[16].feasible
    assert by_batch[16].uncertain == ["ttft_ms.p99 [352, 528] holds 500"]
    assert by_batch[4].uncertain == []


def test_points_that_share_a_model_load_run_one_after_another():
    calls: list[dict[str, Any]] = []

    def evaluate(params: dict[str, Any]) -> tuple[CaseResult, str | None]:
        calls.append(params)
        return _result({"ttft_ms.p99": 10.0 * params["batch_size"]}), None

    space = {"batch_size": [1, 2, 4], "dtype": ["float32", "bfloat16"]}
    find_best(evaluate, space=space, objective="ttft_ms.p99")  # a latency: every point runs
    dtypes = [params["dtype"] for params in calls]
    assert dtypes == ["float32"] * 3 + ["bfloat16"] * 3  # one load each, not six
    assert list(calls[0]) == ["batch_size", "dtype"]  # params keep the space's order


def test_screening_on_short_windows_searches_only_the_better_half_in_full():
    full, short = Surface(), Surface()
    answer = find_best(full, space=SPACE, subject_to={"ttft_ms.p99": 500}, screen=short)
    truth = min(_grid(_surface, 500), key=lambda row: row[2])
    assert answer.best is not None
    assert (answer.best.params["batch_size"], answer.best.params["mode"]) == truth[:2]
    assert not answer.best.screening
    modes = {params["mode"] for params in full.calls}
    assert len(modes) == 2  # the better 2 of 3 lines, ranked on the short windows
    assert len(full.calls) <= 4 * 2
    screened = [p for p in answer.record.evaluated if p.screening]
    assert len(screened) == len(short.calls)
    assert answer.record.skipped == len(BATCHES) * len(MODES) - len(full.calls)
    assert any(note.startswith("screened 3 lines on short windows") for note in answer.record.notes)


def test_screening_shares_the_budget():
    full, short = Surface(), Surface()
    answer = find_best(full, space=SPACE, subject_to={"ttft_ms.p99": 500}, screen=short, budget=5)
    assert len(full.calls) + len(short.calls) == 5
    assert answer.record.stop_reason == "budget"

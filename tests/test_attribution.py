"""Energy attribution per request and per phase: the fit recovers a simulated engine's known
per-token costs, and the books balance exactly (offline batches, overlapping server requests,
rounds, no baseline, client-side timelines)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from pytest_llem.backends.base import GenerateParams, Generation, Request
from pytest_llem.config.models import CaseConfig
from pytest_llem.harness.attribution import Attribution, RoundActivity, attribute
from pytest_llem.harness.fit import fit_token_energy, t_quantile_975
from pytest_llem.harness.metrics import request_latency
from pytest_llem.harness.runner import measure_window, run_case
from pytest_llem.harness.scenarios import build_workload
from pytest_llem.harness.step_power import energy_curve
from pytest_llem.harness.window import CaseContext, WindowPolicy
from pytest_llem.harness.window_record import record_window
from pytest_llem.results.gate import evaluate_budget, parse_budget, parse_fail_on
from pytest_llem.results.models import CaseResult, PowerTimelineRecord
from tests.fakes.fake_backend import FakeBackend, FakeClock
from tests.fakes.fake_meter import FakeMeter
from tests.fakes.sim_engine import SimEngine, SimRun

START = 1000.0


def _activity(run: SimRun, *, start: float, end: float, engine: bool = True) -> RoundActivity:
    latencies = [request_latency(g) for g in run.generations]
    steps = run.steps if engine else None
    return RoundActivity(start, end, run.generations, latencies, steps)


def _attribute(run: SimRun, *, idle_w: float | None = 50.0, engine: bool = True) -> Attribution:
    curve = energy_curve(
        start=run.start,
        duration_s=run.end - run.start,
        domains={"gpu": run.energy_j},
        timelines=[run.timeline()],
    )
    rounds = [_activity(run, start=run.start, end=run.end, engine=engine)]
    return attribute(rounds, curve=curve, idle_power_w=idle_w)


def _assert_books(result: Attribution, energy_j: float) -> None:
    total = math.fsum(r.energy_j or 0.0 for r in result.per_request)
    assert total + result.unattributed_energy_j == pytest.approx(energy_j, rel=1e-12)
    for r in result.per_request:
        assert r.prefill_energy_j is not None
        assert r.decode_energy_j is not None
        assert r.prefill_energy_j + r.decode_energy_j == pytest.approx(r.energy_j, rel=1e-12)
    rounds = result.record.round_energy_j
    for i, round_j in enumerate(rounds):
        mine = math.fsum(r.energy_j or 0.0 for r in result.per_request if r.round == i)
        books = mine + result.record.round_unattributed_energy_j[i]
        assert books == pytest.approx(round_j, rel=1e-12)
    assert math.fsum(rounds) == pytest.approx(energy_j, rel=1e-12)


def _assert_recovers(result: Attribution, engine: SimEngine) -> None:
    record = result.record
    assert record.timeline == "engine"
    assert record.weights == "fit"
    assert record.energy_per_prefill_token_j.value == pytest.approx(engine.prefill_j, rel=0.05)
    assert record.energy_per_decode_token_j.value == pytest.approx(engine.decode_j, rel=0.05)
    decode = record.energy_per_decode_token_j
    assert decode.ci95_low is not None
    assert decode.ci95_high is not None
    assert decode.ci95_low < decode.value < decode.ci95_high  # type: ignore[operator]
    assert record.fit_r2 is not None
    assert record.fit_r2 > 0.9


def test_offline_batches_recover_the_costs_and_balance() -> None:
    engine = SimEngine(max_running=4)
    requests = [(0.0, 20 + 13 * i, 3 + 5 * (i % 4)) for i in range(12)]
    run = engine.run(requests, START)
    result = _attribute(run)
    _assert_books(result, run.energy_j)
    _assert_recovers(result, engine)
    assert result.unattributed_energy_j == pytest.approx(0.0, abs=1e-9)
    by_index = {r.index: r for r in result.per_request}
    # same prompt length class, more output tokens: more decode energy
    assert by_index[3].decode_energy_j > by_index[0].decode_energy_j  # type: ignore[operator]


def test_overlapping_server_requests_recover_the_costs_and_balance() -> None:
    engine = SimEngine(max_running=6)
    requests = [(0.013 * i, 30 + 17 * (i % 5), 2 + 7 * (i % 3)) for i in range(40)]
    run = engine.run([*requests, (1.5, 10, 4)], START)  # a late one after an idle gap
    result = _attribute(run)
    _assert_books(result, run.energy_j)
    _assert_recovers(result, engine)
    assert result.unattributed_energy_j > 0  # the idle gap before the late request
    assert len(result.per_request) == 41
    long_request = max(result.per_request, key=lambda r: r.output_tokens)
    short_request = min(result.per_request, key=lambda r: r.output_tokens)
    assert long_request.decode_energy_j > short_request.decode_energy_j  # type: ignore[operator]


def test_rounds_balance_per_round_and_per_window() -> None:
    engine = SimEngine(max_running=4)
    requests = [(0.0, 25, 4 + i) for i in range(6)]
    first = engine.run(requests, START)
    gap = 0.05
    second = engine.run(requests, first.end + gap)
    times = [*first.times, second.start, *second.times]
    watts = [*first.watts, engine.idle_w, *second.watts]
    energy = first.energy_j + engine.idle_w * gap + second.energy_j
    timeline = PowerTimelineRecord(
        domain="gpu", meter="sim", times_s=[t - START for t in times], watts=watts,
        method="sim", period_s=0.0, samples=len(times),
    )  # fmt: skip
    curve = energy_curve(
        start=START, duration_s=second.end - START, domains={"gpu": energy}, timelines=[timeline]
    )
    rounds = [
        _activity(first, start=START, end=second.start),
        _activity(second, start=second.start, end=second.end),
    ]
    result = attribute(rounds, curve=curve, idle_power_w=engine.idle_w)
    _assert_books(result, energy)
    _assert_recovers(result, engine)
    assert [r.round for r in result.per_request] == [0] * 6 + [1] * 6
    assert result.record.round_unattributed_energy_j[0] == pytest.approx(engine.idle_w * gap)


def test_without_a_baseline_or_engine_steps_the_books_still_balance() -> None:
    engine = SimEngine(max_running=3)
    run = engine.run([(0.01 * i, 12, 2 + i) for i in range(7)], START)
    result = _attribute(run, idle_w=None, engine=False)
    _assert_books(result, run.energy_j)
    assert result.record.timeline == "client"
    assert result.record.notes
    assert "no idle baseline" in result.record.notes[0]


def test_constant_power_single_stream_energy_follows_duration() -> None:
    # one request at a time at a constant 12 W: each request's energy is 12 W x its lifetime
    gens, t = [], START + 0.1
    for i, n in enumerate((24, 2, 10)):
        times = [t + 0.02 + 0.005 * k for k in range(n)]
        gens.append(Generation(i, 8, list(range(n)), times, t))
        t = times[-1] + 0.01
    end = t
    curve = energy_curve(start=START, duration_s=end - START, domains={"cpu": 12.0 * (end - START)},
                         timelines=[])  # fmt: skip
    rounds = [RoundActivity(START, end, gens, [request_latency(g) for g in gens])]
    result = attribute(rounds, curve=curve, idle_power_w=12.0)
    _assert_books(result, 12.0 * (end - START))
    for record, g in zip(result.per_request, gens, strict=True):
        assert record.energy_j == pytest.approx(12.0 * (g.token_times[-1] - g.issued_at))
        assert record.prefill_energy_j == pytest.approx(12.0 * (g.token_times[0] - g.issued_at))
    assert "constant power assumed" in result.record.power


def test_fit_without_decode_tokens_names_the_missing_coefficient() -> None:
    fit = fit_token_energy([(10.0, 0.0, 1.0), (20.0, 0.0, 2.1), (5.0, 0.0, 0.5)])
    assert fit.decode is None
    assert fit.prefill == pytest.approx(0.1, rel=0.05)
    assert fit.note is not None
    assert "decode" in fit.note


def test_t_quantile() -> None:
    assert t_quantile_975(1) == pytest.approx(12.706)
    assert t_quantile_975(1000) == pytest.approx(1.962, abs=0.002)
    with pytest.raises(ValueError, match="degrees"):
        t_quantile_975(0)


def _runner_case(meters: list[FakeMeter], clock: FakeClock, backend: FakeBackend) -> Any:
    case = CaseConfig.model_validate({"batch_size": 4, "max_new_tokens": 5, "repeat": 2})
    prompts = [" ".join(["word"] * (i + 1)) for i in range(10)]
    return run_case(backend=backend, meters=meters, config=case, prompts=prompts, clock=clock)


def test_runner_records_per_request_energy_from_the_engine_steps() -> None:
    clock = FakeClock()
    backend = FakeBackend(clock, sync_s=0.0625)
    gpu = FakeMeter("gpu-fake", clock, power_w={"gpu": 200.0})
    measured = _runner_case([gpu], clock, backend)
    for rep in measured.repetitions:
        assert rep.energy_j is not None
        assert rep.attribution is not None
        assert rep.attribution.timeline == "engine"
        assert len(rep.per_request) == 10
        books = math.fsum(r.energy_j or 0.0 for r in rep.per_request) + rep.unattributed_energy_j
        assert books == pytest.approx(rep.energy_j, rel=1e-12)
        # the final synchronize (0.0625 s at 200 W) has no request in flight
        assert rep.unattributed_energy_j == pytest.approx(12.5)
        values = rep.values
        split = values["prefill_energy_j"] + values["decode_energy_j"]  # type: ignore[operator]
        assert split + values["unattributed_energy_j"] == pytest.approx(values["energy_j"])
    summary = measured.metrics["request_energy_j.p50"]
    assert summary.source == "attributed"
    assert summary.unit == "J"
    assert measured.metrics["prefill_energy_j"].source == "attributed"


def test_attributed_figures_from_an_estimating_meter_are_estimated() -> None:
    clock = FakeClock()
    backend = FakeBackend(clock)
    cc = FakeMeter("cc", clock, power_w={"cpu": 50.0}, sources={"cpu": "estimated"})
    measured = _runner_case([cc], clock, backend)
    assert measured.metrics["request_energy_j.p99"].source == "estimated"
    assert measured.metrics["decode_energy_j"].median is not None


def test_no_meter_attributes_nothing_and_says_why() -> None:
    clock = FakeClock()
    measured = _runner_case([], clock, FakeBackend(clock))
    rep = measured.repetitions[0]
    assert rep.per_request == []
    assert rep.unattributed_energy_j is None
    summary = measured.metrics["request_energy_j.p50"]
    assert summary.median is None
    assert summary.note


def test_window_with_rounds_balances_each_round() -> None:
    clock = FakeClock()
    backend = FakeBackend(clock, sync_s=0.0625)
    gpu = FakeMeter("gpu-fake", clock, power_w={"gpu": 200.0})
    case = CaseConfig.model_validate({"batch_size": 4, "max_new_tokens": 5})
    requests = [Request(i, " ".join(["w"] * (i + 1))) for i in range(6)]
    workload = build_workload(
        "offline", backend=backend, requests=requests, params=GenerateParams.from_case(case),
        config=case,
    )  # fmt: skip
    window = measure_window(backend=backend, meters=[gpu], workload=workload, clock=clock, rounds=3)
    context = CaseContext(case, None, WindowPolicy(), None, None)
    rep, _ = record_window(0, window, context)
    assert rep.attribution is not None
    assert len(rep.attribution.round_energy_j) == 3
    assert [r.round for r in rep.per_request] == [0] * 6 + [1] * 6 + [2] * 6
    for i, round_j in enumerate(rep.attribution.round_energy_j):
        mine = math.fsum(r.energy_j or 0.0 for r in rep.per_request if r.round == i)
        assert mine + rep.attribution.round_unattributed_energy_j[i] == pytest.approx(round_j)
    assert math.fsum(rep.attribution.round_energy_j) == pytest.approx(rep.energy_j)
    assert rep.values["energy_j"] == pytest.approx(rep.energy_j / 3)  # type: ignore[operator]


def test_gate_and_budget_accept_the_attributed_metrics() -> None:
    rules = parse_fail_on("request_energy_j.p99:+10%,prefill_energy_j:+5%,decode_energy_j:+5%")
    assert [r.metric for r in rules] == [
        "request_energy_j.p99",
        "prefill_energy_j",
        "decode_energy_j",
    ]
    clock = FakeClock()
    gpu = FakeMeter("gpu-fake", clock, power_w={"gpu": 200.0})
    measured = _runner_case([gpu], clock, FakeBackend(clock))
    case = CaseResult(metrics=measured.metrics)
    p90 = measured.metrics["request_energy_j.p90"].median
    assert p90 is not None
    tight = parse_budget({"request_energy_j_p90": p90 / 2, "decode_energy_j_max": 1e9})
    (breach,) = evaluate_budget(case, tight).breaches
    assert breach.startswith("request_energy_j.p90: median")
    assert not evaluate_budget(case, parse_budget({"request_energy_j.p90": p90 * 2})).breaches


def test_prefill_check_measures_prefill_by_subtraction_next_to_the_attributed() -> None:
    clock = FakeClock()
    backend = FakeBackend(clock)  # synchronize takes no time: no gap outside the requests
    gpu = FakeMeter("gpu-fake", clock, power_w={"gpu": 200.0})
    case = CaseConfig.model_validate(
        {"batch_size": 4, "max_new_tokens": 5, "repeat": 2, "prefill_check": True}
    )
    prompts = [" ".join(["word"] * (i + 1)) for i in range(10)]
    measured = run_case(backend=backend, meters=[gpu], config=case, prompts=prompts, clock=clock)
    # three batches, each 0.125 s to its first token at 200 W, generating one token each
    # warmup, 2 windows, then a check per window: 2 batches of 4 each time
    assert backend.events.count("generate:4") == (1 + 2 + 2) * 2
    for rep in measured.repetitions:
        assert rep.values["subtraction_prefill_energy_j"] == pytest.approx(75.0)
        assert rep.values["prefill_energy_j"] == pytest.approx(75.0)
        assert rep.values["prefill_attribution_diff"] == pytest.approx(0.0, abs=1e-9)
    summary = measured.metrics["subtraction_prefill_energy_j"]
    assert summary.source == "measured"
    assert measured.metrics["prefill_attribution_diff"].source == "attributed"


def test_without_prefill_check_there_is_no_subtraction_figure() -> None:
    clock = FakeClock()
    gpu = FakeMeter("gpu-fake", clock, power_w={"gpu": 200.0})
    measured = _runner_case([gpu], clock, FakeBackend(clock))
    assert "subtraction_prefill_energy_j" not in measured.metrics

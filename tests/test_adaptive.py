"""Adaptive repetitions (``repeat="auto"``): the look schedule and its corrected level, the two
stopping rules, the runner stopping early, at the maximum and at the time budget, and the
comparison judging at the corrected level.

The engine is a FakeBackend on a FakeClock, so a window's figures are exact; a backend whose
pace changes from window to window (:class:`SwayingBackend`) makes an interval that straddles a
threshold whatever the machine does.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone

import pytest

from pytest_llem.config.models import CaseConfig
from pytest_llem.harness.adaptive import AdaptiveStop
from pytest_llem.harness.runner import CaseMeasurement, run_case
from pytest_llem.results.adaptive import AdaptivePlan, AdaptiveRecord, look_schedule
from pytest_llem.results.adaptive_rule import gate_look, width_look
from pytest_llem.results.compare import compare_runs
from pytest_llem.results.comparison import classify, ratio_interval
from pytest_llem.results.gate import parse_fail_on
from pytest_llem.results.models import CaseRecord, MachineInfo, RepetitionRecord, RunRecord
from pytest_llem.results.stats import bootstrap_median_ci
from tests.fakes.fake_backend import FakeBackend, FakeClock
from tests.fakes.fake_meter import FakeMeter

PROMPTS = [" ".join(["word"] * (i + 1)) for i in range(4)]
GATE = parse_fail_on("output_tokens_per_s:-5%")
BASE_STEP_S = 0.03125


class SwayingBackend(FakeBackend):
    """A FakeBackend whose time per token takes the next of ``steps`` at each window (a window
    starts with ``reset_peak_memory``), as an engine on a machine whose load comes and goes."""

    def __init__(self, clock: FakeClock, steps: Sequence[float]) -> None:
        super().__init__(clock, step_s=steps[0])
        self._steps = list(steps)
        self._window = 0

    def reset_peak_memory(self) -> None:
        self.step_s = self._steps[self._window % len(self._steps)]
        self._window += 1
        super().reset_peak_memory()


def _case(repeat: int | str) -> CaseConfig:
    return CaseConfig.model_validate(
        {"batch_size": 4, "max_new_tokens": 8, "warmup": 1, "repeat": repeat}
    )


def _measure(
    backend: FakeBackend,
    repeat: int | str = "auto",
    *,
    plan: AdaptivePlan | None = None,
    baseline: CaseRecord | None = None,
) -> CaseMeasurement:
    clock = backend.clock
    stop = AdaptiveStop(
        plan or AdaptivePlan(),
        clock,
        baseline=baseline,
        rules=GATE if baseline is not None else (),
    )
    meter = FakeMeter("gpu-fake", clock, [], power_w={"gpu": 100.0})
    return run_case(
        backend=backend,
        meters=[meter],
        config=_case(repeat),
        prompts=PROMPTS,
        clock=clock,
        adaptive=stop,
    )


def _baseline(step_s: float = BASE_STEP_S, repeat: int = 5) -> CaseRecord:
    measured = _measure(FakeBackend(FakeClock(), step_s=step_s), repeat)
    return CaseRecord(
        id="case", name="case", repetitions=measured.repetitions, metrics=measured.metrics
    )


def _record(adaptive: CaseMeasurement) -> AdaptiveRecord:
    assert adaptive.adaptive is not None
    return adaptive.adaptive


# --- the schedule ------------------------------------------------------------------------------


def test_looks_grow_geometrically_and_end_at_the_maximum() -> None:
    assert look_schedule(30) == (3, 5, 8, 12, 18, 27, 30)
    assert look_schedule(3) == (3,)
    assert look_schedule(4) == (3, 4)
    assert look_schedule(10) == (3, 5, 8, 10)


def test_every_look_is_bonferroni_corrected_over_the_planned_looks() -> None:
    assert AdaptivePlan().confidence == pytest.approx(1 - 0.05 / 7)
    assert AdaptivePlan(max_repeat=10).confidence == pytest.approx(1 - 0.05 / 4)
    assert AdaptivePlan(max_repeat=3).confidence == pytest.approx(0.95)


def test_a_higher_level_gives_a_wider_interval() -> None:
    values = [10.0, 11.0, 9.5, 10.4, 12.0, 9.0, 10.1, 10.8]
    low95, high95 = bootstrap_median_ci(values)
    low99, high99 = bootstrap_median_ci(values, 0.99)
    assert low99 <= low95
    assert high99 >= high95
    assert (high99 - low99) > (high95 - low95)
    r95 = ratio_interval(values, [v * 0.9 for v in values])
    r99 = ratio_interval(values, [v * 0.9 for v in values], 0.995)
    assert r95 is not None
    assert r99 is not None
    assert r99[1] < r95[1]
    assert r99[2] > r95[2]


# --- the rules ---------------------------------------------------------------------------------


def _reps(
    values: Sequence[float | None], metric: str = "output_tokens_per_s"
) -> list[RepetitionRecord]:
    return [
        RepetitionRecord(
            index=i, duration_s=1.0, requests=1, input_tokens=1, output_tokens=1, values={metric: v}
        )
        for i, v in enumerate(values)
    ]


def test_gate_look_waits_for_an_interval_that_straddles_the_threshold() -> None:
    base = CaseRecord(id="c", name="c", repetitions=_reps([100.0] * 5))
    clear = gate_look(base, _reps([80.0, 81.0, 79.0]), GATE, confidence=0.99)
    assert (clear.judged, clear.pending, clear.done) == (1, [], True)
    same = gate_look(base, _reps([100.0, 100.5, 99.5]), GATE, confidence=0.99)
    assert same.done  # unchanged is decided too
    straddling = gate_look(base, _reps([100.0, 90.0, 100.0, 90.0]), GATE, confidence=0.99)
    assert not straddling.done
    (pending,) = straddling.pending
    assert pending.startswith("output_tokens_per_s [0.9, 1]")
    assert "straddles output_tokens_per_s:-5%" in pending


def test_gate_look_does_not_wait_for_what_more_windows_cannot_decide() -> None:
    thin = CaseRecord(id="c", name="c", repetitions=_reps([100.0, 100.0]))
    assert gate_look(thin, _reps([50.0] * 3), GATE, confidence=0.99).judged == 0
    base = CaseRecord(id="c", name="c", repetitions=_reps([100.0] * 5))
    assert gate_look(base, _reps([None, None, None]), GATE, confidence=0.99).judged == 0


def test_width_look_names_the_metrics_still_too_wide() -> None:
    steady = _reps([50.0, 50.0, 50.0])
    assert width_look(steady, target=0.05, confidence=0.99).done
    swaying = _reps([40.0, 60.0, 40.0, 60.0, 50.0])
    look = width_look(swaying, target=0.05, confidence=0.99)
    assert not look.done
    assert look.pending[0].startswith("output_tokens_per_s ±")
    assert width_look(swaying, target=0.5, confidence=0.99).done
    # nothing measured: nothing judged, so the width rule cannot stop a case by itself
    assert width_look(_reps([None] * 3), target=0.05, confidence=0.99).judged == 0


# --- the runner --------------------------------------------------------------------------------


@pytest.mark.parametrize("step_s", [BASE_STEP_S * 1.3, BASE_STEP_S])
def test_a_decided_case_stops_at_the_first_look(step_s: float) -> None:
    measured = _measure(FakeBackend(FakeClock(), step_s=step_s), baseline=_baseline())
    record = _record(measured)
    assert len(measured.repetitions) == 3
    assert (record.windows, record.stop_reason, record.rule) == (3, "decided", "gate")
    assert record.looks == [3]
    assert record.confidence == pytest.approx(1 - 0.05 / 7)
    assert record.pending == []
    assert any(note.startswith("repeat=auto: 3 windows, decided") for note in measured.notes)


def test_an_undecided_case_runs_to_the_maximum() -> None:
    # every other window 30% slower: the interval of the ratio always straddles 0.95
    backend = SwayingBackend(FakeClock(), [BASE_STEP_S, BASE_STEP_S * 1.3])
    measured = _measure(backend, plan=AdaptivePlan(max_repeat=8), baseline=_baseline())
    record = _record(measured)
    assert len(measured.repetitions) == 8
    assert (record.windows, record.stop_reason, record.rule) == (8, "max_repeat", "gate")
    assert record.looks == [3, 5, 8]
    assert record.pending
    assert "straddles" in record.pending[0]


def test_the_time_budget_stops_before_the_next_window_would_overrun_it() -> None:
    backend = SwayingBackend(FakeClock(), [BASE_STEP_S, BASE_STEP_S * 1.3])
    budget = 5.0  # a window lasts about 0.4 s
    measured = _measure(backend, plan=AdaptivePlan(max_case_s=budget), baseline=_baseline())
    record = _record(measured)
    assert record.stop_reason == "max_case_s"
    assert 3 <= record.windows < 30
    assert record.elapsed_s is not None
    assert record.elapsed_s <= budget
    longest = max(rep.duration_s for rep in measured.repetitions)
    assert record.elapsed_s + longest > budget  # one more window would have overrun it
    assert record.looks[-1] == record.windows  # the final verdict is a look of its own


def test_the_time_budget_still_runs_the_first_three_windows() -> None:
    backend = SwayingBackend(FakeClock(), [BASE_STEP_S, BASE_STEP_S * 1.5])
    record = _record(_measure(backend, plan=AdaptivePlan(max_case_s=0.01)))
    assert (record.windows, record.stop_reason) == (3, "max_case_s")


def test_without_a_gate_the_width_target_decides() -> None:
    steady = _record(_measure(FakeBackend(FakeClock())))
    assert (steady.windows, steady.stop_reason, steady.rule) == (3, "target_ci", "target_ci")
    assert steady.target_ci == 0.05
    swaying = [BASE_STEP_S, BASE_STEP_S * 1.5]
    narrow = _record(
        _measure(SwayingBackend(FakeClock(), swaying), plan=AdaptivePlan(max_repeat=8))
    )
    assert (narrow.windows, narrow.stop_reason) == (8, "max_repeat")
    assert any(p.startswith("output_tokens_per_s ±") for p in narrow.pending)
    loose = _record(
        _measure(
            SwayingBackend(FakeClock(), swaying), plan=AdaptivePlan(max_repeat=8, target_ci=0.5)
        )
    )
    assert (loose.windows, loose.stop_reason) == (3, "target_ci")


def test_a_gate_without_this_case_in_the_baseline_falls_back_to_the_width_target() -> None:
    thin = _baseline(repeat=2)  # too few windows to judge anything
    record = _record(_measure(FakeBackend(FakeClock()), baseline=thin))
    assert (record.stop_reason, record.rule) == ("target_ci", "target_ci")


def test_a_fixed_repeat_ignores_the_plan() -> None:
    measured = _measure(FakeBackend(FakeClock()), 4)
    assert len(measured.repetitions) == 4
    assert measured.adaptive is None


def test_run_case_without_a_stop_rule_uses_the_default_plan() -> None:
    clock = FakeClock()
    measured = run_case(
        backend=FakeBackend(clock), meters=[], config=_case("auto"), prompts=PROMPTS, clock=clock
    )
    record = _record(measured)
    assert (record.windows, record.stop_reason, record.max_repeat) == (3, "target_ci", 30)


# --- the comparison ----------------------------------------------------------------------------


def _run(case: CaseRecord) -> RunRecord:
    return RunRecord(
        run_id="run",
        created_at=datetime.now(timezone.utc),
        machine=MachineInfo(hostname="h", platform="p", python="3"),
        cases=[case],
    )


def test_the_final_verdict_uses_the_corrected_level() -> None:
    base = CaseRecord(id="c", name="c", repetitions=_reps([100.0, 104.0, 98.0, 101.0, 99.0, 103.0]))
    current = _reps([93.0, 97.0, 91.0, 95.0, 92.0, 96.0])
    plain = CaseRecord(id="c", name="c", repetitions=current)
    adaptive = plain.model_copy(
        update={
            "adaptive": AdaptiveRecord(
                windows=6,
                stop_reason="max_repeat",
                rule="gate",
                planned_looks=20,
                confidence=1 - 0.05 / 20,
                max_repeat=6,
            )
        }
    )
    (fixed,) = compare_runs(_run(base), _run(plain), GATE).metrics
    (corrected,) = compare_runs(_run(base), _run(adaptive), GATE).metrics
    assert fixed.confidence == 0.95
    assert corrected.confidence == pytest.approx(0.9975)
    assert corrected.level == "99.8%"
    assert fixed.ratio is not None
    assert corrected.ratio is not None
    assert corrected.ratio.low < fixed.ratio.low
    assert corrected.ratio.high > fixed.ratio.high


# --- the false-alarm rate ----------------------------------------------------------------------


def _false_alarms(looks: Sequence[int], confidence: float, *, trials: int) -> float:
    """How often a current run exactly at the -5% threshold ends ``regressed`` when it stops at
    the first decided look (seeded, so the figure is the same on every machine)."""
    import numpy as np

    (rule,) = GATE
    rng = np.random.default_rng(7)
    regressed = 0
    for _ in range(trials):
        base = rng.normal(1.0, 0.05, 10)
        current = rng.normal(0.95, 0.05 * 0.95, max(looks))
        for n in looks:
            interval = ratio_interval(list(base), list(current[:n]), confidence)
            assert interval is not None
            verdict = classify(rule, interval[1], interval[2])
            if verdict != "inconclusive":
                break
        regressed += verdict == "regressed"
    return regressed / trials


@pytest.mark.slow
def test_the_corrected_looks_keep_the_false_alarm_rate_that_naive_looks_inflate() -> None:
    plan = AdaptivePlan()
    corrected = _false_alarms(plan.looks, plan.confidence, trials=120)
    naive = _false_alarms(range(3, 31), 0.95, trials=120)  # a 95% look after every window
    assert corrected <= 0.05  # one-sided nominal 2.5%; 5% is the two-sided level
    assert naive > 2 * corrected

"""Comparing runs: bootstrap ratio intervals, verdicts, matching, gating, environment checks and
the three renderings, on hand-built run records."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from pytest_llem.results.compare import (
    classify,
    compare_runs,
    difference_interval,
    environment_differences,
    format_breaches,
    format_table,
    match_cases,
    parameter_changes,
    ratio_interval,
    to_json,
    to_markdown,
)
from pytest_llem.results.gate import parse_fail_on
from pytest_llem.results.models import (
    CaseError,
    CaseRecord,
    GpuInfo,
    MachineInfo,
    MeterRecord,
    RepetitionRecord,
    RunRecord,
)
from pytest_llem.results.stats import summarise

EPT = "energy_per_output_token_j"
UNITS = {EPT: "J/token", "output_tokens_per_s": "tokens/s", "ttft_ms.p99": "ms", "energy_j": "J"}
PARAMS: dict[str, Any] = {
    "model": "llem-tiny",
    "batch_size": 1,
    "repeat": 5,
    "warmup": 1,
    "sampling": {"do_sample": False},
}


def case(
    case_id: str,
    values: Mapping[str, Sequence[float | None]],
    *,
    params: dict[str, Any] | None = None,
    source: str = "measured",
    outcome: str = "passed",
    repetitions: bool = True,
) -> CaseRecord:
    n = max((len(v) for v in values.values()), default=0)
    reps = [
        RepetitionRecord(
            index=i,
            duration_s=1.0,
            requests=4,
            input_tokens=40,
            output_tokens=64,
            values={name: v[i] if i < len(v) else None for name, v in values.items()},
        )
        for i in range(n)
    ]
    metrics = {
        name: summarise(v, unit=UNITS.get(name, ""), source=source) for name, v in values.items()
    }
    return CaseRecord.model_validate(
        {
            "id": case_id,
            "name": case_id.split("::")[-1],
            "params": params if params is not None else PARAMS,
            "metrics": metrics,
            "repetitions": reps if repetitions else [],
            "outcome": outcome,
        }
    )


def run(
    *cases: CaseRecord,
    gpus: Sequence[tuple[str, str | None]] = (),
    libraries: dict[str, str | None] | None = None,
    run_id: str = "0123456789abcdef",
) -> RunRecord:
    return RunRecord(
        run_id=run_id,
        created_at=datetime(2024, 5, 21, 10, 0, 0, tzinfo=timezone.utc),
        machine=MachineInfo(
            hostname="vm",
            platform="Linux-5.15.0-x86_64-with-glibc2.35",
            python="3.11.4",
            gpus=[GpuInfo(index=i, name=n, driver=d) for i, (n, d) in enumerate(gpus)],
            libraries=libraries if libraries is not None else {"torch": "2.3.0"},
            git_commit="abcdef1234567890",
        ),
        cases=list(cases),
    )


def pair(
    base: Mapping[str, Sequence[float | None]],
    cur: Mapping[str, Sequence[float | None]],
    *,
    base_source: str = "measured",
    cur_source: str = "measured",
) -> tuple[RunRecord, RunRecord]:
    return (
        run(case("t.py::test_a", base, source=base_source)),
        run(case("t.py::test_a", cur, source=cur_source), run_id="fedcba9876543210"),
    )


# --- bootstrap intervals ---------------------------------------------------------------------


def test_ratio_of_constant_windows_is_exact() -> None:
    assert ratio_interval([1.0] * 5, [1.2] * 5) == pytest.approx((1.2, 1.2, 1.2))
    assert ratio_interval([2.0] * 3, [1.0] * 3) == pytest.approx((0.5, 0.5, 0.5))


def test_ratio_interval_of_a_noisy_pair() -> None:
    # baseline median 1.0 (every window); current median 1.04 of [1.00 .. 1.10]. A resampled
    # current median is one of its values (n odd), so the interval's ends are values of it.
    got = ratio_interval([1.0] * 5, [1.0, 1.02, 1.04, 1.08, 1.10])
    assert got is not None
    ratio, low, high = got
    assert ratio == pytest.approx(1.04)
    assert low == pytest.approx(1.0)
    assert high == pytest.approx(1.10)
    assert ratio_interval([1.0] * 5, [1.0, 1.02, 1.04, 1.08, 1.10]) == got  # fixed seed


@pytest.mark.parametrize(
    ("baseline", "current"),
    [
        ([1.0, 1.0], [1.0, 1.0, 1.0]),  # fewer than 3 values
        ([1.0, 1.0, 1.0], [1.0, 1.0]),
        ([], []),
        ([0.0, 0.0, 0.0], [1.0, 1.0, 1.0]),  # baseline median 0
        ([-1.0, -2.0, -3.0], [1.0, 1.0, 1.0]),  # negative baseline (dynamic energy can be)
        ([1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]),  # negative current
        ([0.0, 0.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0]),  # a resampled baseline median is 0
    ],
)
def test_ratio_interval_undefined(baseline: list[float], current: list[float]) -> None:
    assert ratio_interval(baseline, current) is None


def test_ratio_of_a_current_median_of_zero() -> None:
    assert ratio_interval([50.0] * 3, [0.0] * 3) == pytest.approx((0.0, 0.0, 0.0))


def test_difference_interval() -> None:
    assert difference_interval([10.0] * 3, [12.0] * 3) == pytest.approx((2.0, 2.0, 2.0))
    # medians 100 and 130; resampled medians lie in [99, 101] and [129, 131]
    got = difference_interval([100.0, 101.0, 99.0], [130.0, 131.0, 129.0])
    assert got is not None
    assert got[0] == pytest.approx(30.0)
    assert 28.0 <= got[1] <= 30.0 <= got[2] <= 32.0
    assert difference_interval([-5.0] * 3, [-3.0] * 3) == pytest.approx((2.0, 2.0, 2.0))
    assert difference_interval([1.0, 1.0], [1.0, 2.0, 3.0]) is None


# --- verdict rules ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "low", "high", "verdict"),
    [
        ("energy_j:+5%", 1.06, 1.10, "regressed"),
        ("energy_j:+5%", 0.90, 0.94, "improved"),
        ("energy_j:+5%", 0.96, 1.04, "unchanged"),
        ("energy_j:+5%", 0.95, 1.05, "unchanged"),  # on the edge is not beyond it
        ("energy_j:+5%", 1.05, 1.05, "unchanged"),
        ("energy_j:+5%", 1.00, 1.08, "inconclusive"),
        ("energy_j:+5%", 0.93, 0.97, "inconclusive"),
        ("energy_j:+5%", 0.90, 1.10, "inconclusive"),
        ("output_tokens_per_s:-5%", 0.90, 0.94, "regressed"),
        ("output_tokens_per_s:-5%", 1.06, 1.10, "improved"),
        ("output_tokens_per_s:-5%", 0.92, 1.00, "inconclusive"),
        ("output_tokens_per_s:-5%", 0.97, 1.01, "unchanged"),
        ("ttft_ms.p99:+2", 2.5, 3.0, "regressed"),
        ("ttft_ms.p99:+2", -3.0, -2.5, "improved"),
        ("ttft_ms.p99:+2", -1.0, 1.0, "unchanged"),
        ("ttft_ms.p99:+2", 1.0, 3.0, "inconclusive"),
        ("goodput_rps:-0.5", -1.0, -0.6, "regressed"),
        ("goodput_rps:-0%", 0.99, 0.999, "regressed"),  # any significant drop
        ("goodput_rps:-0%", 1.0, 1.0, "unchanged"),
    ],
)
def test_classify(rule: str, low: float, high: float, verdict: str) -> None:
    (parsed,) = parse_fail_on(rule)
    assert classify(parsed, low, high) == verdict


# --- compare_runs ----------------------------------------------------------------------------


def test_regression_fails_with_a_summary_line() -> None:
    base, cur = pair({EPT: [1.0] * 5}, {EPT: [1.2] * 5})
    comparison = compare_runs(base, cur, parse_fail_on(f"{EPT}:+5%"))
    (m,) = comparison.metrics
    assert (m.case_id, m.metric, m.unit, m.source) == ("t.py::test_a", EPT, "J/token", "measured")
    assert (m.baseline_median, m.current_median) == (1.0, 1.2)
    assert (m.baseline_n, m.current_n) == (5, 5)
    assert m.ratio is not None
    assert (m.ratio.estimate, m.ratio.low, m.ratio.high) == pytest.approx((1.2, 1.2, 1.2))
    assert m.interval == m.ratio
    assert m.verdict == "regressed"
    assert m.gated
    assert comparison.regressions == [m]
    assert comparison.exit_code() == 1
    assert comparison.exit_code(True) == 1
    assert format_breaches(comparison) == [
        "t.py::test_a: energy_per_output_token_j regressed (limit +5%): baseline 1 J/token, "
        "current 1.2 J/token, ratio 1.2, 95% CI [1.2, 1.2]"
    ]


def test_noisy_pair_straddling_is_inconclusive() -> None:
    base, cur = pair({EPT: [1.0] * 5}, {EPT: [1.0, 1.02, 1.04, 1.08, 1.10]})
    comparison = compare_runs(base, cur, parse_fail_on(f"{EPT}:+5%"))
    (m,) = comparison.metrics
    assert m.ratio is not None
    assert m.ratio.low < 1.05 < m.ratio.high  # [1.0, 1.1] straddles 1.05
    assert m.verdict == "inconclusive"
    assert comparison.regressions == []
    assert comparison.inconclusive == [m]
    assert comparison.exit_code(False) == 0
    assert comparison.exit_code(True) == 1
    assert format_breaches(comparison) == []
    assert format_breaches(comparison, fail_inconclusive=True)[0].startswith(
        "t.py::test_a: energy_per_output_token_j inconclusive (limit +5%)"
    )


def test_improvement_and_unchanged() -> None:
    base, cur = pair(
        {EPT: [1.0] * 5, "output_tokens_per_s": [100.0] * 5},
        {EPT: [0.8] * 5, "output_tokens_per_s": [98.0, 99.0, 100.0, 101.0, 102.0]},
    )
    comparison = compare_runs(base, cur, parse_fail_on(f"{EPT}:+5%,output_tokens_per_s:-5%"))
    assert [m.verdict for m in comparison.metrics] == ["improved", "unchanged"]
    assert comparison.exit_code(True) == 0
    assert comparison.counts() == {
        "regressed": 0,
        "not judged": 0,
        "inconclusive": 0,
        "improved": 1,
        "unchanged": 1,
        "not comparable": 0,
    }


def test_throughput_drop_regresses() -> None:
    base, cur = pair({"output_tokens_per_s": [100.0] * 4}, {"output_tokens_per_s": [90.0] * 4})
    comparison = compare_runs(base, cur, parse_fail_on("output_tokens_per_s:-5%"))
    (m,) = comparison.metrics
    assert m.ratio is not None
    assert m.ratio.estimate == pytest.approx(0.9)
    assert m.verdict == "regressed"
    assert comparison.exit_code() == 1


def test_absolute_threshold_uses_the_difference() -> None:
    base, cur = pair({"ttft_ms.p99": [100.0] * 3}, {"ttft_ms.p99": [130.0] * 3})
    comparison = compare_runs(base, cur, parse_fail_on("ttft_ms.p99:+20"))
    (m,) = comparison.metrics
    assert m.difference is not None
    assert (m.difference.estimate, m.difference.low, m.difference.high) == (30.0, 30.0, 30.0)
    assert m.interval == m.difference
    assert m.ratio is not None
    assert m.ratio.estimate == pytest.approx(1.3)
    assert m.verdict == "regressed"
    assert format_breaches(comparison) == [
        "t.py::test_a: ttft_ms.p99 regressed (limit +20): baseline 100 ms, current 130 ms, "
        "difference 30, 95% CI [30, 30]"
    ]
    base, cur = pair({"ttft_ms.p99": [100.0] * 3}, {"ttft_ms.p99": [110.0] * 3})
    assert compare_runs(base, cur, parse_fail_on("ttft_ms.p99:+20")).metrics[0].verdict == (
        "unchanged"
    )


def test_absolute_threshold_works_where_a_ratio_cannot() -> None:
    # dynamic energy may be negative (METRICS.md): no ratio, but a difference
    base, cur = pair({"dynamic_energy_j": [-2.0] * 3}, {"dynamic_energy_j": [3.0] * 3})
    relative = compare_runs(base, cur, parse_fail_on("dynamic_energy_j:+5%")).metrics[0]
    assert (relative.verdict, relative.gated) == ("not judged", True)  # a gate cannot pass it
    assert relative.reason is not None
    assert "a median is not positive" in relative.reason
    absolute = compare_runs(base, cur, parse_fail_on("dynamic_energy_j:+1")).metrics[0]
    assert absolute.verdict == "regressed"


def test_estimated_energy_does_not_gate_unless_asked() -> None:
    base, cur = pair({EPT: [1.0] * 5}, {EPT: [1.2] * 5}, cur_source="estimated")
    rules = parse_fail_on(f"{EPT}:+5%")
    comparison = compare_runs(base, cur, rules)
    (m,) = comparison.metrics
    assert m.source == "estimated"  # either side estimated makes the comparison estimated
    assert m.verdict == "regressed"  # still computed and shown
    assert not m.gated
    assert m.reason == "estimated energy is not gated (--llem-gate-estimated gates it)"
    assert comparison.regressions == []
    assert comparison.exit_code(True) == 0
    gated = compare_runs(base, cur, rules, gate_estimated=True)
    assert gated.metrics[0].gated
    assert gated.exit_code() == 1


def test_estimated_source_from_repetitions_when_no_summary() -> None:
    base, cur = pair({EPT: [1.0] * 3}, {EPT: [1.2] * 3})
    reps = [
        r.model_copy(update={"energy_sources": {"cpu": "estimated"}})
        for r in cur.cases[0].repetitions
    ]
    cur.cases[0] = cur.cases[0].model_copy(update={"metrics": {}, "repetitions": reps})
    (m,) = compare_runs(base, cur, parse_fail_on(f"{EPT}:+5%")).metrics
    assert (m.source, m.verdict, m.gated) == ("estimated", "regressed", False)


def test_report_only_comparison_gates_nothing() -> None:
    base, cur = pair({EPT: [1.0] * 5}, {EPT: [1.2] * 5})
    comparison = compare_runs(base, cur, parse_fail_on(f"{EPT}:+5%"), gate=False)
    assert comparison.metrics[0].verdict == "regressed"
    assert not comparison.metrics[0].gated
    assert comparison.exit_code(True) == 0
    assert "(report only, nothing gated)" in format_table(comparison)


def test_too_few_values_is_not_comparable_in_a_report() -> None:
    base, cur = pair({EPT: [1.0]}, {EPT: [2.0, 2.0, None]})
    comparison = compare_runs(base, cur, parse_fail_on(f"{EPT}:+5%"), gate=False)
    (m,) = comparison.metrics
    assert m.verdict == "not comparable"
    assert not m.gated
    assert m.reason == (
        "baseline has 1 window; current has 2 windows: at least 3 windows per side are needed"
    )
    assert (m.baseline_median, m.current_median) == (1.0, 2.0)
    assert comparison.not_comparable == [m]
    assert comparison.exit_code(True) == 0
    gated = compare_runs(base, cur, parse_fail_on(f"{EPT}:+5%"))
    assert gated.not_judged == [dataclasses.replace(m, verdict="not judged", gated=True)]


def test_missing_metric_and_failed_case() -> None:
    base = run(case("t.py::test_a", {EPT: [1.0] * 3}))
    cur = run(case("t.py::test_a", {}, outcome="failed"))
    (m,) = compare_runs(base, cur, parse_fail_on(f"{EPT}:+5%")).metrics
    assert m.verdict == "not judged"
    assert m.current_median is None
    assert m.reason == (
        "current has no value (case failed): at least 3 windows per side are needed"
    )


def test_summary_fallback_without_repetitions() -> None:
    base = run(case("t.py::test_a", {EPT: [1.0, 1.0, 1.0]}, repetitions=False))
    cur = run(case("t.py::test_a", {EPT: [1.5, 1.5, 1.5]}))
    (m,) = compare_runs(base, cur, parse_fail_on(f"{EPT}:+5%")).metrics
    assert m.baseline_median == 1.0  # from the summary
    assert m.baseline_n == 1
    assert m.verdict == "not judged"


# --- matching --------------------------------------------------------------------------------


def test_match_cases_new_gone_and_changed_params() -> None:
    values = {EPT: [1.0, 1.0, 1.0]}
    changed = {**PARAMS, "batch_size": 4, "sampling": {"do_sample": True}}
    base = run(
        case("t.py::test_a", values),
        case("t.py::test_b", values),
        case("t.py::test_old", values),
    )
    cur = run(
        case("t.py::test_a", values, params={**PARAMS, "repeat": 10, "warmup": 0}),
        case("t.py::test_b", values, params=changed),
        case("t.py::test_new", values),
    )
    matched = match_cases(base, cur)
    # matched by id: a changed configuration is exactly what a comparison is asked to judge
    assert [(b.id, c.id) for b, c in matched.pairs] == [
        ("t.py::test_a", "t.py::test_a"),
        ("t.py::test_b", "t.py::test_b"),
    ]
    assert [(u.case.id, u.note) for u in matched.new] == [("t.py::test_new", None)]
    assert [(u.case.id, u.note) for u in matched.gone] == [("t.py::test_old", None)]
    pairs, new, gone = matched  # unpacks like a tuple
    assert (len(pairs), len(new), len(gone)) == (2, 1, 1)
    note = "parameters changed: batch_size 1 -> 4, sampling.do_sample False -> True"
    assert [(u.case.id, u.note) for u in parameter_changes(matched.pairs)] == [
        ("t.py::test_b", note)
    ]  # repeat and warmup do not count
    comparison = compare_runs(base, cur, parse_fail_on(f"{EPT}:+5%"))
    # the gone case cannot be judged under a gate; the new one is only listed
    assert [m.case_id for m in comparison.metrics] == [
        "t.py::test_a",
        "t.py::test_b",
        "t.py::test_old",
    ]
    table = format_table(comparison)
    assert "Compared although their parameters changed:\n  t.py::test_b (parameters changed:" in (
        table
    )
    assert "New cases (not in the baseline):\n  t.py::test_new" in table
    assert "Gone cases (not in this run):" in table
    assert "  t.py::test_old" in table


def test_added_or_removed_parameter_is_a_change() -> None:
    values = {EPT: [1.0, 1.0]}
    base = run(case("t.py::test_a", values))
    cur = run(case("t.py::test_a", values, params={**PARAMS, "seed": 1}))
    matched = match_cases(base, cur)
    assert len(matched.pairs) == 1
    assert parameter_changes(matched.pairs)[0].note == "parameters changed: seed '(unset)' -> 1"


def test_auto_device_and_dtype_compare_as_what_they_resolved_to() -> None:
    values = {EPT: [1.0, 1.0]}
    auto = {**PARAMS, "device": "auto", "dtype": "auto"}
    ran_cpu = {"device": "cpu", "dtype": "float32"}
    base = case("t.py::test_a", values, params=auto).model_copy(update={"backend_info": ran_cpu})
    # A baseline from before params held what ran still matches a record that says cpu/float32.
    same = case("t.py::test_a", values, params={**PARAMS, **ran_cpu})
    assert parameter_changes(match_cases(run(base), run(same)).pairs) == []
    # What auto became is a change when it differs.
    cuda = case("t.py::test_a", values, params={**PARAMS, "device": "cuda", "dtype": "bfloat16"})
    (changed,) = parameter_changes(match_cases(run(base), run(cuda)).pairs)
    assert changed.note == (
        "parameters changed: device 'cpu' -> 'cuda', dtype 'float32' -> 'bfloat16'"
    )


# --- environment -----------------------------------------------------------------------------


def test_environment_differences() -> None:
    base = run(
        gpus=[("NVIDIA H100 80GB HBM3", "535.104.05")],
        libraries={"torch": "2.3.0", "transformers": "4.41.0", "vllm": None, "numpy": "1.26"},
    )
    cur = run(
        gpus=[("NVIDIA A100-SXM4-40GB", "550.54.15"), ("NVIDIA A100-SXM4-40GB", "550.54.15")],
        libraries={"torch": "2.4.1", "transformers": "4.41.0", "vllm": "0.5.0", "numpy": "2.0"},
    )
    assert environment_differences(base, cur) == [
        "GPUs differ: baseline 1x NVIDIA H100 80GB HBM3, current 2x NVIDIA A100-SXM4-40GB",
        "GPU driver differs: baseline 535.104.05, current 550.54.15",
        "torch differs: baseline 2.3.0, current 2.4.1",
        "vllm differs: baseline not installed, current 0.5.0",
    ]
    assert environment_differences(base, base) == []


def test_environment_skips_what_one_run_did_not_record() -> None:
    base = run(gpus=[("NVIDIA H100", None)], libraries={})
    cur = run(gpus=[("NVIDIA H100", "550.54.15")], libraries={"torch": "2.4.1"})
    assert environment_differences(base, cur) == []
    assert environment_differences(run(), run(gpus=[("NVIDIA L4", None)])) == [
        "GPUs differ: baseline no GPU, current 1x NVIDIA L4"
    ]


def test_comparison_carries_environment_and_identity() -> None:
    base = run(case("t.py::test_a", {EPT: [1.0, 1.0]}), libraries={"torch": "2.3.0"})
    cur = run(case("t.py::test_a", {EPT: [1.0, 1.0]}), libraries={"torch": "2.4.1"})
    comparison = compare_runs(base, cur, parse_fail_on(f"{EPT}:+5%"), baseline_label="0003_main")
    assert comparison.environment == ("torch differs: baseline 2.3.0, current 2.4.1",)
    assert comparison.baseline.label == "0003_main"
    assert comparison.current.label == ("run 01234567 at 2024-05-21 10:00:00, commit abcdef12")
    assert comparison.current.machine == "vm-linux-x86_64-cpu"


# --- rendering -------------------------------------------------------------------------------


def _mixed() -> tuple[RunRecord, RunRecord]:
    base = run(
        case("t.py::test_a[bs=1|x]", {EPT: [1.0] * 5, "ttft_ms.p99": [100.0] * 3}),
        case("t.py::test_b", {EPT: [1.0] * 5}, source="estimated"),
    )
    cur = run(
        case("t.py::test_a[bs=1|x]", {EPT: [1.2] * 5, "ttft_ms.p99": [110.0] * 3}),
        case("t.py::test_b", {EPT: [1.3] * 5}, source="estimated"),
        case("t.py::test_c", {EPT: [1.0] * 5}),
    )
    return base, cur


def test_format_table() -> None:
    base, cur = _mixed()
    comparison = compare_runs(
        base, cur, parse_fail_on(f"{EPT}:+5%,ttft_ms.p99:+20"), baseline_label="0001_main"
    )
    lines = format_table(comparison).splitlines()
    assert lines[0] == "baseline: 0001_main"
    assert lines[2] == "2 cases compared: 2 regressed, 1 not judged, 1 unchanged"
    header, *rows = lines[3:8]
    assert header.split() == [
        "case",
        "metric",
        "rule",
        "baseline",
        "current",
        "ratio",
        "[95%",
        "CI]",
        "verdict",
    ]
    assert rows[0].split() == [
        "t.py::test_a[bs=1|x]",
        EPT,
        "+5%",
        "1",
        "J/token",
        "1.2",
        "J/token",
        "1.200",
        "[1.200,",
        "1.200]",
        "regressed",
    ]
    assert "+10 [+10, +10] ms" in rows[1]
    assert rows[2].endswith("regressed (not gated)")
    assert rows[3].split()[:2] == ["t.py::test_b", "ttft_ms.p99"]
    assert rows[3].endswith("not judged")  # test_b has no ttft_ms.p99 on either side
    assert "  t.py::test_c" in lines
    assert "Notes:" in lines
    assert comparison.exit_code() == 1  # test_a regressed; test_b is estimated


def test_to_markdown() -> None:
    base, cur = _mixed()
    comparison = compare_runs(base, cur, parse_fail_on(f"{EPT}:+5%"))
    text = to_markdown(comparison)
    assert text.startswith("### pytest-llem comparison\n\n2 cases compared: 2 regressed\n")
    assert "| Case | Metric | Rule | Baseline | Current | Ratio [95% CI] | Verdict |" in text
    assert (
        "| `t.py::test_a[bs=1\\|x]` | `energy_per_output_token_j` | +5% | 1 J/token | "
        "1.2 J/token | 1.200 [1.200, 1.200] | **regressed** |"
    ) in text
    assert "| regressed (not gated) |" in text  # estimated: a word, not bold
    assert "**New cases (not in the baseline):**\n- t.py::test_c" in text
    for ch in ("\u2705", "\u274c", "\u26a0"):
        assert ch not in text  # words, not emoji
    assert text.endswith("\n")


def test_markdown_escapes_pipes_outside_code() -> None:
    base = run(case("t.py::test_`a`|b", {EPT: [1.0] * 2}))
    cur = run(case("t.py::test_`a`|b", {EPT: [1.0] * 2}))
    text = to_markdown(compare_runs(base, cur, parse_fail_on(f"{EPT}:+5%")))
    assert "| t.py::test_`a`\\|b |" in text


def test_to_json_is_serialisable_and_complete() -> None:
    base, cur = _mixed()
    comparison = compare_runs(base, cur, parse_fail_on(f"{EPT}:+5%"))
    data = to_json(comparison)
    assert json.loads(json.dumps(data)) == data
    assert data["rules"] == [f"{EPT}:+5%"]
    assert data["exit_code"] == 1
    assert data["counts"]["regressed"] == 2
    first = data["metrics"][0]
    assert first["case"] == "t.py::test_a[bs=1|x]"
    assert first["ratio"] == pytest.approx({"estimate": 1.2, "low": 1.2, "high": 1.2})
    assert first["baseline"] == {"median": 1.0, "n": 5}
    assert (first["verdict"], first["gated"], first["source"]) == ("regressed", True, "measured")
    assert data["metrics"][1]["gated"] is False
    assert data["new"] == [{"case": "t.py::test_c", "note": None}]
    assert data["gone"] == []
    assert data["baseline"]["machine"] == "vm-linux-x86_64-cpu"
    assert len(data["breaches"]) == 1


def test_runs_that_covered_different_domains_are_flagged() -> None:
    def metered(used: dict[str, list[str]]) -> CaseRecord:
        base = case("t.py::test_a", {EPT: [1.0, 1.0]})
        meters = [
            MeterRecord(name=name, domains=domains, sources={}, used_for=domains)
            for name, domains in used.items()
        ]
        return base.model_copy(update={"meters": meters})

    nvml_only = run(metered({"nvml": ["gpu"]}))
    with_rapl = run(metered({"nvml": ["gpu"], "rapl": ["cpu", "dram"]}))
    assert environment_differences(nvml_only, with_rapl) == [
        "energy domains differ: baseline gpu, current gpu+cpu+dram (energy_j sums different "
        "domains; compare gpu_energy_j)"
    ]
    assert environment_differences(with_rapl, with_rapl) == []


# --- no silent pass: every gated metric is judged or fails the gate ---------------------------


def test_two_windows_per_side_give_no_interval() -> None:
    # METRICS.md: n < 3 gives no interval, so no verdict either
    assert ratio_interval([1.0, 1.0], [10.0, 10.0]) is None
    assert difference_interval([1.0, 1.0], [10.0, 10.0]) is None
    assert ratio_interval([1.0] * 3, [10.0] * 3) == pytest.approx((10.0, 10.0, 10.0))


def test_two_windows_per_side_cannot_be_judged() -> None:
    base, cur = pair({"output_tokens_per_s": [100.0] * 2}, {"output_tokens_per_s": [10.0] * 2})
    comparison = compare_runs(base, cur, parse_fail_on("output_tokens_per_s:-5%"))
    (m,) = comparison.metrics
    assert m.verdict == "not judged"
    assert m.gated
    assert m.reason == (
        "baseline has 2 windows; current has 2 windows: at least 3 windows per side are needed"
    )
    assert comparison.exit_code() == 1
    assert format_breaches(comparison) == [
        "t.py::test_a: output_tokens_per_s could not be judged (limit -5%): baseline has 2 "
        "windows; current has 2 windows: at least 3 windows per side are needed"
    ]


def test_one_window_per_side_fails_the_gate_even_with_fail_inconclusive() -> None:
    base, cur = pair({"output_tokens_per_s": [100.0]}, {"output_tokens_per_s": [10.0]})
    comparison = compare_runs(base, cur, parse_fail_on("output_tokens_per_s:-0.001%"))
    assert [m.verdict for m in comparison.metrics] == ["not judged"]
    assert comparison.exit_code(fail_inconclusive=True) == 1
    assert comparison.counts()["not judged"] == 1
    data = to_json(comparison, fail_inconclusive=True)
    assert data["exit_code"] == 1
    assert data["breaches"][0].startswith(
        "t.py::test_a: output_tokens_per_s could not be judged (limit -0.001%): baseline has 1 "
        "window; current has 1 window"
    )


def test_a_failed_current_case_fails_the_gate() -> None:
    base = run(case("t.py::test_a", {EPT: [1.0] * 3}))
    failed = case("t.py::test_a", {}, outcome="failed").model_copy(
        update={"error": CaseError(type="RuntimeError", message="boom")}
    )
    comparison = compare_runs(base, run(failed), parse_fail_on(f"{EPT}:+5%"))
    (m,) = comparison.metrics
    assert (m.verdict, m.gated) == ("not judged", True)
    assert m.reason == (
        "current has no value (case failed: RuntimeError: boom): at least 3 windows per side "
        "are needed"
    )
    assert comparison.exit_code() == 1


def test_a_case_gone_from_the_current_run_fails_the_gate_and_a_new_one_does_not() -> None:
    values = {EPT: [1.0] * 3}
    base = run(case("t.py::test_a", values), case("t.py::test_old", values))
    cur = run(case("t.py::test_a", values), case("t.py::test_new", values))
    comparison = compare_runs(base, cur, parse_fail_on(f"{EPT}:+5%"))
    verdicts = {m.case_id: (m.verdict, m.gated, m.reason) for m in comparison.metrics}
    assert verdicts == {
        "t.py::test_a": ("unchanged", True, None),
        "t.py::test_old": ("not judged", True, "not in the current run"),
    }
    assert format_breaches(comparison) == [
        "t.py::test_old: energy_per_output_token_j could not be judged (limit +5%): not in the "
        "current run"
    ]
    assert [u.case.id for u in comparison.new] == ["t.py::test_new"]
    # without a gate a gone case is only listed, as before
    report_only = compare_runs(base, cur, parse_fail_on(f"{EPT}:+5%"), gate=False)
    assert [m.case_id for m in report_only.metrics] == ["t.py::test_a"]
    assert report_only.exit_code() == 0


def test_a_current_run_without_cases_fails_the_gate() -> None:
    base = run(case("t.py::test_a", {EPT: [1.0] * 3}))
    comparison = compare_runs(base, run(), parse_fail_on(f"{EPT}:+5%"))
    assert comparison.exit_code() == 1
    assert format_breaches(comparison) == [
        "the current run has no case: nothing to judge",
        "t.py::test_a: energy_per_output_token_j could not be judged (limit +5%): not in the "
        "current run",
    ]


def test_estimated_energy_that_cannot_be_judged_is_still_not_gated() -> None:
    base, cur = pair({EPT: [1.0]}, {EPT: [2.0]}, cur_source="estimated")
    comparison = compare_runs(base, cur, parse_fail_on(f"{EPT}:+5%"))
    (m,) = comparison.metrics
    assert (m.verdict, m.gated) == ("not comparable", False)
    assert comparison.exit_code(True) == 0


def test_report_only_keeps_not_comparable() -> None:
    base, cur = pair({EPT: [1.0]}, {EPT: [2.0]})
    comparison = compare_runs(base, cur, parse_fail_on(f"{EPT}:+5%"), gate=False)
    (m,) = comparison.metrics
    assert (m.verdict, m.gated) == ("not comparable", False)
    assert m.reason is not None
    assert m.reason.endswith("at least 3 windows per side are needed")


def _skipped(case_id: str, why: str) -> CaseRecord:
    return case(case_id, {}, outcome="skipped").model_copy(update={"notes": [why]})


def test_a_baseline_without_a_measured_case_says_so_and_fails_a_gate() -> None:
    base = run(
        _skipped("t.py::test_a", "no GPU"),
        case("t.py::test_b", {}, outcome="failed").model_copy(
            update={"error": CaseError(type="ModelLoadError", message="no such model")}
        ),
    )
    cur = run(case("t.py::test_a", {EPT: [1.0] * 3}), case("t.py::test_b", {EPT: [1.0] * 3}))
    problem = "the baseline has no measured case (1 skipped, 1 failed): nothing to compare against"
    report_only = compare_runs(base, cur, parse_fail_on(f"{EPT}:+5%"), gate=False)
    assert report_only.problems == (problem,)
    assert report_only.exit_code() == 0
    table = format_table(report_only)
    assert problem in table
    assert "Not measured in the baseline (nothing to compare against):" in table
    assert "  t.py::test_a (skipped: no GPU)" in table
    assert "  t.py::test_b (failed: ModelLoadError: no such model)" in table
    gated = compare_runs(base, cur, parse_fail_on(f"{EPT}:+5%"))
    assert gated.exit_code() == 1
    assert format_breaches(gated)[0] == problem
    assert problem in to_markdown(gated)
    assert to_json(gated)["problems"] == [problem]


def test_a_case_skipped_in_the_baseline_is_listed_not_gated() -> None:
    # a skipped case was deliberately not measured (a rule, missing hardware): nothing to judge
    values = {EPT: [1.0] * 3}
    base = run(case("t.py::test_a", values), _skipped("t.py::test_gpu", "needs a GPU"))
    cur = run(case("t.py::test_a", values), _skipped("t.py::test_gpu", "needs a GPU"))
    comparison = compare_runs(base, cur, parse_fail_on(f"{EPT}:+5%"))
    assert [m.case_id for m in comparison.metrics] == ["t.py::test_a"]
    assert [(u.case.id, u.note) for u in comparison.unmeasured] == [
        ("t.py::test_gpu", "skipped: needs a GPU")
    ]
    assert comparison.problems == ()
    assert comparison.exit_code(True) == 0


def test_a_case_failed_in_the_baseline_cannot_be_judged() -> None:
    values = {EPT: [1.0] * 3}
    crashed = case("t.py::test_b", {}, outcome="error").model_copy(
        update={"error": CaseError(type="KeyboardInterrupt", message="interrupted")}
    )
    base = run(case("t.py::test_a", values), crashed)
    cur = run(case("t.py::test_a", values), case("t.py::test_b", values))
    comparison = compare_runs(base, cur, parse_fail_on(f"{EPT}:+5%"))
    m = comparison.metrics[1]
    assert (m.case_id, m.verdict, m.gated) == ("t.py::test_b", "not judged", True)
    assert m.reason == (
        "baseline has no value (case error: KeyboardInterrupt: interrupted): at least 3 windows "
        "per side are needed"
    )
    assert comparison.exit_code() == 1


# --- llem compare ----------------------------------------------------------------------------


def _write(path: Path, record: RunRecord) -> Path:
    path.write_text(record.model_dump_json(), encoding="utf-8")
    return path


def test_cli_compare_against_a_run_without_cases_fails_the_gate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pytest_llem.cli import main

    base = _write(tmp_path / "base.json", run(case("t.py::test_a", {EPT: [1.0] * 3})))
    empty = _write(tmp_path / "empty.json", run(run_id="fedcba9876543210"))
    assert main(["compare", str(base), str(empty)]) == 0  # a report alone never fails
    assert "the current run has no case: nothing to judge" in capsys.readouterr().err
    assert main(["compare", str(base), str(empty), f"--fail-on={EPT}:+5%"]) == 1
    out = capsys.readouterr().out
    assert "the current run has no case: nothing to judge" in out
    assert (
        "t.py::test_a: energy_per_output_token_j could not be judged (limit +5%): not in the "
        "current run"
    ) in out
    assert main(["compare", str(base), str(empty), f"--fail-on={EPT}:+5%", "--format=json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["exit_code"] == 1
    assert data["problems"] == ["the current run has no case: nothing to judge"]
    assert data["metrics"][0]["verdict"] == "not judged"


def test_cli_compare_with_one_window_per_side_fails_naming_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pytest_llem.cli import main

    tps = "output_tokens_per_s"
    base = _write(tmp_path / "base.json", run(case("t.py::test_a", {tps: [100.0]})))
    cur = _write(tmp_path / "cur.json", run(case("t.py::test_a", {tps: [10.0]})))
    args = ["compare", str(base), str(cur), f"--fail-on={tps}:-0.001%", "--fail-inconclusive"]
    assert main(args) == 1
    assert (
        "t.py::test_a: output_tokens_per_s could not be judged (limit -0.001%): baseline has 1 "
        "window; current has 1 window: at least 3 windows per side are needed"
    ) in capsys.readouterr().out.splitlines()
    assert main([*args, "--format=markdown"]) == 1
    assert "| not judged |" in capsys.readouterr().out


def test_cli_compare_against_a_baseline_of_skipped_cases_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pytest_llem.cli import main

    base = _write(tmp_path / "base.json", run(_skipped("t.py::test_a", "no GPU")))
    cur = _write(tmp_path / "cur.json", run(case("t.py::test_a", {EPT: [1.0] * 3})))
    problem = "the baseline has no measured case (1 skipped): nothing to compare against"
    assert main(["compare", str(base), str(cur)]) == 0
    assert f"llem compare: warning: {problem}" in capsys.readouterr().err
    assert main(["compare", str(base), str(cur), f"--fail-on={EPT}:+5%"]) == 1
    assert problem in capsys.readouterr().out.splitlines()

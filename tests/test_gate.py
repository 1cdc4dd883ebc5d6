"""Gate expressions and budgets: the fail-on grammar, every parse error, marker limits and
budget checks on hand-built cases."""

from __future__ import annotations

import pytest

from pytest_llem.exceptions import GateError
from pytest_llem.results.gate import (
    FAIL_ON_EXAMPLE,
    GATE_METRICS,
    BudgetRule,
    GateRule,
    canonical_metric,
    check_budget,
    evaluate_budget,
    parse_budget,
    parse_fail_on,
)
from pytest_llem.results.models import CaseResult, MetricSummary
from pytest_llem.results.stats import summarise

# --- metric names ----------------------------------------------------------------------------


def test_gate_metrics_follow_metrics_md() -> None:
    assert "energy_per_output_token_j" in GATE_METRICS
    assert "dynamic_energy_per_output_token_j" in GATE_METRICS
    assert "goodput_rps" in GATE_METRICS
    assert "peak_memory_mb" in GATE_METRICS
    for base in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        for suffix in ("p50", "p90", "p95", "p99", "mean", "max"):
            assert f"{base}.{suffix}" in GATE_METRICS
        assert base not in GATE_METRICS  # a latency needs its statistic
    for name in ("request_energy_j.p50", "request_energy_j.p99", "prefill_energy_j"):
        assert name in GATE_METRICS  # attributed energy gates too
    assert len(GATE_METRICS) == 13 + 4 * 6 + 6 + 2


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("energy_j", "energy_j"),
        (" ttft_ms.p99 ", "ttft_ms.p99"),
        ("ttft_ms_p99", "ttft_ms.p99"),
        ("itl_ms_mean", "itl_ms.mean"),
        ("ttft_ms", None),
        ("ttft_ms.p42", None),
        ("output_tokens_per_j", None),  # a metric, but not one that gates
    ],
)
def test_canonical_metric(name: str, expected: str | None) -> None:
    assert canonical_metric(name) == expected


# --- fail-on ---------------------------------------------------------------------------------


def test_parse_fail_on_example() -> None:
    rules = parse_fail_on(FAIL_ON_EXAMPLE)
    assert rules == [
        GateRule("energy_per_output_token_j", "+", 0.05, True, "energy_per_output_token_j:+5%"),
        GateRule("output_tokens_per_s", "-", 0.05, True, "output_tokens_per_s:-5%"),
        GateRule("ttft_ms.p99", "+", 0.10, True, "ttft_ms.p99:+10%"),
    ]
    assert rules[0].describe() == "rises by more than 5%"
    assert rules[1].describe() == "falls by more than 5%"
    assert rules[2].limit_text == "+10%"


def test_parse_fail_on_absolute_spacing_and_underscores() -> None:
    rules = parse_fail_on(" energy_per_output_token_j : +0.02 , ttft_ms_p99:+20, ")
    assert [(r.metric, r.direction, r.threshold, r.relative) for r in rules] == [
        ("energy_per_output_token_j", "+", 0.02, False),
        ("ttft_ms.p99", "+", 20.0, False),
    ]
    assert rules[0].text == "energy_per_output_token_j:+0.02"
    assert rules[0].describe() == "rises by more than 0.02"
    assert rules[1].limit_text == "+20"


def test_parse_fail_on_fractional_percent_and_zero() -> None:
    (rule,) = parse_fail_on("avg_power_w:+2.5%")
    assert rule.threshold == pytest.approx(0.025)
    (rule,) = parse_fail_on("goodput_rps:-0%")  # any significant drop fails
    assert (rule.direction, rule.threshold, rule.relative) == ("-", 0.0, True)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty fail-on expression"),
        (" , ", "empty fail-on expression"),
        ("energy_j", "(a ':' is missing)"),
        ("enrgy_j:+5%", "unknown metric 'enrgy_j' (did you mean 'energy_j'?)"),
        ("ttft_ms:+5%", "unknown metric 'ttft_ms'"),
        ("energy_j:5%", "needs a direction: '+' (fail when it rises) or '-'"),
        ("energy_j:", "threshold '' needs a direction"),
        ("energy_j:+five%", "is not a number with an optional '%'"),
        ("energy_j:+5%%", "is not a number with an optional '%'"),
        ("energy_j:+nan", "is not a number with an optional '%'"),
        ("energy_j:+1e999", "is not finite"),
        ("output_tokens_per_s:-100%", "a fall of 100% or more can never be exceeded"),
        (
            "output_tokens_per_s:+5%",
            "higher output_tokens_per_s is better, so '+' would fail on an improvement; "
            "write output_tokens_per_s:-5%",
        ),
        (
            "ttft_ms.p99:-10%",
            "lower ttft_ms.p99 is better, so '-' would fail on an improvement; "
            "write ttft_ms.p99:+10%",
        ),
        ("energy_j:+5%,energy_j:+10%", "energy_j is already gated by 'energy_j:+5%'"),
        ("ttft_ms.p99:+5%,ttft_ms_p99:+20", "ttft_ms.p99 is already gated"),
    ],
)
def test_parse_fail_on_errors(text: str, message: str) -> None:
    with pytest.raises(GateError) as info:
        parse_fail_on(text)
    assert message in str(info.value)
    assert FAIL_ON_EXAMPLE in str(info.value)  # every error shows the grammar


def test_parse_fail_on_error_names_the_part_and_known_metrics() -> None:
    with pytest.raises(GateError) as info:
        parse_fail_on("energy_j:+5%, bogus:+1%")
    text = str(info.value)
    assert text.startswith("fail-on part 'bogus:+1%': unknown metric 'bogus'")
    assert "peak_memory_mb" in text
    assert "ttft_ms|tpot_ms|itl_ms|e2e_ms with .p50|.p90|.p95|.p99|.mean|.max" in text


# --- budgets ---------------------------------------------------------------------------------


def test_parse_budget_issue_example() -> None:
    rules = parse_budget(
        {"energy_per_output_token_j": 0.5, "ttft_ms_p99": 200, "output_tokens_per_s_min": 50}
    )
    assert rules == [
        BudgetRule("energy_per_output_token_j", 0.5, "max"),
        BudgetRule("ttft_ms.p99", 200.0, "max"),
        BudgetRule("output_tokens_per_s", 50.0, "min"),
    ]
    assert all(isinstance(rule.limit, float) for rule in rules)


def test_parse_budget_suffixes() -> None:
    rules = parse_budget(
        {
            "peak_memory_mb_max": 1024,
            "ttft_ms_max": 500,  # the latency statistic ttft_ms.max, an upper limit
            "ttft_ms_p99_max": 300,
            "e2e_ms.p50": 900,
            "goodput_rps_min": 2,
            "goodput_rps_max": 10,
        }
    )
    assert [(r.metric, r.kind, r.limit) for r in rules] == [
        ("peak_memory_mb", "max", 1024.0),
        ("ttft_ms.max", "max", 500.0),
        ("ttft_ms.p99", "max", 300.0),
        ("e2e_ms.p50", "max", 900.0),
        ("goodput_rps", "min", 2.0),
        ("goodput_rps", "max", 10.0),
    ]
    assert rules[0].describe("MB") == "at most 1024 MB"
    assert rules[4].describe() == "at least 2"


def test_parse_budget_unknown_names_are_all_named() -> None:
    with pytest.raises(GateError) as info:
        parse_budget({"energy_j": 1.0, "enrgy_per_token": 1.0, "ttft_ms_min": 5})
    text = str(info.value)
    assert "unknown metric 'enrgy_per_token'" in text
    assert "unknown metric 'ttft_ms_min'" in text
    assert "NAME or NAME_max is an upper limit, NAME_min a lower one" in text


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"energy_j": "1"}, "energy_j='1' is not a number"),
        ({"energy_j": True}, "energy_j=True is not a number"),
        ({"energy_j": float("inf")}, "energy_j=inf is not finite"),
        ({"energy_j": 1, "energy_j_max": 2}, "energy_j_max and energy_j both set the max"),
        ({"ttft_ms_p99": 1, "ttft_ms.p99": 2}, "both set the max of ttft_ms.p99"),
        (
            {"output_tokens_per_s_min": 50, "output_tokens_per_s_max": 40},
            "output_tokens_per_s at least 50 and at most 40 can never both hold",
        ),
    ],
)
def test_parse_budget_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(GateError, match=r"^llem_budget: ") as info:
        parse_budget(kwargs)
    assert message in str(info.value)


def _case(**metrics: MetricSummary) -> CaseResult:
    return CaseResult(metrics=metrics)


def test_check_budget_within_limits() -> None:
    case = _case(
        energy_per_output_token_j=summarise([0.4, 0.45, 0.5], unit="J/token"),
        output_tokens_per_s=summarise([60.0, 55.0, 70.0], unit="tokens/s"),
    )
    rules = parse_budget({"energy_per_output_token_j": 0.5, "output_tokens_per_s_min": 50})
    # the median 0.45 is compared, so a window at exactly the limit does not breach it
    assert check_budget(case, rules) == []


def test_check_budget_breach_messages() -> None:
    energy = summarise([0.6, 0.62, 0.65], unit="J/token")
    assert energy.ci95_low is not None
    assert energy.ci95_high is not None
    case = _case(
        energy_per_output_token_j=energy,
        output_tokens_per_s=summarise([40.0, 45.0], unit="tokens/s"),
    )
    rules = parse_budget({"energy_per_output_token_j": 0.5, "output_tokens_per_s_min": 50})
    breaches = check_budget(case, rules)
    assert breaches == [
        "energy_per_output_token_j: median 0.62 J/token (95% CI "
        f"{energy.ci95_low:.4g} to {energy.ci95_high:.4g}; n=3) exceeds the budget of "
        "at most 0.5 J/token",
        "output_tokens_per_s: median 42.5 tokens/s (no interval: fewer than 3 repetitions; "
        "n=2) falls below the budget of at least 50 tokens/s",
    ]


def test_check_budget_unmeasurable_is_a_breach() -> None:
    case = _case(energy_per_output_token_j=summarise([None, None], unit="J/token", note="no meter"))
    rules = parse_budget({"energy_per_output_token_j": 0.5, "ttft_ms_p99": 200})
    assert check_budget(case, rules) == [
        "energy_per_output_token_j: could not be measured (no meter), so the budget of "
        "at most 0.5 J/token cannot be checked",
        "ttft_ms.p99: could not be measured (not in this case), so the budget of at most 200 "
        "cannot be checked",
    ]


def test_estimated_energy_is_noted_not_enforced_unless_asked() -> None:
    case = _case(energy_j=summarise([12.0, 11.0, 13.0], unit="J", source="estimated"))
    rules = parse_budget({"energy_j": 10})
    outcome = evaluate_budget(case, rules)
    assert outcome.breaches == []
    (note,) = outcome.notes
    assert note.startswith("energy_j: estimated median 12 J")
    assert "would exceed the budget of at most 10 J" in note
    assert "--llem-gate-estimated" in note
    assert check_budget(case, rules) == []
    (breach,) = check_budget(case, rules, gate_estimated=True)
    assert breach.startswith("energy_j: median 12 J (95% CI")
    assert breach.endswith("exceeds the budget of at most 10 J")


def test_estimated_within_budget_note() -> None:
    case = _case(energy_j=summarise([8.0, 9.0, 7.0], unit="J", source="estimated"))
    outcome = evaluate_budget(case, parse_budget({"energy_j": 10}))
    assert outcome.breaches == []
    assert "is within the budget" in outcome.notes[0]

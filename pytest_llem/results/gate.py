"""Gate expressions and budgets: which metrics may move how far, and absolute limits per test.

``--llem-fail-on`` (and ``llem compare --fail-on``) is parsed here into :class:`GateRule` objects
that :mod:`pytest_llem.results.compare` applies between two runs; the ``llem_budget`` marker is
parsed into :class:`BudgetRule` objects checked against one case's medians by
:func:`check_budget`.

A budget compares the **median over the measured repetitions** of each metric (for a latency
such as ``ttft_ms.p99``: the median over repetitions of each window's p99) with its limit; the
95% bootstrap interval of that median is printed beside it but does not decide.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from pytest_llem.exceptions import GateError
from pytest_llem.results.catalogue import LATENCY_METRICS, LATENCY_STATISTICS, metrics_in
from pytest_llem.results.models import CaseResult, MetricSummary

__all__ = [
    "ENERGY_METRICS",
    "FAIL_ON_EXAMPLE",
    "GATE_METRICS",
    "HIGHER_IS_BETTER",
    "LATENCY_BASES",
    "LATENCY_SUFFIXES",
    "BudgetOutcome",
    "BudgetRule",
    "GateRule",
    "canonical_metric",
    "check_budget",
    "evaluate_budget",
    "parse_budget",
    "parse_fail_on",
]

#: The grammar's example, quoted in every parse error.
FAIL_ON_EXAMPLE = "energy_per_output_token_j:+5%,output_tokens_per_s:-5%,ttft_ms.p99:+10%"

_GATED = metrics_in(gated=True)
#: Gate metrics that are energy figures: these follow the meters' source and do not gate when
#: estimated.
ENERGY_METRICS: frozenset[str] = frozenset(m.name for m in _GATED if m.follows_meters)
#: Gate metrics for which a higher value is better; for every other one lower is better.
HIGHER_IS_BETTER: frozenset[str] = frozenset(m.name for m in _GATED if m.better == "higher")
_SCALARS: tuple[str, ...] = tuple(m.name for m in _GATED if m.family not in LATENCY_METRICS)
#: Per-request latencies; in a gate or budget each needs one of :data:`LATENCY_SUFFIXES`.
LATENCY_BASES: tuple[str, ...] = LATENCY_METRICS
#: Per-window latency statistics a gate or budget may name (``ttft_ms.p99``), percentiles
#: first as METRICS.md lists them.
LATENCY_SUFFIXES: tuple[str, ...] = tuple(
    sorted(LATENCY_STATISTICS, key=lambda stat: not stat.startswith("p"))
)
#: Every metric name a gate or budget accepts (METRICS.md, "Metric names used in gates"): the
#: catalogue's gated metrics.
GATE_METRICS: tuple[str, ...] = _SCALARS + tuple(
    f"{base}.{suffix}" for base in LATENCY_BASES for suffix in LATENCY_SUFFIXES
)
_KNOWN = frozenset(GATE_METRICS)
_UNDERSCORED = {name.replace(".", "_"): name for name in GATE_METRICS if "." in name}
_KNOWN_TEXT = (
    ", ".join(_SCALARS)
    + f", or a latency {'|'.join(LATENCY_BASES)} with .{'|.'.join(LATENCY_SUFFIXES)}"
)
_THRESHOLD = re.compile(r"^([+-])\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*(%?)$")


def canonical_metric(name: str) -> str | None:
    """The canonical gate name of ``name``, accepting ``_`` for ``.`` in a latency name.

    Returns:
        ``"ttft_ms.p99"`` for ``"ttft_ms.p99"`` or ``"ttft_ms_p99"``; None for an unknown name.
    """
    name = name.strip()
    if name in _KNOWN:
        return name
    return _UNDERSCORED.get(name)


def _unknown(name: str) -> str:
    close = difflib.get_close_matches(name, [*GATE_METRICS, *_UNDERSCORED], n=1, cutoff=0.6)
    hint = f" (did you mean {canonical_metric(close[0])!r}?)" if close else ""
    return f"unknown metric {name!r}{hint}; known: {_KNOWN_TEXT}"


@dataclass(frozen=True)
class GateRule:
    """One part of a fail-on expression: how far a metric may move before the gate fails.

    ``direction`` ``+`` means higher is worse (the rule fails when the metric rises), ``-``
    means lower is worse. ``threshold`` is a fraction (0.05 for 5%) when ``relative``, else an
    amount in the metric's unit.
    """

    metric: str
    direction: Literal["+", "-"]
    threshold: float
    relative: bool
    text: str

    def describe(self) -> str:
        """The rule in words, e.g. ``rises by more than 5%``."""
        verb = "rises" if self.direction == "+" else "falls"
        amount = f"{self.threshold * 100:g}%" if self.relative else f"{self.threshold:g}"
        return f"{verb} by more than {amount}"

    @property
    def limit_text(self) -> str:
        """The threshold as written, e.g. ``+5%`` or ``-0.02``."""
        amount = f"{self.threshold * 100:g}%" if self.relative else f"{self.threshold:g}"
        return f"{self.direction}{amount}"


def _gate_error(part: str, detail: str) -> GateError:
    return GateError(f"fail-on part {part!r}: {detail}; expected e.g. {FAIL_ON_EXAMPLE!r}")


def _parse_rule(part: str) -> GateRule:
    metric_text, sep, threshold_text = part.partition(":")
    if not sep:
        raise _gate_error(part, "expected METRIC:THRESHOLD (a ':' is missing)")
    metric = canonical_metric(metric_text)
    if metric is None:
        raise _gate_error(part, _unknown(metric_text.strip()))
    threshold_text = threshold_text.strip()
    if threshold_text[:1] not in ("+", "-"):
        raise _gate_error(
            part,
            f"threshold {threshold_text!r} needs a direction: '+' (fail when it rises) or "
            "'-' (fail when it falls)",
        )
    match = _THRESHOLD.match(threshold_text)
    if match is None:
        raise _gate_error(
            part,
            f"threshold {threshold_text!r} is not a number with an optional '%' "
            "(+5% relative, +0.02 absolute in the metric's unit)",
        )
    sign, number, percent = match.groups()
    direction: Literal["+", "-"] = "+" if sign == "+" else "-"
    value = float(number)
    if not math.isfinite(value):
        raise _gate_error(part, f"threshold {threshold_text!r} is not finite")
    relative = percent == "%"
    if relative and direction == "-" and value >= 100:
        raise _gate_error(part, "a fall of 100% or more can never be exceeded")
    worse = "-" if metric in HIGHER_IS_BETTER else "+"
    if direction != worse:
        better = "higher" if worse == "-" else "lower"
        raise _gate_error(
            part,
            f"{better} {metric} is better, so '{direction}' would fail on an improvement; "
            f"write {metric}:{worse}{number}{percent}",
        )
    return GateRule(
        metric=metric,
        direction=direction,
        threshold=value / 100 if relative else value,
        relative=relative,
        text=f"{metric}:{threshold_text.replace(' ', '')}",
    )


def parse_fail_on(text: str) -> list[GateRule]:
    """Parse a fail-on expression: comma-separated ``METRIC:+5%``, ``METRIC:-5%`` or
    ``METRIC:+0.02`` (absolute, in the metric's unit).

    The direction must be the metric's worse one: ``+`` for energy, power, latency and memory
    (lower is better), ``-`` for ``output_tokens_per_s``, ``requests_per_s`` and
    ``goodput_rps`` (higher is better), so a misplaced sign cannot silently turn the gate
    around. Empty parts (a trailing comma) are ignored.

    Args:
        text: The expression, e.g. :data:`FAIL_ON_EXAMPLE`.

    Returns:
        One rule per part, in the order given.

    Raises:
        GateError: an unknown metric, a missing or wrong direction, a malformed threshold,
            a metric given twice, or no rule at all; the message names the part and quotes
            an example of the grammar.
    """
    rules: list[GateRule] = []
    seen: dict[str, str] = {}
    for raw in text.split(","):
        part = raw.strip()
        if not part:
            continue
        rule = _parse_rule(part)
        if rule.metric in seen:
            raise _gate_error(part, f"{rule.metric} is already gated by {seen[rule.metric]!r}")
        seen[rule.metric] = part
        rules.append(rule)
    if not rules:
        raise GateError(f"empty fail-on expression; expected e.g. {FAIL_ON_EXAMPLE!r}")
    return rules


@dataclass(frozen=True)
class BudgetRule:
    """An absolute limit on one metric's median: at most (``max``) or at least (``min``)."""

    metric: str
    limit: float
    kind: Literal["max", "min"]

    def describe(self, unit: str = "") -> str:
        """The limit in words, e.g. ``at most 0.5 J/token``."""
        words = "at most" if self.kind == "max" else "at least"
        return f"{words} {self.limit:g}{f' {unit}' if unit else ''}"


def _budget_key(key: str) -> tuple[str, Literal["max", "min"]] | None:
    metric = canonical_metric(key)
    if metric is not None:
        return metric, "max"
    for suffix in ("_min", "_max"):
        if key.endswith(suffix):
            metric = canonical_metric(key.removesuffix(suffix))
            if metric is not None:
                return metric, "min" if suffix == "_min" else "max"
    return None


def _limit(key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise GateError(f"llem_budget: {key}={value!r} is not a number")
    if not math.isfinite(value):
        raise GateError(f"llem_budget: {key}={value!r} is not finite")
    return float(value)


def parse_budget(kwargs: Mapping[str, object]) -> list[BudgetRule]:
    """Parse the keyword arguments of ``@pytest.mark.llem_budget``.

    ``NAME=x`` and ``NAME_max=x`` set an upper limit, ``NAME_min=x`` a lower one. NAME is a gate
    metric; a latency may be spelt with ``_`` for ``.`` (``ttft_ms_p99`` is ``ttft_ms.p99``,
    ``ttft_ms_max`` is ``ttft_ms.max``, ``ttft_ms_p99_max`` an upper limit on ``ttft_ms.p99``).

    Args:
        kwargs: The marker's keyword arguments.

    Returns:
        One rule per keyword, in the order given.

    Raises:
        GateError: unknown names (all of them, in one message), a limit that is not a finite
            number, the same limit given twice, or a lower limit above the upper one.
    """
    rules: list[BudgetRule] = []
    unknown: list[str] = []
    given: dict[tuple[str, str], str] = {}
    for key, value in kwargs.items():
        parsed = _budget_key(key)
        if parsed is None:
            unknown.append(key)
            continue
        metric, kind = parsed
        if (metric, kind) in given:
            raise GateError(
                f"llem_budget: {key} and {given[metric, kind]} both set the {kind} of {metric}"
            )
        given[metric, kind] = key
        rules.append(BudgetRule(metric=metric, limit=_limit(key, value), kind=kind))
    if unknown:
        details = "; ".join(_unknown(name) for name in unknown)
        raise GateError(
            f"llem_budget: {details} (NAME or NAME_max is an upper limit, NAME_min a lower one)"
        )
    _check_ranges(rules)
    return rules


def _check_ranges(rules: Sequence[BudgetRule]) -> None:
    upper = {rule.metric: rule.limit for rule in rules if rule.kind == "max"}
    for rule in rules:
        if rule.kind == "min" and rule.metric in upper and rule.limit > upper[rule.metric]:
            raise GateError(
                f"llem_budget: {rule.metric} at least {rule.limit:g} and at most "
                f"{upper[rule.metric]:g} can never both hold"
            )


@dataclass(frozen=True)
class BudgetOutcome:
    """What a budget check found: breach messages (the test fails) and notes (it does not)."""

    breaches: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _measured(summary: MetricSummary) -> str:
    unit = f" {summary.unit}" if summary.unit else ""
    if summary.ci95_low is not None and summary.ci95_high is not None:
        interval = f"95% CI {summary.ci95_low:.4g} to {summary.ci95_high:.4g}"
    else:
        interval = "no interval: fewer than 3 repetitions"
    return f"median {summary.median:.4g}{unit} ({interval}; n={summary.n})"


def _check_one(
    case: CaseResult, rule: BudgetRule, *, gate_estimated: bool
) -> tuple[str | None, str | None]:
    summary = case.metrics.get(rule.metric)
    unit = summary.unit if summary is not None else ""
    limit = rule.describe(unit)
    if summary is None or summary.median is None or math.isnan(summary.median):
        why = summary.note if summary is not None and summary.note else "not in this case"
        return (
            f"{rule.metric}: could not be measured ({why}), so the budget of {limit} "
            "cannot be checked",
            None,
        )
    ok = summary.median <= rule.limit if rule.kind == "max" else summary.median >= rule.limit
    if summary.source == "estimated" and not gate_estimated:
        state = "would exceed" if not ok else "is within"
        return None, (
            f"{rule.metric}: estimated {_measured(summary)} {state} the budget of {limit}; "
            "estimated energy is not enforced (--llem-gate-estimated enforces it)"
        )
    if ok:
        return None, None
    verb = "exceeds" if rule.kind == "max" else "falls below"
    return f"{rule.metric}: {_measured(summary)} {verb} the budget of {limit}", None


def evaluate_budget(
    case: CaseResult, rules: Iterable[BudgetRule], *, gate_estimated: bool = False
) -> BudgetOutcome:
    """Check a case's medians against budget rules.

    The median over repetitions is compared with each limit. A metric with no value is a
    breach (a budget that cannot be checked must not pass silently). An estimated metric (for
    instance CodeCarbon's TDP model) gives a note instead, unless ``gate_estimated``.

    Args:
        case: The measured case.
        rules: From :func:`parse_budget`.
        gate_estimated: Enforce limits on estimated figures too.

    Returns:
        Breach messages naming the metric, the measured median with its 95% interval and the
        limit; and notes for limits that were not enforced.
    """
    outcome = BudgetOutcome()
    for rule in rules:
        breach, note = _check_one(case, rule, gate_estimated=gate_estimated)
        if breach:
            outcome.breaches.append(breach)
        if note:
            outcome.notes.append(note)
    return outcome


def check_budget(
    case: CaseResult, rules: Iterable[BudgetRule], *, gate_estimated: bool = False
) -> list[str]:
    """The breach messages of :func:`evaluate_budget` (empty when every limit holds).

    Example message: ``energy_per_output_token_j: median 0.62 J/token (95% CI 0.6 to 0.65;
    n=5) exceeds the budget of at most 0.5 J/token``.
    """
    return evaluate_budget(case, rules, gate_estimated=gate_estimated).breaches

"""Calibrating the gate: what a fail-on expression does on this machine, measured from N runs.

``llem calibrate RUN [RUN ...]`` and ``pytest --llem-calibrate=N`` give N independent runs of
the same cases. Per case and gated metric this module reports the spread between runs (the
coefficient of variation of the runs' medians), the false-alarm rate of the gate on A/A pairs
(every ordered pair of two different runs, compared exactly as ``--llem-compare`` compares a
baseline with a current run: a pair reported ``regressed`` is a false alarm), and the smallest
regression the gate catches in 80% of those pairs (one side of each pair scaled until the
interval clears the threshold). From these it recommends a ``--llem-fail-on`` expression: per
metric, the smallest threshold of :data:`THRESHOLD_LADDER` whose A/A false-alarm rate over all
cases is at most :data:`MAX_FALSE_ALARM_RATE` and which a normal model of the between-run
spread allows too (:func:`_model_floor`: a few pairs without a false alarm prove little).

Everything here reads run records only (no harness), so the pytest form and ``llem calibrate``
share it, and the result goes into the run record as ``RunRecord.calibration``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from pytest_llem.results.compare import case_values
from pytest_llem.results.comparison import (
    MIN_WINDOWS,
    classify,
    difference_interval,
    ratio_interval,
)
from pytest_llem.results.gate import GateRule
from pytest_llem.results.models import CaseRecord, RunRecord

__all__ = [
    "FEW_RUNS",
    "MAX_FALSE_ALARM_RATE",
    "POWER",
    "THRESHOLD_LADDER",
    "Calibration",
    "MetricCalibration",
    "calibrate_runs",
    "calibration_lines",
    "detectable_regression",
    "runs_of_record",
]

#: The share of pairs in which a regression must be caught (the "80% power" of the report).
POWER = 0.8
#: The highest A/A false-alarm rate a recommended threshold may have.
MAX_FALSE_ALARM_RATE = 0.05
#: Fewer runs than this get a note that the rates are rough.
FEW_RUNS = 5
#: Relative thresholds tried for the recommendation, smallest first.
THRESHOLD_LADDER: tuple[float, ...] = (0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3, 0.5)

Triple = tuple[float, float, float]


@dataclass(frozen=True)
class MetricCalibration:
    """One gated metric of one case over N runs.

    ``detectable`` is the smallest regression the rule catches in :data:`POWER` of the A/A
    pairs: a fraction (0.08 for 8%) for a relative rule, an amount in ``unit`` for an absolute
    one; None with ``note`` saying why when it cannot be computed. ``half_width`` is the median
    half-width of the A/A pairs' intervals (of the ratio, or in ``unit`` for an absolute rule).
    """

    case_id: str
    metric: str
    rule: str
    relative: bool
    unit: str
    runs: int
    windows: int
    run_medians: list[float]
    between_run_cv: float | None
    within_run_cv: float | None
    pairs: int
    half_width: float | None
    false_alarms: int
    false_alarm_rate: float | None
    detectable: float | None
    note: str | None = None


@dataclass(frozen=True)
class Calibration:
    """The calibration of a gate over N runs: per case and metric, and the recommendation."""

    runs: int
    fail_on: str
    metrics: tuple[MetricCalibration, ...]
    recommended: dict[str, str]
    notes: tuple[str, ...] = ()
    recommended_detectable: dict[str, float | None] = field(default_factory=dict)

    @property
    def recommendation(self) -> str | None:
        """The recommended ``--llem-fail-on`` expression (None when no metric could be
        calibrated)."""
        return ",".join(self.recommended.values()) or None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the run record's ``calibration`` and ``llem calibrate --json``)."""
        return {
            "runs": self.runs,
            "fail_on": self.fail_on,
            "power": POWER,
            "max_false_alarm_rate": MAX_FALSE_ALARM_RATE,
            "metrics": [asdict(m) for m in self.metrics],
            "recommended": dict(self.recommended),
            "recommendation": self.recommendation,
            "recommended_detectable": dict(self.recommended_detectable),
            "notes": list(self.notes),
        }


# --- runs ------------------------------------------------------------------------------------


def runs_of_record(record: RunRecord) -> list[RunRecord]:
    """The N runs a ``--llem-calibrate=N`` record holds: the record itself (each case's first
    run) and one record per further run, built from the cases' ``calibration_runs``.

    Returns:
        ``[record]`` when no case carries calibration runs.
    """
    extra = max((len(case.calibration_runs) for case in record.cases), default=0)
    runs = [record]
    for index in range(extra):
        cases = [
            case.model_copy(update={"repetitions": case.calibration_runs[index], "metrics": {}})
            for case in record.cases
            if index < len(case.calibration_runs)
        ]
        runs.append(record.model_copy(update={"cases": cases, "comparison": None}))
    return runs


def _case_groups(runs: Sequence[RunRecord]) -> dict[str, list[CaseRecord]]:
    """Per case id (in the first run's order), its record in every run that measured it."""
    groups: dict[str, list[CaseRecord]] = {}
    for record in runs:
        for case in record.cases:
            if case.outcome == "passed" or case.repetitions:
                groups.setdefault(case.id, []).append(case)
    return groups


# --- statistics ------------------------------------------------------------------------------


def _cv(values: Sequence[float]) -> float | None:
    import numpy as np

    if len(values) < 2:
        return None
    mean = float(np.mean(values))
    return float(np.std(values, ddof=1)) / abs(mean) if mean else None


def _pair_intervals(groups: Sequence[Sequence[float]], rule: GateRule) -> list[Triple]:
    """The interval of every ordered A/A pair (baseline run i, current run j, i != j)."""
    found = []
    for i, base in enumerate(groups):
        for j, cur in enumerate(groups):
            if i == j:
                continue
            got = ratio_interval(base, cur) if rule.relative else difference_interval(base, cur)
            if got is not None:
                found.append(got)
    return found


def _needed(rule: GateRule, low: float, high: float) -> float:
    """The smallest regression (fraction or amount) that makes one pair ``regressed``."""
    t = rule.threshold
    if rule.relative:
        if rule.direction == "+":
            need = (1 + t) / low - 1 if low > 0 else math.inf
        else:
            need = 1 - (1 - t) / high if high > 0 else math.inf
    else:
        need = t - low if rule.direction == "+" else high + t
    return max(need, 0.0)


def detectable_regression(rule: GateRule, intervals: Sequence[Triple]) -> float | None:
    """The smallest regression ``rule`` reports as ``regressed`` in :data:`POWER` of the pairs.

    A regression of d scales the current side of a pair by ``1 + d`` (a rising-is-worse
    metric) or ``1 - d`` (a falling-is-worse one) for a relative rule, or shifts it by d for an
    absolute one. The bootstrap interval of a ratio scales with it exactly (the same resamples),
    so each pair's smallest caught regression follows from its A/A interval alone.

    Returns:
        The fraction (relative) or amount (absolute); None without a pair, or when the rule
        catches no regression in enough pairs (a relative falling-is-worse rule caps at 100%).
    """
    if not intervals:
        return None
    needs = sorted(_needed(rule, low, high) for _, low, high in intervals)
    value = needs[math.ceil(POWER * len(needs)) - 1]
    falls_to_zero = rule.relative and rule.direction == "-" and value >= 1.0
    return value if math.isfinite(value) and not falls_to_zero else None


def _false_alarms(rule: GateRule, intervals: Sequence[Triple]) -> int:
    return sum(classify(rule, low, high) == "regressed" for _, low, high in intervals)


def _metric(
    case_id: str,
    cases: Sequence[CaseRecord],
    rule: GateRule,
    groups: Sequence[Sequence[float]],
    intervals: Sequence[Triple],
) -> MetricCalibration:
    """One case's metric: ``groups`` are its runs' window values, ``intervals`` its A/A pairs'."""
    import numpy as np

    medians = [float(np.median(g)) for g in groups]
    within = [cv for g in groups if (cv := _cv(g)) is not None]
    usable = [g for g in groups if len(g) >= MIN_WINDOWS]
    note = None
    if len(usable) < 2:
        note = f"{len(usable)} run(s) with at least {MIN_WINDOWS} windows: no A/A pair"
    elif not intervals:
        note = "no interval: a median is not positive (use an absolute threshold)"
    unit = next((c.metrics[rule.metric].unit for c in cases if rule.metric in c.metrics), "")
    alarms = _false_alarms(rule, intervals)
    return MetricCalibration(
        case_id=case_id,
        metric=rule.metric,
        rule=rule.text,
        relative=rule.relative,
        unit=unit,
        runs=len(groups),
        windows=int(np.median([len(g) for g in groups])) if groups else 0,
        run_medians=medians,
        between_run_cv=_cv(medians),
        within_run_cv=float(np.median(within)) if within else None,
        pairs=len(intervals),
        half_width=float(np.median([(high - low) / 2 for _, low, high in intervals]))
        if intervals
        else None,
        false_alarms=alarms,
        false_alarm_rate=alarms / len(intervals) if intervals else None,
        detectable=detectable_regression(rule, intervals),
        note=note,
    )


def _model_floor(rule: GateRule, metrics: Sequence[MetricCalibration]) -> float:
    """The smallest threshold the normal model allows over the rule's cases.

    Between two runs the ratio of medians varies with a relative spread of about
    ``sqrt(2) * between_run_cv``; the gate reports ``regressed`` when it moves past the
    threshold plus the interval's half-width. Keeping that below :data:`MAX_FALSE_ALARM_RATE`
    (one-sided, z = 1.645) needs ``threshold >= 1.645 * sqrt(2) * cv - half_width``. This guards
    the recommendation where a few pairs happened to show no false alarm.
    """
    z = 1.6448536269514722  # the normal quantile of 1 - MAX_FALSE_ALARM_RATE
    floors = [
        z * math.sqrt(2) * m.between_run_cv - m.half_width
        for m in metrics
        if m.rule == rule.text and m.between_run_cv is not None and m.half_width is not None
    ]
    return max(floors, default=0.0)


def _relative(rule: GateRule, threshold: float) -> GateRule:
    text = f"{rule.metric}:{rule.direction}{threshold * 100:g}%"
    return GateRule(
        metric=rule.metric, direction=rule.direction, threshold=threshold, relative=True, text=text
    )


def _recommend(rule: GateRule, intervals: Sequence[Triple], floor: float) -> GateRule | None:
    """The rule with the smallest ladder threshold at or above ``floor`` whose A/A
    false-alarm rate is within the limit."""
    if not intervals:
        return None
    for threshold in THRESHOLD_LADDER:
        candidate = _relative(rule, threshold)
        rate = _false_alarms(candidate, intervals) / len(intervals)
        if threshold >= floor and rate <= MAX_FALSE_ALARM_RATE:
            return candidate
    return None


def _recommended(
    rules: Sequence[GateRule],
    pooled: dict[str, list[Triple]],
    metrics: Sequence[MetricCalibration],
) -> tuple[dict[str, str], dict[str, float | None], list[str]]:
    """Per rule, the recommended rule text and the regression it catches with 80% power (over
    every case's pairs), and notes for the rules left out.

    A rule that keeps false alarms down only because its intervals are so wide that it catches
    nothing up to the top of the ladder is left out too: it would never fail.
    """
    recommended: dict[str, str] = {}
    caught: dict[str, float | None] = {}
    notes: list[str] = []
    top = THRESHOLD_LADDER[-1]
    for rule in rules:
        if not rule.relative:
            notes.append(f"{rule.text}: an absolute threshold, kept as given")
            recommended[rule.metric] = rule.text
            continue
        chosen = _recommend(rule, pooled[rule.text], _model_floor(rule, metrics))
        detectable = detectable_regression(chosen, pooled[rule.text]) if chosen else None
        if not pooled[rule.text]:
            notes.append(f"{rule.metric}: no A/A pair (no case has it in two runs): left out")
        elif chosen is None:
            notes.append(
                f"{rule.metric}: no threshold up to {top:.0%} keeps A/A false alarms within the "
                "limit: do not gate it on this machine"
            )
        elif detectable is None or detectable > top:
            notes.append(
                f"{rule.metric}: its windows vary so much that no regression up to {top:.0%} is "
                "caught in 80% of the pairs: left out (more windows, --llem-repeat, or a longer "
                "workload narrow the interval)"
            )
        else:
            recommended[rule.metric] = chosen.text
            caught[rule.metric] = detectable
    return recommended, caught, notes


def calibrate_runs(runs: Sequence[RunRecord], rules: Sequence[GateRule]) -> Calibration:
    """Calibrate ``rules`` on N runs of the same cases (matched by case id).

    Args:
        runs: Two or more run records (or the runs of one calibrated record,
            :func:`runs_of_record`).
        rules: The gate (from :func:`~pytest_llem.results.gate.parse_fail_on`).

    Returns:
        One :class:`MetricCalibration` per case and rule, and the recommended rules.
    """
    metrics: list[MetricCalibration] = []
    pooled: dict[str, list[Triple]] = {rule.text: [] for rule in rules}
    for case_id, group in _case_groups(runs).items():
        for rule in rules:
            groups = [v for case in group if len(v := case_values(case, rule.metric)[0]) > 0]
            intervals = _pair_intervals([g for g in groups if len(g) >= MIN_WINDOWS], rule)
            pooled[rule.text].extend(intervals)
            metrics.append(_metric(case_id, group, rule, groups, intervals))
    recommended, caught, notes = _recommended(rules, pooled, metrics)
    if len(runs) < FEW_RUNS:
        notes.append(
            f"{len(runs)} runs: a false-alarm rate from so few A/A pairs is rough; calibrate with "
            f"at least {FEW_RUNS} runs (10 is better)"
        )
    return Calibration(
        runs=len(runs),
        fail_on=",".join(rule.text for rule in rules),
        metrics=tuple(metrics),
        recommended=recommended,
        notes=tuple(notes),
        recommended_detectable=caught,
    )


# --- rendering -------------------------------------------------------------------------------


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def _detectable(item: MetricCalibration) -> str:
    if item.detectable is None:
        return "-"
    return _percent(item.detectable) if item.relative else f"{item.detectable:g} {item.unit}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Columns padded to their widest cell; the first two left-aligned, figures right."""
    widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=False))
        ).rstrip()

    return [line(header), *(line(row) for row in rows)]


def calibration_lines(calibration: Calibration) -> list[str]:
    """The calibration as terminal lines: a table, then notes and the recommendation."""
    header = ("case", "rule", "runs", "between-run CV", "A/A false alarms", "80% power at")
    rows = [
        [
            item.case_id,
            item.rule,
            str(item.runs),
            _percent(item.between_run_cv),
            f"{item.false_alarms}/{item.pairs} ({_percent(item.false_alarm_rate)})"
            if item.pairs
            else "-",
            _detectable(item),
        ]
        for item in calibration.metrics
    ]
    lines = [
        f"calibration over {calibration.runs} runs, gate {calibration.fail_on} "
        f"(A/A pairs: every ordered pair of two runs)"
    ]
    lines.extend(_table(header, rows))
    lines.extend(f"note: {m.case_id} {m.metric}: {m.note}" for m in calibration.metrics if m.note)
    lines.extend(f"note: {note}" for note in calibration.notes)
    if calibration.recommendation:
        lines.append(f"recommended: --llem-fail-on={calibration.recommendation}")
        caught = ", ".join(
            f"{metric} {_percent(d)}" for metric, d in calibration.recommended_detectable.items()
        )
        if caught:
            lines.append(f"  it catches in 80% of the A/A pairs a regression of: {caught}")
    else:
        lines.append("recommended: nothing can be gated reliably from these runs")
    return lines

"""Comparing two runs: matched cases, ratios of medians with bootstrap intervals, verdicts.

The regression test of METRICS.md ("Repetitions and statistics"): for every case present in
both runs and every gated metric, the ratio of medians (current / baseline) over the measured
repetitions and its 95% bootstrap interval decide the verdict. Under a gate nothing passes
silently: a gated metric of a measured baseline case that gets no verdict (too few windows, no
value, the case failed or is gone) is ``not judged`` and fails the gate, and so does a baseline
with no measured case or a current run with no case. The plugin's terminal summary and
``llem compare`` both render a :class:`Comparison` with the functions at the end.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
import numpy.typing as npt

from pytest_llem.config.resolve import flatten_paths
from pytest_llem.harness.stats import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED
from pytest_llem.results.gate import ENERGY_METRICS, GateRule
from pytest_llem.results.models import CaseRecord, MachineInfo, RunRecord
from pytest_llem.results.storage import machine_id

__all__ = [
    "ENVIRONMENT_LIBRARIES",
    "IGNORED_PARAMS",
    "MIN_WINDOWS",
    "CaseMatch",
    "Comparison",
    "Interval",
    "MetricComparison",
    "RunIdentity",
    "UnmatchedCase",
    "Verdict",
    "classify",
    "compare_runs",
    "difference_interval",
    "environment_differences",
    "format_breaches",
    "format_table",
    "match_cases",
    "parameter_changes",
    "ratio_interval",
    "to_json",
    "to_markdown",
]

#: ``not judged`` is a gated metric without a verdict (it fails the gate); ``not comparable`` is
#: an ungated one (report only, or estimated energy).
Verdict = Literal[
    "regressed", "improved", "unchanged", "inconclusive", "not judged", "not comparable"
]
_VERDICTS: tuple[Verdict, ...] = (
    "regressed",
    "not judged",
    "inconclusive",
    "improved",
    "unchanged",
    "not comparable",
)
#: Case parameters that never change a result, so cases still match when they differ.
IGNORED_PARAMS: frozenset[str] = frozenset({"repeat", "warmup"})
#: Windows each side needs for an interval, and so for a verdict (METRICS.md: n < 3 gives no
#: interval, as for every metric's summary).
MIN_WINDOWS = 3
#: Libraries whose versions are compared between runs (with the GPUs and the driver).
ENVIRONMENT_LIBRARIES: tuple[str, ...] = ("torch", "transformers", "vllm", "tensorrt-llm")

_FloatArray = npt.NDArray[np.float64]


# --- bootstrap -------------------------------------------------------------------------------


def _clean(values: Iterable[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def _resampled_medians(
    baseline: Sequence[float], current: Sequence[float]
) -> tuple[_FloatArray, _FloatArray]:
    """Bootstrap medians of each side, resampled independently from one seeded generator."""
    base = np.asarray(baseline, dtype=np.float64)
    cur = np.asarray(current, dtype=np.float64)
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    base_picks = rng.integers(0, base.size, size=(BOOTSTRAP_RESAMPLES, base.size))
    cur_picks = rng.integers(0, cur.size, size=(BOOTSTRAP_RESAMPLES, cur.size))
    return np.median(base[base_picks], axis=1), np.median(cur[cur_picks], axis=1)


def _interval(estimate: float, samples: _FloatArray) -> tuple[float, float, float]:
    low, high = np.percentile(samples, [2.5, 97.5])
    return estimate, float(low), float(high)


def ratio_interval(
    baseline: Sequence[float], current: Sequence[float]
) -> tuple[float, float, float] | None:
    """The ratio of medians (current / baseline) and its 95% bootstrap interval.

    Each side is resampled independently (:data:`~pytest_llem.harness.stats.BOOTSTRAP_RESAMPLES`
    resamples, fixed seed), and the interval is the 2.5th and 97.5th percentiles of the
    resampled ratios.

    Args:
        baseline: Per-window values of the baseline.
        current: Per-window values of the current run.

    Returns:
        ``(ratio, low, high)``; None when either side has fewer than :data:`MIN_WINDOWS`
        values, when the baseline's median (or any resampled one) is not positive, or when the
        current median is negative: a ratio means nothing there.
    """
    if len(baseline) < MIN_WINDOWS or len(current) < MIN_WINDOWS:
        return None
    base_median = float(np.median(np.asarray(baseline, dtype=np.float64)))
    cur_median = float(np.median(np.asarray(current, dtype=np.float64)))
    if base_median <= 0 or cur_median < 0:
        return None
    base_samples, cur_samples = _resampled_medians(baseline, current)
    if float(base_samples.min()) <= 0:
        return None
    return _interval(cur_median / base_median, cur_samples / base_samples)


def difference_interval(
    baseline: Sequence[float], current: Sequence[float]
) -> tuple[float, float, float] | None:
    """The difference of medians (current - baseline) and its 95% bootstrap interval.

    Resampled exactly as :func:`ratio_interval`; used by absolute thresholds.

    Returns:
        ``(difference, low, high)``; None when either side has fewer than
        :data:`MIN_WINDOWS` values.
    """
    if len(baseline) < MIN_WINDOWS or len(current) < MIN_WINDOWS:
        return None
    base_median = float(np.median(np.asarray(baseline, dtype=np.float64)))
    cur_median = float(np.median(np.asarray(current, dtype=np.float64)))
    base_samples, cur_samples = _resampled_medians(baseline, current)
    return _interval(cur_median - base_median, cur_samples - base_samples)


def classify(rule: GateRule, low: float, high: float) -> Verdict:
    """The verdict of an interval under a rule.

    For a relative threshold t the interval is of the ratio and the band is [1 - t, 1 + t];
    for an absolute one it is of the difference and the band is [-t, +t]. ``regressed`` when
    the whole interval lies strictly beyond the band on the worse side, ``improved`` when it
    lies strictly beyond it on the better side, ``unchanged`` when it lies within the band, and
    ``inconclusive`` when it straddles an edge.
    """
    centre = 1.0 if rule.relative else 0.0
    upper, lower = centre + rule.threshold, centre - rule.threshold
    above, below = low > upper, high < lower
    if above or below:
        rising_is_worse = rule.direction == "+"
        return "regressed" if above == rising_is_worse else "improved"
    if low >= lower and high <= upper:
        return "unchanged"
    return "inconclusive"


# --- matching --------------------------------------------------------------------------------


class UnmatchedCase(NamedTuple):
    """A case in only one of the runs; ``note`` says why when its id is in both."""

    case: CaseRecord
    note: str | None = None


class CaseMatch(NamedTuple):
    """Cases of two runs: matched pairs (baseline, current), new ones and gone ones."""

    pairs: list[tuple[CaseRecord, CaseRecord]]
    new: list[UnmatchedCase]
    gone: list[UnmatchedCase]


def _relevant(case: CaseRecord) -> dict[str, Any]:
    params = dict(case.params)
    for name in ("device", "dtype"):
        # Records before params held what ran say "auto": compare what it resolved to.
        ran = case.backend_info.get(name)
        if params.get(name) == "auto" and isinstance(ran, str):
            params[name] = ran
    return {k: v for k, v in flatten_paths(params).items() if k not in IGNORED_PARAMS}


def _param_changes(base: dict[str, Any], cur: dict[str, Any]) -> str:
    keys = sorted(set(base) | set(cur))
    missing = "(unset)"
    changed = [
        f"{k} {base.get(k, missing)!r} -> {cur.get(k, missing)!r}"
        for k in keys
        if base.get(k, missing) != cur.get(k, missing)
    ]
    return "parameters changed: " + ", ".join(changed)


def match_cases(baseline: RunRecord, current: RunRecord) -> CaseMatch:
    """Match the cases of two runs by case id.

    A case whose resolved parameters changed (``--llem-set batch_size=1`` against a baseline
    run with 8, say) is still compared: that is what a regression check of a configuration
    change is for. :func:`parameter_changes` names the changes (parameters in
    :data:`IGNORED_PARAMS` do not count).

    Returns:
        Pairs in the current run's order, then new cases (current only) and gone cases
        (baseline only).
    """
    base_by_id = {case.id: case for case in baseline.cases}
    cur_ids = {case.id for case in current.cases}
    pairs: list[tuple[CaseRecord, CaseRecord]] = []
    new: list[UnmatchedCase] = []
    for case in current.cases:
        base = base_by_id.get(case.id)
        if base is None:
            new.append(UnmatchedCase(case))
        else:
            pairs.append((base, case))
    gone = [UnmatchedCase(case) for case in baseline.cases if case.id not in cur_ids]
    return CaseMatch(pairs, new, gone)


def parameter_changes(pairs: list[tuple[CaseRecord, CaseRecord]]) -> list[UnmatchedCase]:
    """The matched cases whose resolved parameters differ, each with a note naming them."""
    changed = []
    for base, case in pairs:
        base_params, cur_params = _relevant(base), _relevant(case)
        if base_params != cur_params:
            changed.append(UnmatchedCase(case, _param_changes(base_params, cur_params)))
    return changed


# --- comparing -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Interval:
    """An estimate and its 95% bootstrap interval."""

    estimate: float
    low: float
    high: float


@dataclass(frozen=True)
class MetricComparison:
    """One metric of one baseline case under one rule.

    ``ratio`` is current / baseline of the medians; ``difference`` is current - baseline.
    The verdict uses the ratio for a relative rule and the difference for an absolute one
    (:attr:`interval`). ``gated`` says whether this verdict may fail the run: a gated
    ``not judged`` always does. ``reason`` says why a verdict is missing or not gated.
    """

    case_id: str
    metric: str
    rule: GateRule
    unit: str
    source: str
    baseline_median: float | None
    current_median: float | None
    baseline_n: int
    current_n: int
    ratio: Interval | None
    difference: Interval | None
    verdict: Verdict
    gated: bool
    reason: str | None = None

    @property
    def interval(self) -> Interval | None:
        """The interval the verdict was taken from."""
        return self.ratio if self.rule.relative else self.difference


@dataclass(frozen=True)
class RunIdentity:
    """Which run a side of a comparison is."""

    label: str
    run_id: str
    created_at: str
    commit: str | None
    machine: str

    @classmethod
    def of(cls, record: RunRecord, label: str | None = None) -> RunIdentity:
        """Identify ``record``; ``label`` defaults to its run id, time and commit."""
        commit = record.machine.git_commit
        created = record.created_at.strftime("%Y-%m-%d %H:%M:%S")
        default = f"run {record.run_id[:8]} at {created}" + (
            f", commit {commit[:8]}" if commit else ""
        )
        return cls(
            label=label or default,
            run_id=record.run_id,
            created_at=record.created_at.isoformat(),
            commit=commit,
            machine=machine_id(record),
        )


@dataclass(frozen=True)
class Comparison:
    """Two runs compared under a set of rules.

    ``unmeasured`` lists the baseline's cases without a measured window (skipped or failed
    there), each with why. ``problems`` are run-level reasons nothing could be judged (a
    baseline without a measured case, a current run without a case); under a gate they fail
    the run.
    """

    baseline: RunIdentity
    current: RunIdentity
    rules: tuple[GateRule, ...]
    metrics: tuple[MetricComparison, ...]
    new: tuple[UnmatchedCase, ...]
    gone: tuple[UnmatchedCase, ...]
    environment: tuple[str, ...]
    gate: bool = True
    gate_estimated: bool = False
    changed: tuple[UnmatchedCase, ...] = ()
    unmeasured: tuple[UnmatchedCase, ...] = ()
    problems: tuple[str, ...] = ()

    @property
    def regressions(self) -> list[MetricComparison]:
        """Gated metrics that regressed."""
        return [m for m in self.metrics if m.gated and m.verdict == "regressed"]

    @property
    def inconclusive(self) -> list[MetricComparison]:
        """Gated metrics whose interval straddles the threshold."""
        return [m for m in self.metrics if m.gated and m.verdict == "inconclusive"]

    @property
    def not_judged(self) -> list[MetricComparison]:
        """Gated metrics with no verdict (they fail the gate)."""
        return [m for m in self.metrics if m.gated and m.verdict == "not judged"]

    @property
    def not_comparable(self) -> list[MetricComparison]:
        """Ungated metrics with no verdict (missing values, too few windows, no ratio)."""
        return [m for m in self.metrics if m.verdict == "not comparable"]

    def counts(self) -> dict[str, int]:
        """How many metric comparisons got each verdict (gated or not)."""
        return {v: sum(m.verdict == v for m in self.metrics) for v in _VERDICTS}

    def breaches(self, fail_inconclusive: bool = False) -> list[MetricComparison]:
        """The comparisons that fail the run: gated regressions and metrics that could not be
        judged, and gated inconclusive ones when ``fail_inconclusive``."""
        failing = {"regressed", "not judged"}
        if fail_inconclusive:
            failing.add("inconclusive")
        return [m for m in self.metrics if m.gated and m.verdict in failing]

    def exit_code(self, fail_inconclusive: bool = False) -> int:
        """1 when the gate fails: a breach (:meth:`breaches`) or, under a gate, a run-level
        problem; else 0."""
        failed = self.breaches(fail_inconclusive) or (self.gate and self.problems)
        return 1 if failed else 0


def _values(case: CaseRecord, metric: str) -> tuple[list[float], float | None]:
    """Per-window values of a metric, and its median (from the summary when there are no
    repetitions; then there are no values to resample)."""
    summary = case.metrics.get(metric)
    summary_median = summary.median if summary is not None else None
    if case.repetitions:
        values = _clean(rep.values.get(metric) for rep in case.repetitions)
        median = float(np.median(np.asarray(values))) if values else summary_median
        return values, median
    return ([summary_median] if summary_median is not None else []), summary_median


def _source(case: CaseRecord, metric: str) -> str:
    summary = case.metrics.get(metric)
    if summary is not None:
        return summary.source
    if metric in ENERGY_METRICS:
        sources = {s for rep in case.repetitions for s in rep.energy_sources.values()}
        if sources - {"measured"}:
            return "estimated"
    return "measured"


def _unit(base: CaseRecord, cur: CaseRecord | None, metric: str) -> str:
    for case in (cur, base):
        summary = case.metrics.get(metric) if case is not None else None
        if summary is not None and summary.unit:
            return summary.unit
    return ""


def _outcome(case: CaseRecord) -> str | None:
    """``failed: RuntimeError: boom`` or ``skipped: needs a GPU`` for a case that did not pass;
    None for one that did."""
    if case.outcome == "passed":
        return None
    if case.error is not None:
        return f"{case.outcome}: {case.error.type}: {case.error.message}"
    return f"{case.outcome}: {case.notes[0]}" if case.notes else case.outcome


def _measured(case: CaseRecord) -> bool:
    """Whether the case has a measured window (a case failed by its budget still has)."""
    return bool(case.repetitions) or any(s.median is not None for s in case.metrics.values())


def _windows(n: int) -> str:
    return "no value" if n == 0 else f"{n} window{'' if n == 1 else 's'}"


def _missing_reason(base: CaseRecord, cur: CaseRecord, nb: int, nc: int) -> str:
    sides = []
    for label, case, n in (("baseline", base, nb), ("current", cur, nc)):
        if n < MIN_WINDOWS:
            outcome = _outcome(case)
            sides.append(f"{label} has {_windows(n)}{f' (case {outcome})' if outcome else ''}")
    return "; ".join(sides) + f": at least {MIN_WINDOWS} windows per side are needed"


def _no_verdict(*, gate: bool, source: str, gate_estimated: bool) -> tuple[Verdict, bool]:
    """The verdict of a metric that could not be judged, and whether it is gated."""
    if gate and (source != "estimated" or gate_estimated):
        return "not judged", True
    return "not comparable", False


def _compare_metric(
    base: CaseRecord, cur: CaseRecord, rule: GateRule, *, gate: bool, gate_estimated: bool
) -> MetricComparison:
    metric = rule.metric
    base_values, base_median = _values(base, metric)
    cur_values, cur_median = _values(cur, metric)
    sources = {_source(base, metric), _source(cur, metric)}
    source = "estimated" if "estimated" in sources else _source(cur, metric)
    ratio = ratio_interval(base_values, cur_values)
    difference = difference_interval(base_values, cur_values)
    used = ratio if rule.relative else difference
    reason: str | None = None
    verdict: Verdict
    if used is None:
        verdict, gated = _no_verdict(gate=gate, source=source, gate_estimated=gate_estimated)
        if len(base_values) < MIN_WINDOWS or len(cur_values) < MIN_WINDOWS:
            reason = _missing_reason(base, cur, len(base_values), len(cur_values))
        else:
            reason = "no ratio: a median is not positive (use an absolute threshold)"
    else:
        verdict = classify(rule, used[1], used[2])
        gated = gate and (source != "estimated" or gate_estimated)
        if source == "estimated" and not gate_estimated:
            reason = "estimated energy is not gated (--llem-gate-estimated gates it)"
    return MetricComparison(
        case_id=cur.id,
        metric=metric,
        rule=rule,
        unit=_unit(base, cur, metric),
        source=source,
        baseline_median=base_median,
        current_median=cur_median,
        baseline_n=len(base_values),
        current_n=len(cur_values),
        ratio=Interval(*ratio) if ratio else None,
        difference=Interval(*difference) if difference else None,
        verdict=verdict,
        gated=gated,
        reason=reason,
    )


def _gone_metric(base: CaseRecord, rule: GateRule, *, gate_estimated: bool) -> MetricComparison:
    """A gated metric of a baseline case the current run does not have: not judged."""
    base_values, base_median = _values(base, rule.metric)
    source = _source(base, rule.metric)
    verdict, gated = _no_verdict(gate=True, source=source, gate_estimated=gate_estimated)
    return MetricComparison(
        case_id=base.id,
        metric=rule.metric,
        rule=rule,
        unit=_unit(base, None, rule.metric),
        source=source,
        baseline_median=base_median,
        current_median=None,
        baseline_n=len(base_values),
        current_n=0,
        ratio=None,
        difference=None,
        verdict=verdict,
        gated=gated,
        reason="not in the current run",
    )


def _run_problems(baseline: RunRecord, current: RunRecord) -> list[str]:
    """Why nothing at all can be judged: no measured baseline case, or no current case."""
    problems = []
    if not any(_measured(case) for case in baseline.cases):
        counts: dict[str, int] = {}
        for case in baseline.cases:
            counts[case.outcome] = counts.get(case.outcome, 0) + 1
        how = ", ".join(f"{n} {outcome}" for outcome, n in counts.items())
        what = f"no measured case ({how})" if how else "no case"
        problems.append(f"the baseline has {what}: nothing to compare against")
    if not current.cases:
        problems.append("the current run has no case: nothing to judge")
    return problems


def compare_runs(
    baseline: RunRecord,
    current: RunRecord,
    rules: Sequence[GateRule],
    *,
    gate_estimated: bool = False,
    gate: bool = True,
    baseline_label: str | None = None,
    current_label: str | None = None,
) -> Comparison:
    """Compare every case of the baseline with the current run under ``rules``.

    A baseline case skipped there (nothing was measured on purpose) is only listed in
    :attr:`Comparison.unmeasured`. Under a gate every other baseline case gets a row per rule,
    and a gated metric without a verdict (too few windows on a side, no value, a failed or
    skipped current case, a case gone from the current run) is ``not judged``, which fails the
    gate. Cases new in the current run are listed and never fail.

    Args:
        baseline: The saved run compared against.
        current: This run.
        rules: From :func:`~pytest_llem.results.gate.parse_fail_on`.
        gate_estimated: Let estimated energy figures gate (their verdicts are always shown).
        gate: False to report verdicts without gating anything (a comparison asked for
            without ``--llem-fail-on``; pass the example rules to show the usual metrics).
        baseline_label: How to name the baseline in reports (e.g. its file).
        current_label: How to name the current run.

    Returns:
        The comparison of every pair and rule, new, gone and unmeasured cases, run-level
        problems and environment differences.
    """
    matched = match_cases(baseline, current)
    unmeasured = [
        UnmatchedCase(case, _outcome(case)) for case in baseline.cases if not _measured(case)
    ]
    skipped = {u.case.id for u in unmeasured if u.case.outcome == "skipped"}
    metrics = [
        _compare_metric(base, cur, rule, gate=gate, gate_estimated=gate_estimated)
        for base, cur in matched.pairs
        if base.id not in skipped
        for rule in rules
    ]
    if gate:
        metrics.extend(
            _gone_metric(gone.case, rule, gate_estimated=gate_estimated)
            for gone in matched.gone
            if gone.case.id not in skipped
            for rule in rules
        )
    return Comparison(
        baseline=RunIdentity.of(baseline, baseline_label),
        current=RunIdentity.of(current, current_label),
        rules=tuple(rules),
        metrics=tuple(metrics),
        new=tuple(matched.new),
        gone=tuple(matched.gone),
        changed=tuple(parameter_changes(matched.pairs)),
        environment=tuple(environment_differences(baseline, current)),
        gate=gate,
        gate_estimated=gate_estimated,
        unmeasured=tuple(unmeasured),
        problems=tuple(_run_problems(baseline, current)),
    )


# --- environment -----------------------------------------------------------------------------


def _gpus(machine: MachineInfo) -> str:
    counts: dict[str, int] = {}
    for gpu in machine.gpus:
        counts[gpu.name] = counts.get(gpu.name, 0) + 1
    return ", ".join(f"{n}x {name}" for name, n in sorted(counts.items())) or "no GPU"


def _drivers(machine: MachineInfo) -> str | None:
    drivers = sorted({gpu.driver for gpu in machine.gpus if gpu.driver})
    return ", ".join(drivers) if drivers else None


def environment_differences(baseline: RunRecord, current: RunRecord) -> list[str]:
    """What differs between the machines of two runs and may move the figures by itself.

    Compares the GPU models and counts, the NVIDIA driver (when both runs know it) and the
    versions of :data:`ENVIRONMENT_LIBRARIES` (when both runs recorded them).

    Returns:
        One sentence per difference; empty when the environments match.
    """
    base, cur = baseline.machine, current.machine
    found: list[str] = []
    if _gpus(base) != _gpus(cur):
        found.append(f"GPUs differ: baseline {_gpus(base)}, current {_gpus(cur)}")
    base_driver, cur_driver = _drivers(base), _drivers(cur)
    if base_driver and cur_driver and base_driver != cur_driver:
        found.append(f"GPU driver differs: baseline {base_driver}, current {cur_driver}")
    for lib in ENVIRONMENT_LIBRARIES:
        if lib not in base.libraries or lib not in cur.libraries:
            continue
        old, new = base.libraries[lib], cur.libraries[lib]
        if old != new:
            found.append(
                f"{lib} differs: baseline {old or 'not installed'}, "
                f"current {new or 'not installed'}"
            )
    base_domains, cur_domains = _energy_domains(baseline), _energy_domains(current)
    if base_domains and cur_domains and base_domains != cur_domains:
        found.append(
            f"energy domains differ: baseline {'+'.join(base_domains)}, current "
            f"{'+'.join(cur_domains)} (energy_j sums different domains; compare gpu_energy_j)"
        )
    return found


def _energy_domains(record: RunRecord) -> list[str]:
    """The domains the run's meters supplied (the union over its cases), canonical order."""
    used = {domain for case in record.cases for meter in case.meters for domain in meter.used_for}
    return [domain for domain in ("gpu", "cpu", "dram") if domain in used]


# --- rendering -------------------------------------------------------------------------------


def _number(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:.4g}{f' {unit}' if unit else ''}"


def _change(m: MetricComparison) -> str:
    """``1.200 [1.150, 1.250]`` for a ratio, ``+20 [+12, +31] ms`` for a difference."""
    if m.rule.relative:
        r = m.ratio
        return "-" if r is None else f"{r.estimate:.3f} [{r.low:.3f}, {r.high:.3f}]"
    d = m.difference
    if d is None:
        return "-"
    unit = f" {m.unit}" if m.unit else ""
    return f"{d.estimate:+.4g} [{d.low:+.4g}, {d.high:+.4g}]{unit}"


def _verdict(m: MetricComparison) -> str:
    if m.verdict == "not comparable" or m.gated or m.reason is None:
        return m.verdict
    return f"{m.verdict} (not gated)"


def _breach(m: MetricComparison) -> str:
    if m.verdict == "not judged":
        return (
            f"{m.case_id}: {m.metric} could not be judged (limit {m.rule.limit_text}): {m.reason}"
        )
    what = "ratio" if m.rule.relative else "difference"
    interval = m.interval
    bounds = f"[{interval.low:.4g}, {interval.high:.4g}]" if interval else "-"
    estimate = f"{interval.estimate:.4g}" if interval else "-"
    return (
        f"{m.case_id}: {m.metric} {m.verdict} (limit {m.rule.limit_text}): "
        f"baseline {_number(m.baseline_median, m.unit)}, current {_number(m.current_median, m.unit)}, "
        f"{what} {estimate}, 95% CI {bounds}"
    )


def format_breaches(comparison: Comparison, *, fail_inconclusive: bool = False) -> list[str]:
    """One line per reason the gate fails: first the run-level problems (under a gate), then
    per metric the case, metric, baseline, current, ratio (or difference) and its interval, or
    why it could not be judged."""
    problems = list(comparison.problems) if comparison.gate else []
    return problems + [_breach(m) for m in comparison.breaches(fail_inconclusive)]


def _headline(comparison: Comparison) -> str:
    counts = comparison.counts()
    cases = len({m.case_id for m in comparison.metrics})
    parts = [f"{n} {verdict}" for verdict, n in counts.items() if n]
    gated = "" if comparison.gate else " (report only, nothing gated)"
    plural = "" if cases == 1 else "s"
    return f"{cases} case{plural} compared: {', '.join(parts) or 'no metric'}{gated}"


def _extras(comparison: Comparison) -> list[tuple[str, list[str]]]:
    def unmatched(items: Iterable[UnmatchedCase]) -> list[str]:
        return [f"{u.case.id}{f' ({u.note})' if u.note else ''}" for u in items]

    return [
        ("Problems", list(comparison.problems)),
        (
            "Not measured in the baseline (nothing to compare against)",
            unmatched(comparison.unmeasured),
        ),
        ("Compared although their parameters changed", unmatched(comparison.changed)),
        ("New cases (not in the baseline)", unmatched(comparison.new)),
        ("Gone cases (not in this run)", unmatched(comparison.gone)),
        ("Environment differs, figures may differ for that alone", list(comparison.environment)),
    ]


_HEADER = ("case", "metric", "rule", "baseline", "current", "ratio [95% CI]", "verdict")


def _rows(comparison: Comparison) -> list[tuple[str, ...]]:
    return [
        (
            m.case_id,
            m.metric,
            m.rule.limit_text,
            _number(m.baseline_median, m.unit),
            _number(m.current_median, m.unit),
            _change(m),
            _verdict(m),
        )
        for m in comparison.metrics
    ]


def format_table(comparison: Comparison) -> str:
    """A plain-text table for a terminal: one row per case and metric, then new and gone
    cases, environment differences and the reasons behind ungated or missing verdicts.

    For an absolute rule the ``ratio`` column holds the difference of medians instead.
    """
    lines = [
        f"baseline: {comparison.baseline.label}",
        f"current:  {comparison.current.label}",
        _headline(comparison),
    ]
    rows = _rows(comparison)
    if rows:
        widths = [max(len(row[i]) for row in [_HEADER, *rows]) for i in range(len(_HEADER))]
        for row in [_HEADER, *rows]:
            lines.append(
                "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            )
    notes = [f"{m.case_id} {m.metric}: {m.reason}" for m in comparison.metrics if m.reason]
    for title, items in [*_extras(comparison), ("Notes", notes)]:
        if items:
            lines.append(f"{title}:")
            lines.extend(f"  {item}" for item in items)
    return "\n".join(lines)


def _md(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _code(text: str) -> str:
    # GitHub splits table cells on "|" even inside a code span, unless it is escaped.
    return f"`{text.replace('|', chr(92) + '|')}`" if "`" not in text else _md(text)


def to_markdown(comparison: Comparison) -> str:
    """A Markdown report for a pull-request comment: a headline, one table row per case and
    metric (verdicts as words, regressions in bold), then new and gone cases and environment
    differences."""
    lines = [
        "### pytest-llem comparison",
        "",
        _headline(comparison),
        "",
        f"- Baseline: {_md(comparison.baseline.label)}",
        f"- Current: {_md(comparison.current.label)}",
        "",
    ]
    rows = _rows(comparison)
    if rows:
        lines.append("| Case | Metric | Rule | Baseline | Current | Ratio [95% CI] | Verdict |")
        lines.append("|---|---|---|---|---|---:|---|")
        for m, row in zip(comparison.metrics, rows, strict=True):
            verdict = f"**{row[6]}**" if m.gated and m.verdict == "regressed" else row[6]
            cells = [_code(row[0]), _code(row[1]), *(_md(c) for c in row[2:6]), verdict]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    notes = [f"{m.case_id} {m.metric}: {m.reason}" for m in comparison.metrics if m.reason]
    for title, items in [*_extras(comparison), ("Notes", notes)]:
        if items:
            lines.append(f"**{title}:**")
            lines.extend(f"- {_md(item)}" for item in items)
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _interval_json(interval: Interval | None) -> dict[str, float] | None:
    if interval is None:
        return None
    return {"estimate": interval.estimate, "low": interval.low, "high": interval.high}


def _metric_json(m: MetricComparison) -> dict[str, Any]:
    return {
        "case": m.case_id,
        "metric": m.metric,
        "rule": m.rule.text,
        "direction": m.rule.direction,
        "threshold": m.rule.threshold,
        "relative": m.rule.relative,
        "unit": m.unit,
        "source": m.source,
        "baseline": {"median": m.baseline_median, "n": m.baseline_n},
        "current": {"median": m.current_median, "n": m.current_n},
        "ratio": _interval_json(m.ratio),
        "difference": _interval_json(m.difference),
        "verdict": m.verdict,
        "gated": m.gated,
        "reason": m.reason,
    }


def to_json(comparison: Comparison, *, fail_inconclusive: bool = False) -> dict[str, Any]:
    """The comparison as a JSON-ready dict (ratios, intervals, verdicts, new, gone and
    unmeasured cases, run-level problems, environment differences, the lines that fail the
    gate and the exit code under ``fail_inconclusive``)."""

    def run(identity: RunIdentity) -> dict[str, Any]:
        return {
            "label": identity.label,
            "run_id": identity.run_id,
            "created_at": identity.created_at,
            "commit": identity.commit,
            "machine": identity.machine,
        }

    def unmatched(items: Iterable[UnmatchedCase]) -> list[dict[str, Any]]:
        return [{"case": u.case.id, "note": u.note} for u in items]

    return {
        "baseline": run(comparison.baseline),
        "current": run(comparison.current),
        "rules": [rule.text for rule in comparison.rules],
        "gate": comparison.gate,
        "gate_estimated": comparison.gate_estimated,
        "fail_inconclusive": fail_inconclusive,
        "metrics": [_metric_json(m) for m in comparison.metrics],
        "new": unmatched(comparison.new),
        "gone": unmatched(comparison.gone),
        "unmeasured": unmatched(comparison.unmeasured),
        "problems": list(comparison.problems),
        "environment": list(comparison.environment),
        "counts": comparison.counts(),
        "breaches": format_breaches(comparison, fail_inconclusive=fail_inconclusive),
        "exit_code": comparison.exit_code(fail_inconclusive),
    }

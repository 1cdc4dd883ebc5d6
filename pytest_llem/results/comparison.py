"""What a comparison of two runs is made of, and the statistics behind its verdicts.

The types every part of a comparison shares (:class:`Comparison`, :class:`MetricComparison`,
:class:`UnmatchedCase`, ...) and the regression test of METRICS.md ("Repetitions and
statistics"): the ratio (or difference) of medians with its 95% bootstrap interval, and the
verdict an interval gets under a rule. :mod:`pytest_llem.results.compare` matches and compares
runs with them; :mod:`pytest_llem.results.compare_format` renders them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, NamedTuple

from pytest_llem.results.drift import CaseDrift
from pytest_llem.results.gate import GateRule
from pytest_llem.results.models import CaseRecord, RunRecord
from pytest_llem.results.stats import resampled_medians, tail_percentiles
from pytest_llem.results.storage import machine_id

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    _FloatArray = npt.NDArray[np.float64]

__all__ = [
    "MIN_WINDOWS",
    "VERDICTS",
    "CaseMatch",
    "Comparison",
    "Interval",
    "MetricComparison",
    "RunIdentity",
    "UnmatchedCase",
    "Verdict",
    "classify",
    "clean_values",
    "difference_interval",
    "ratio_interval",
]

#: ``not judged`` is a gated metric without a verdict (it fails the gate); ``not comparable`` is
#: an ungated one (report only, or estimated energy).
Verdict = Literal[
    "regressed", "improved", "unchanged", "inconclusive", "not judged", "not comparable"
]
VERDICTS: tuple[Verdict, ...] = (
    "regressed",
    "not judged",
    "inconclusive",
    "improved",
    "unchanged",
    "not comparable",
)
#: Windows each side needs for an interval, and so for a verdict (METRICS.md: n < 3 gives no
#: interval, as for every metric's summary).
MIN_WINDOWS = 3


# --- bootstrap -------------------------------------------------------------------------------


def clean_values(values: Iterable[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def _interval(
    estimate: float, samples: _FloatArray, confidence: float
) -> tuple[float, float, float]:
    import numpy as np

    low, high = np.percentile(samples, tail_percentiles(confidence))
    return estimate, float(low), float(high)


def ratio_interval(
    baseline: Sequence[float], current: Sequence[float], confidence: float = 0.95
) -> tuple[float, float, float] | None:
    """The ratio of medians (current / baseline) and its 95% bootstrap interval.

    Each side is resampled independently (:data:`~pytest_llem.results.stats.BOOTSTRAP_RESAMPLES`
    resamples, fixed seed), and the interval is the 2.5th and 97.5th percentiles of the
    resampled ratios.

    Args:
        baseline: Per-window values of the baseline.
        current: Per-window values of the current run.
        confidence: The interval's level: 0.95, or the corrected level of an adaptive case
            (:class:`~pytest_llem.results.adaptive.AdaptivePlan`).

    Returns:
        ``(ratio, low, high)``; None when either side has fewer than :data:`MIN_WINDOWS`
        values, when the baseline's median (or any resampled one) is not positive, or when the
        current median is negative: a ratio means nothing there.
    """
    if len(baseline) < MIN_WINDOWS or len(current) < MIN_WINDOWS:
        return None
    import numpy as np

    base_median = float(np.median(np.asarray(baseline, dtype=np.float64)))
    cur_median = float(np.median(np.asarray(current, dtype=np.float64)))
    if base_median <= 0 or cur_median < 0:
        return None
    base_samples, cur_samples = resampled_medians(baseline, current)
    if float(base_samples.min()) <= 0:
        return None
    return _interval(cur_median / base_median, cur_samples / base_samples, confidence)


def difference_interval(
    baseline: Sequence[float], current: Sequence[float], confidence: float = 0.95
) -> tuple[float, float, float] | None:
    """The difference of medians (current - baseline) and its 95% (or ``confidence``)
    bootstrap interval.

    Resampled exactly as :func:`ratio_interval`; used by absolute thresholds.

    Returns:
        ``(difference, low, high)``; None when either side has fewer than
        :data:`MIN_WINDOWS` values.
    """
    if len(baseline) < MIN_WINDOWS or len(current) < MIN_WINDOWS:
        return None
    import numpy as np

    base_median = float(np.median(np.asarray(baseline, dtype=np.float64)))
    cur_median = float(np.median(np.asarray(current, dtype=np.float64)))
    base_samples, cur_samples = resampled_medians(baseline, current)
    return _interval(cur_median - base_median, cur_samples - base_samples, confidence)


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


# --- types -----------------------------------------------------------------------------------


class UnmatchedCase(NamedTuple):
    """A case in only one of the runs; ``note`` says why when its id is in both."""

    case: CaseRecord
    note: str | None = None


class CaseMatch(NamedTuple):
    """Cases of two runs: matched pairs (baseline, current), new ones and gone ones."""

    pairs: list[tuple[CaseRecord, CaseRecord]]
    new: list[UnmatchedCase]
    gone: list[UnmatchedCase]


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
    (:attr:`interval`), at level ``confidence`` (0.95, or the corrected level of a current
    case measured with ``repeat="auto"``). ``gated`` says whether this verdict may fail the run: a gated
    ``not judged`` always does. ``reason`` says why a verdict is missing or not gated, or,
    for a breach on a ``disturbed`` case (:mod:`pytest_llem.results.drift`), why it is
    ``inconclusive``.
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
    disturbed: bool = False
    confidence: float = 0.95

    @property
    def level(self) -> str:
        """The interval's level as text: ``95%``, ``99.3%`` after adaptive repetitions."""
        return f"{self.confidence * 100:.3g}%"

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
    the run. ``drift`` judges each compared case's machine state on both sides.
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
    drift: tuple[CaseDrift, ...] = ()

    @property
    def disturbed(self) -> list[CaseDrift]:
        """The cases whose machine state differed or changed beyond the drift margin."""
        return [d for d in self.drift if d.disturbed]

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
        return {v: sum(m.verdict == v for m in self.metrics) for v in VERDICTS}

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

"""What one look of an adaptive case (``repeat="auto"``) decides: is every gated verdict
decided, or is every reported metric's interval narrow enough?

Both rules take the windows measured so far and the corrected confidence level of
:class:`~pytest_llem.results.adaptive.AdaptivePlan`. The gate rule judges each metric exactly
as the comparison will at the end (:func:`~pytest_llem.results.comparison.ratio_interval`,
:func:`~pytest_llem.results.comparison.difference_interval` and
:func:`~pytest_llem.results.comparison.classify`), so a case stops when its final verdict can no
longer be ``inconclusive``. Imports nothing of the harness.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from pytest_llem.results.catalogue import lookup
from pytest_llem.results.comparison import (
    MIN_WINDOWS,
    classify,
    clean_values,
    difference_interval,
    ratio_interval,
)
from pytest_llem.results.gate import GateRule
from pytest_llem.results.models import CaseRecord, RepetitionRecord
from pytest_llem.results.stats import bootstrap_median_ci

__all__ = ["TARGET_METRICS", "Look", "gate_look", "width_look"]

#: The figures whose interval ``--llem-target-ci`` must reach without a gate: those the
#: terminal table reports for every case.
TARGET_METRICS: tuple[str, ...] = (
    "energy_per_output_token_j",
    "output_tokens_per_s",
    "ttft_ms.p50",
    "tpot_ms.p50",
)


class Look(NamedTuple):
    """What one look found.

    ``judged`` is how many metrics the rule could judge (0: the rule does not apply, e.g. the
    baseline case has too few windows); ``pending`` names those not yet good enough, with why.
    """

    judged: int
    pending: list[str]

    @property
    def done(self) -> bool:
        """Whether every judged metric is good enough (and at least one was judged)."""
        return self.judged > 0 and not self.pending


def _values(repetitions: Sequence[RepetitionRecord], metric: str) -> list[float]:
    return clean_values(rep.values.get(metric) for rep in repetitions)


def _estimated(metric: str, baseline: CaseRecord, current: Sequence[RepetitionRecord]) -> bool:
    """Whether the metric is an estimated energy figure on either side (not gated by default)."""
    known = lookup(metric)
    if known is None or not known.follows_meters:
        return False
    summary = baseline.metrics.get(metric)
    if summary is not None and summary.source == "estimated":
        return True
    return any(src != "measured" for rep in current for src in rep.energy_sources.values())


def gate_look(
    baseline: CaseRecord,
    current: Sequence[RepetitionRecord],
    rules: Sequence[GateRule],
    *,
    confidence: float,
    gate_estimated: bool = False,
) -> Look:
    """Whether every gated metric's verdict is decided: its interval (at ``confidence``) lies
    wholly beyond or wholly within its threshold.

    A metric the comparison could never judge from these windows (the baseline case has fewer
    than 3 windows of it, the current windows have no value, a median is not positive for a
    ratio) or that does not gate (estimated energy without ``gate_estimated``) is not waited
    for: more windows would not decide it.

    Args:
        baseline: The baseline's record of this case.
        current: The windows measured so far.
        rules: The ``--llem-fail-on`` rules.
        confidence: The corrected level of every look.
        gate_estimated: Whether estimated energy gates.

    Returns:
        The rules judged and the metrics still ``inconclusive``, with their interval.
    """
    judged, pending = 0, []
    for rule in rules:
        if _estimated(rule.metric, baseline, current) and not gate_estimated:
            continue
        base_values = _values(baseline.repetitions, rule.metric)
        cur_values = _values(current, rule.metric)
        if len(base_values) < MIN_WINDOWS or not cur_values:
            continue
        pick = ratio_interval if rule.relative else difference_interval
        interval = pick(base_values, cur_values, confidence)
        if interval is None:
            continue
        judged += 1
        _, low, high = interval
        if classify(rule, low, high) == "inconclusive":
            pending.append(f"{rule.metric} [{low:.4g}, {high:.4g}] straddles {rule.text}")
    return Look(judged, pending)


def width_look(current: Sequence[RepetitionRecord], *, target: float, confidence: float) -> Look:
    """Whether every reported metric (:data:`TARGET_METRICS`) has a bootstrap interval of its
    median (at ``confidence``) narrower than ``target`` either side, relative to the median.

    A metric with no value in any window (energy without a meter) or a median that is not
    positive has no relative width and is not waited for.

    Returns:
        The metrics judged and those still too wide, with their relative half-width.
    """
    judged, pending = 0, []
    for metric in TARGET_METRICS:
        values = _values(current, metric)
        if len(values) < MIN_WINDOWS:
            continue
        import numpy as np

        median = float(np.median(np.asarray(values, dtype=np.float64)))
        if median <= 0:
            continue
        low, high = bootstrap_median_ci(values, confidence)
        judged += 1
        half_width = (high - low) / 2 / median
        if half_width > target:
            pending.append(f"{metric} ±{half_width:.1%}")
    return Look(judged, pending)

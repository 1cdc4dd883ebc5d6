"""Statistics over repetitions and requests: percentiles, metric summaries, distributions and
the bootstrap.

Every scalar metric of a case is summarised here across its measured repetitions (with a
bootstrap interval of the median); per-request latencies are summarised as distributions. The
harness summarises with it and the comparison resamples with it; it lives with the results so
the comparison need not import the harness.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, cast

from pytest_llem.results.models import DistributionSummary, MetricSummary

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = [
    "BOOTSTRAP_RESAMPLES",
    "BOOTSTRAP_SEED",
    "FEWER_THAN_3_NOTE",
    "bootstrap_median_ci",
    "distribution",
    "percentile",
    "resampled_medians",
    "summarise",
    "tail_percentiles",
]

#: Resamples of the bootstrap interval of the median (METRICS.md asks for at least 2000).
BOOTSTRAP_RESAMPLES = 2000
#: Fixed seed so the same values always give the same interval.
BOOTSTRAP_SEED = 20240521
#: Note of a summary whose interval was skipped because there were too few repetitions.
FEWER_THAN_3_NOTE = "fewer than 3 repetitions: no interval"

_SOURCES = ("measured", "estimated", "attributed", "computed")
_SummarySource = Literal["measured", "estimated", "attributed", "computed"]


def _present(values: Sequence[float | None]) -> list[float]:
    """The values that were measured: None (and NaN, which means the same) dropped."""
    return [float(v) for v in values if v is not None and not math.isnan(v)]


def _interpolate(ordered: Sequence[float], q: float) -> float:
    """Linear interpolation between order statistics of already sorted values."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must lie in [0, 100], got {q}")
    if not ordered:
        raise ValueError("percentile of no values")
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    fraction = position - low
    return ordered[low] + (ordered[high] - ordered[low]) * fraction


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile by linear interpolation between order statistics.

    This is numpy's default (``method="linear"``): the value at rank ``(n - 1) * q / 100``
    of the sorted values, interpolated between its two neighbours.

    Args:
        values: At least one number, in any order.
        q: Percentile in [0, 100].

    Returns:
        The percentile, e.g. 9.1 for ``percentile(range(1, 11), 90)``.

    Raises:
        ValueError: ``values`` is empty or ``q`` lies outside [0, 100].
    """
    return _interpolate(sorted(float(v) for v in values), q)


def bootstrap_median_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """The 95% (or ``confidence``) percentile-bootstrap interval of the median.

    Draws :data:`BOOTSTRAP_RESAMPLES` resamples with replacement, all at once, from a
    generator seeded with :data:`BOOTSTRAP_SEED`, so equal inputs give equal intervals.

    Args:
        values: The measured values (at least one).
        confidence: The interval's level (adaptive repetitions use a corrected one).

    Returns:
        ``(low, high)``: the 2.5th and 97.5th percentiles of the resampled medians (for 95%).
    """
    import numpy as np

    data = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    picks = rng.integers(0, data.size, size=(BOOTSTRAP_RESAMPLES, data.size))
    medians = np.median(data[picks], axis=1)
    low, high = np.percentile(medians, tail_percentiles(confidence))
    return float(low), float(high)


def tail_percentiles(confidence: float) -> list[float]:
    """The percentiles that bound a central interval of level ``confidence`` ([2.5, 97.5])."""
    tail = (1.0 - confidence) / 2 * 100
    return [tail, 100.0 - tail]


def resampled_medians(
    baseline: Sequence[float], current: Sequence[float]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Bootstrap medians of two samples, each resampled on its own from one seeded generator.

    Args:
        baseline: The first sample (at least one value).
        current: The second sample (at least one value).

    Returns:
        :data:`BOOTSTRAP_RESAMPLES` resampled medians of each sample, in the same order, so
        their ratio or difference is a bootstrap sample of the ratio or difference of medians.
    """
    import numpy as np

    base = np.asarray(baseline, dtype=np.float64)
    cur = np.asarray(current, dtype=np.float64)
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    base_picks = rng.integers(0, base.size, size=(BOOTSTRAP_RESAMPLES, base.size))
    cur_picks = rng.integers(0, cur.size, size=(BOOTSTRAP_RESAMPLES, cur.size))
    return np.median(base[base_picks], axis=1), np.median(cur[cur_picks], axis=1)


def _join(*notes: str | None) -> str | None:
    kept = [note for note in notes if note]
    return "; ".join(kept) if kept else None


def summarise(
    values: Sequence[float | None],
    *,
    unit: str,
    source: str = "measured",
    note: str | None = None,
) -> MetricSummary:
    """Summarise one metric across repetitions.

    Args:
        values: One value per repetition; None (not measured) values are dropped.
        unit: Unit of every value.
        source: ``measured``, ``estimated``, ``attributed`` or ``computed``.
        note: Carried into the summary; the reason when no value was measured.

    Returns:
        n, median, mean, sample stdev (None for n < 2), min, max and the 95% bootstrap
        interval of the median (None for n < 3, with a note saying so). With no value at all
        every statistic is None and n is 0.

    Raises:
        ValueError: ``source`` is not one of the known sources.
    """
    if source not in _SOURCES:
        raise ValueError(f"unknown metric source {source!r}; choose from: {', '.join(_SOURCES)}")
    kind = cast(_SummarySource, source)
    present = _present(values)
    if not present:
        return MetricSummary(
            n=0,
            stdev=None,
            ci95_low=None,
            ci95_high=None,
            unit=unit,
            source=kind,
            note=note or "no value measured",
        )
    import numpy as np

    data = np.asarray(present, dtype=np.float64)
    n = len(present)
    ci: tuple[float, float] | None = bootstrap_median_ci(present) if n >= 3 else None
    return MetricSummary(
        n=n,
        median=float(np.median(data)),
        mean=float(np.mean(data)),
        stdev=float(np.std(data, ddof=1)) if n >= 2 else None,
        min=float(data.min()),
        max=float(data.max()),
        ci95_low=ci[0] if ci else None,
        ci95_high=ci[1] if ci else None,
        unit=unit,
        source=kind,
        note=_join(note, None if ci else FEWER_THAN_3_NOTE),
    )


def distribution(values: Sequence[float | None], *, unit: str = "ms") -> DistributionSummary:
    """Summarise pooled per-request values (latencies) as a distribution.

    Args:
        values: Per-request values; None values are dropped.
        unit: Unit of every value.

    Returns:
        n, mean, min, max, p50, p90, p95 and p99; n=0 and None values when empty.
    """
    ordered = sorted(_present(values))
    if not ordered:
        return DistributionSummary(n=0, unit=unit)
    return DistributionSummary(
        n=len(ordered),
        mean=math.fsum(ordered) / len(ordered),
        min=ordered[0],
        max=ordered[-1],
        p50=_interpolate(ordered, 50),
        p90=_interpolate(ordered, 90),
        p95=_interpolate(ordered, 95),
        p99=_interpolate(ordered, 99),
        unit=unit,
    )

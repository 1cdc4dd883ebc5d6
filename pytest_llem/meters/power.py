"""Power series: their energy (trapezoid rule, with a correction for trailing averages) and
their reduction to a short timeline that keeps the energy.

Pure functions on times in seconds and power in watts; the NVML meter integrates its samples
with them and draws its power timeline from them.
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections.abc import Sequence

__all__ = ["TIMELINE_MAX_POINTS", "averaged_power_energy", "downsample_power", "integrate_power"]

#: A window's power timeline keeps at most this many points (bucket means beyond that).
TIMELINE_MAX_POINTS = 200


def integrate_power(times_s: Sequence[float], watts: Sequence[float]) -> float:
    """Energy in joules of power samples, by the trapezoid rule.

    Args:
        times_s: Sample times in seconds, ascending.
        watts: Power at each time.

    Returns:
        The integral; 0.0 for fewer than two samples.
    """
    if len(times_s) != len(watts):
        raise ValueError("times_s and watts differ in length")
    return math.fsum(
        0.5 * (watts[k] + watts[k - 1]) * (times_s[k] - times_s[k - 1])
        for k in range(1, len(times_s))
    )


def averaged_power_energy(
    times_s: Sequence[float], watts: Sequence[float], *, average_s: float
) -> float:
    """Energy in joules over the samples' span when each sample is a trailing mean of power.

    A trailing mean over ``average_s`` seconds lags the power: its integral over a window misses
    ``average_s / 2`` times the change of the mean across the window (exact when the power is
    steady over ``average_s`` before each edge, the error otherwise second order in the change),
    so that term is added back to the trapezoid integral.

    Args:
        times_s: Sample times in seconds, ascending.
        watts: The averaged power at each time.
        average_s: The length of the trailing mean.

    Returns:
        The corrected integral; 0.0 for fewer than two samples.
    """
    if len(times_s) < 2:
        return 0.0
    return integrate_power(times_s, watts) + 0.5 * average_s * (watts[-1] - watts[0])


def downsample_power(
    times_s: Sequence[float], watts: Sequence[float], *, max_points: int = TIMELINE_MAX_POINTS
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Reduce a power series to at most ``max_points`` bucket means, preserving its energy.

    The span from the first to the last sample is cut into ``max_points`` equal buckets; each
    point is the bucket's end and the mean power over the bucket (the exact integral of the
    linearly interpolated samples, divided by the bucket's width). So
    ``sum(w[i] * (t[i] - t[i-1]))`` with ``t[-1] = times_s[0]`` equals
    ``integrate_power(times_s, watts)``. A series short enough is returned unchanged.

    Args:
        times_s: Sample times in seconds, ascending.
        watts: Power at each time.
        max_points: The most points to return (at least 1).

    Returns:
        The times and watts of the (possibly) reduced series.

    Raises:
        ValueError: The sequences differ in length or ``max_points`` is below 1.
    """
    if len(times_s) != len(watts):
        raise ValueError("times_s and watts differ in length")
    if max_points < 1:
        raise ValueError("max_points must be at least 1")
    if len(times_s) <= max_points:
        return tuple(float(t) for t in times_s), tuple(float(w) for w in watts)
    start, end = float(times_s[0]), float(times_s[-1])
    if end <= start:
        return (end,), (statistics.fmean(watts),)
    cumulative = [0.0]
    for k in range(1, len(times_s)):
        step = 0.5 * (watts[k] + watts[k - 1]) * (times_s[k] - times_s[k - 1])
        cumulative.append(cumulative[-1] + step)
    edges = [start + (end - start) * j / max_points for j in range(max_points)] + [end]
    energy = [_energy_until(times_s, watts, cumulative, edge) for edge in edges]
    means = tuple(
        (energy[j + 1] - energy[j]) / (edges[j + 1] - edges[j]) for j in range(max_points)
    )
    return tuple(edges[1:]), means


def _energy_until(
    times_s: Sequence[float], watts: Sequence[float], cumulative: Sequence[float], t: float
) -> float:
    """The integral of the interpolated power from the first sample to ``t`` (inside the span)."""
    k = min(max(bisect.bisect_right(times_s, t) - 1, 0), len(times_s) - 2)
    width = times_s[k + 1] - times_s[k]
    into = t - times_s[k]
    if width <= 0:
        return cumulative[k]
    slope = (watts[k + 1] - watts[k]) / width
    return cumulative[k] + watts[k] * into + 0.5 * slope * into * into

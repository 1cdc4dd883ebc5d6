"""Energy at step resolution: a window's cumulative energy as a function of time.

The attribution (:mod:`pytest_llem.harness.attribution`) needs the energy of every slice of a
window, however short. :class:`EnergyCurve` gives it per covered domain from that domain's
power timeline (the NVML sampler's, the RAPL poller's) where one exists, power being constant
between samples; where none exists, energy is interpolated linearly between the counter's reads
at the window's edges (constant power over the window), and :attr:`EnergyCurve.method` says so.
Each domain's curve is scaled to end at the domain's measured energy, so slices always add up
to the window's ``energy_j`` exactly.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pytest_llem.results.models import PowerTimelineRecord

__all__ = ["EnergyCurve", "energy_curve"]


@dataclass(frozen=True)
class _DomainCurve:
    """Cumulative energy of one domain at ``times`` (seconds since the window opened)."""

    times: tuple[float, ...]
    cumulative: tuple[float, ...]

    def at(self, t: float) -> float:
        i = bisect.bisect_right(self.times, t)
        if i <= 0:
            return self.cumulative[0]
        if i >= len(self.times):
            return self.cumulative[-1]
        t0, t1 = self.times[i - 1], self.times[i]
        e0, e1 = self.cumulative[i - 1], self.cumulative[i]
        return e0 + (e1 - e0) * (t - t0) / (t1 - t0) if t1 > t0 else e1


@dataclass(frozen=True)
class EnergyCurve:
    """A window's cumulative energy (J) over the covered domains, from ``start`` (perf_counter).

    ``method`` says, in words, how power was resolved below the window's length.
    """

    start: float
    duration_s: float
    domains: tuple[_DomainCurve, ...]
    method: str

    def at(self, t: float) -> float:
        """Energy from the window's start to ``t`` (perf_counter seconds), clipped to it."""
        offset = min(max(t - self.start, 0.0), self.duration_s)
        return math.fsum(curve.at(offset) for curve in self.domains)

    def between(self, a: float, b: float) -> float:
        """Energy from ``a`` to ``b``."""
        return self.at(b) - self.at(a)


def _uniform(duration_s: float, energy_j: float) -> _DomainCurve:
    return _DomainCurve((0.0, duration_s), (0.0, energy_j))


def _sampled(timeline: PowerTimelineRecord, duration_s: float, energy_j: float) -> _DomainCurve:
    """Power held constant back to the previous sample (the first sample back to 0 s), the last
    sample's power to the window's end; scaled to the domain's measured energy."""
    edges = [0.0]
    for t in timeline.times_s:
        if 0.0 < t < duration_s and t > edges[-1]:
            edges.append(t)
    edges.append(duration_s)
    watts = list(timeline.watts)
    cumulative = [0.0]
    for a, b in itertools.pairwise(edges):
        # the sample at or just after b (the bucket ending near b)
        k = min(bisect.bisect_left(timeline.times_s, b), len(watts) - 1)
        cumulative.append(cumulative[-1] + max(watts[k], 0.0) * (b - a))
    total = cumulative[-1]
    if total <= 0:
        return _uniform(duration_s, energy_j)
    scale = energy_j / total
    return _DomainCurve(tuple(edges), tuple(c * scale for c in cumulative))


def energy_curve(
    *,
    start: float,
    duration_s: float,
    domains: Mapping[str, float],
    timelines: Sequence[PowerTimelineRecord],
) -> EnergyCurve:
    """The window's energy curve.

    Args:
        start: When the window opened (perf_counter seconds).
        duration_s: Its length.
        domains: Measured energy per covered domain (J).
        timelines: The power timelines of the domains' assigned meters.

    Returns:
        The curve; each domain from its timeline where it has one with samples, else linear
        between the window's edges.
    """
    by_domain = {t.domain: t for t in timelines if t.watts and t.times_s}
    curves: list[_DomainCurve] = []
    methods: list[str] = []
    for domain, energy_j in domains.items():
        timeline = by_domain.get(domain)
        if timeline is None or duration_s <= 0:
            curves.append(_uniform(duration_s, energy_j))
            methods.append(
                f"{domain}: no power timeline, energy interpolated linearly between the "
                "counter's reads at the window's edges (constant power assumed)"
            )
        else:
            curves.append(_sampled(timeline, duration_s, energy_j))
            methods.append(
                f"{domain}: {timeline.meter} power samples every {timeline.period_s:g} s "
                f"({timeline.method}), held constant between samples and scaled to the counter"
            )
    return EnergyCurve(start, duration_s, tuple(curves), "; ".join(methods))

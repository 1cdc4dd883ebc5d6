"""Figures of the steady state alone (server scenario with ``traffic.steady_state``).

Each round of a window has its own steady span, read between two laps of the meters; its
figures are named with the ``steady_state.`` prefix (METRICS.md, Steady state).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from pytest_llem.harness.metrics import RequestLatency, combine_energy, latency_values
from pytest_llem.harness.window import QUANTISATION_PERIODS, CaseContext, Lap, Window
from pytest_llem.meters.base import reading_between
from pytest_llem.results.catalogue import STEADY_PREFIX

__all__ = ["steady_values"]


@dataclass(frozen=True)
class _Span:
    """One round's steady span: its length, the tokens produced inside it, its requests (those
    scheduled from the ramp-up's end on) and its energy (None: ``note`` or a lap error says
    why)."""

    duration_s: float
    tokens: int
    requests: list[RequestLatency]
    energy_j: float | None
    note: str | None = None


def steady_values(
    window: Window, latencies: Sequence[RequestLatency], context: CaseContext
) -> tuple[dict[str, float | None], list[str]]:
    """Figures of the steady state alone (server scenario with ``traffic.steady_state``).

    Each round has its own span, from the issue of the first batch holding a request at or
    past the ramp-up to the issue of the last batch; energy comes from the meters read at those
    two moments. Duration, requests, tokens and energy are summed over the rounds' spans and
    divided by ``rounds`` (per round, as the whole window's figures are); ratios come from the
    sums; latencies pool the rounds' steady requests.

    Returns:
        The ``steady_state.*`` values and notes (``steady_state: ...``) on missing energy.
    """
    spans = _steady_spans(window, latencies, context)
    if not spans:
        return {}, []
    rounds = len(spans)
    duration = math.fsum(span.duration_s for span in spans)
    tokens = sum(span.tokens for span in spans)
    energies = [span.energy_j for span in spans]
    total = None if any(e is None for e in energies) else math.fsum(e or 0.0 for e in energies)
    steady = [lat for span in spans for lat in span.requests]
    values: dict[str, float | None] = {
        "duration_s": duration / rounds,
        "requests": len(steady) / rounds,
        "output_tokens": tokens / rounds,
        "energy_j": None if total is None else total / rounds,
        "avg_power_w": total / duration if total is not None and duration > 0 else None,
        "energy_per_output_token_j": total / tokens if total is not None and tokens else None,
        "output_tokens_per_s": tokens / duration if duration > 0 else None,
        **latency_values(steady),
    }
    notes = _unique([span.note for span in spans if span.note is not None])
    return {f"{STEADY_PREFIX}{name}": value for name, value in values.items()}, notes


def _steady_spans(
    window: Window, latencies: Sequence[RequestLatency], context: CaseContext
) -> list[_Span]:
    """Every round's steady span; [] when the workload marked none (or not in every round)."""
    if window.steady_from is None or not window.marks:
        return []
    per_round = len(window.generations) // len(window.marks)
    covered = combine_energy(window.readings, context.assignment).covered
    spans = []
    for k, marks in enumerate(window.marks):
        start, end = marks.get("steady_start"), marks.get("steady_end")
        if start is None or end is None:
            return []
        generations = window.generations[k * per_round : (k + 1) * per_round]
        requests = latencies[k * per_round : (k + 1) * per_round]
        tokens = sum(1 for g in generations for t in g.token_times if start.time < t <= end.time)
        energy, note = _span_energy(start, end, covered, context)
        steady = [lat for lat in requests if lat.request_index >= window.steady_from]
        spans.append(_Span(end.time - start.time, tokens, steady, energy, note))
    return spans


def _span_energy(
    start: Lap, end: Lap, covered: Sequence[str], context: CaseContext
) -> tuple[float | None, str | None]:
    """The energy between two laps of a window and, where it is None, why.

    The span has its own pair of edges, so it gets the whole window's rule: shorter than
    ``policy.floor_s`` it is not measured. It must cover every domain the window covered, or
    its figures would not be comparable with the window's.
    """
    if start.readings is None or end.readings is None:
        return None, None  # the lap's own error is noted with the window
    duration = end.time - start.time
    policy = context.policy
    if policy.floor_s > 0 and duration < policy.floor_s:
        return None, (
            f"steady_state: energy not measured (the steady span of {duration:.3f} s per round "
            f"is shorter than {QUANTISATION_PERIODS} x the meter's {policy.update_period_s:g} s "
            f"update period ({policy.floor_s:g} s); each round's span is read between two laps "
            "of its own)"
        )
    readings = [reading_between(a, b) for a, b in zip(start.readings, end.readings, strict=True)]
    energy = combine_energy(readings, context.assignment)
    lost = [d for d in covered if energy.domains.get(d) is None]
    if lost or energy.total_j is None:
        why = "; ".join(n for n in energy.notes if n.split(":")[0] in (lost or covered))
        return None, f"steady_state: energy not measured ({why or 'no domain measured'})"
    return energy.total_j, None


def _unique(items: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(items))

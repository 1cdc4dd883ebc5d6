"""Energy inside a window, per request and per phase, conserved to the joule.

The window is cut into slices at every step edge and every request's issue, first token and
last token. Each slice's energy comes from the window's energy curve
(:mod:`pytest_llem.harness.step_power`). With no request in flight it is
``unattributed_energy_j``; otherwise its idle part (idle power x slice length) is shared equally
among the requests in flight, and the rest, its dynamic energy, among the requests doing work
in it, in proportion to ``a * prefill tokens + b * decode tokens`` with ``a`` and ``b`` fitted
on the window's own steps (:mod:`pytest_llem.harness.fit`). A request's share counts as prefill
energy until its first token and as decode energy after, except the work-proportional share of
a step, which goes to the phase of the tokens it paid for. Every joule of a slice goes to
exactly one place, so the books balance by construction, per round and per window.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from pytest_llem.backends.base import Generation
from pytest_llem.backends.steps import EngineStep
from pytest_llem.harness.fit import TokenFit, fit_token_energy
from pytest_llem.harness.metrics import (
    RequestLatency,
    token_chunks,  # the latencies' chunk rule
)
from pytest_llem.harness.step_power import EnergyCurve
from pytest_llem.results.attribution import (
    AttributionRecord,
    CoefficientRecord,
    RequestEnergyRecord,
)

__all__ = ["Attribution", "RoundActivity", "attribute"]


@dataclass(frozen=True)
class RoundActivity:
    """One round of the workload inside a window: its span, requests and engine steps.

    ``steps`` None: the backend reported none (the chunk arrivals stand in for them).
    """

    start: float
    end: float
    generations: Sequence[Generation]
    latencies: Sequence[RequestLatency]
    steps: Sequence[EngineStep] | None = None


@dataclass(frozen=True)
class _Work:
    """Tokens requests worked on over ``[start, end)``, spread evenly over it: per request
    position, its prefill and decode tokens (one engine step, or one chunk of one request)."""

    start: float
    end: float
    items: tuple[tuple[int, float, float], ...]


@dataclass
class _Slice:
    round: int
    start: float
    end: float
    energy_j: float
    in_flight: tuple[int, ...]
    work: dict[int, tuple[float, float]] = field(default_factory=dict)


@dataclass
class Attribution:
    """The window's books: each request's energy, the unattributed rest and how it was split."""

    per_request: list[RequestEnergyRecord]
    unattributed_energy_j: float
    record: AttributionRecord


def _client_work(position: int, generation: Generation) -> list[_Work]:
    """A request's work as a client sees it: the prompt (and the first chunk's tokens) from
    its issue to its first chunk, then each chunk's tokens since the chunk before."""
    chunks = token_chunks(generation.token_times)
    if not chunks:
        return []
    first_t, first_k = chunks[0]
    first = (position, float(generation.input_tokens), float(first_k - 1))
    works = [_Work(generation.issued_at, first_t, (first,))]
    for (previous, _), (t, k) in itertools.pairwise(chunks):
        works.append(_Work(previous, t, ((position, 0.0, float(k)),)))
    return works


def _engine_work(steps: Sequence[EngineStep], positions: dict[int, int]) -> list[_Work]:
    return [
        _Work(
            s.start,
            s.end,
            tuple(
                (positions[w.request_index], float(w.prefill_tokens), float(w.decode_tokens))
                for w in s.work
                if w.request_index in positions
            ),
        )
        for s in steps
    ]


def _lifetimes(activity: RoundActivity) -> list[tuple[float, float, float]]:
    """Per request: issue, first token (or end) and last token, clipped to the round."""
    spans = []
    for g in activity.generations:
        issued = min(max(g.issued_at, activity.start), activity.end)
        end = min(max(g.token_times[-1], issued), activity.end) if g.token_times else issued
        first = min(max(g.token_times[0], issued), end) if g.token_times else end
        spans.append((issued, first, end))
    return spans


def _round_slices(
    index: int, activity: RoundActivity, works: Sequence[_Work], curve: EnergyCurve
) -> list[_Slice]:
    """Cut one round at every edge; what is in flight and at work in each slice."""
    spans = _lifetimes(activity)
    clipped = [w for w in works if w.end > w.start]
    edges = sorted(
        {activity.start, activity.end}
        | {t for span in spans for t in span}
        | {min(max(t, activity.start), activity.end) for w in clipped for t in (w.start, w.end)}
    )
    at = {t: k for k, t in enumerate(edges)}
    opens: dict[int, list[int]] = {}
    closes: dict[int, list[int]] = {}
    for i, (s, _, e) in enumerate(spans):
        if e > s:
            opens.setdefault(at[s], []).append(i)
            closes.setdefault(at[e], []).append(i)
    active: set[int] = set()
    slices: list[_Slice] = []
    for k, (a, b) in enumerate(itertools.pairwise(edges)):
        active.difference_update(closes.get(k, ()))
        active.update(opens.get(k, ()))
        slices.append(_Slice(index, a, b, curve.between(a, b), tuple(sorted(active))))
    _add_work(slices, clipped)
    return slices


def _add_work(slices: list[_Slice], works: Sequence[_Work]) -> None:
    """Each work span's tokens onto the slices it covers, by the share of its length."""
    starts = [s.start for s in slices]
    for w in works:
        length = w.end - w.start
        k = max(0, bisect.bisect_right(starts, w.start) - 1)
        while k < len(slices) and slices[k].start < w.end:
            piece = slices[k]
            overlap = min(piece.end, w.end) - max(piece.start, w.start)
            k += 1
            if overlap <= 0:
                continue
            share = overlap / length
            work = piece.work
            for pos, prefill, decode in w.items:
                p, d = work.get(pos, (0.0, 0.0))
                work[pos] = (p + prefill * share, d + decode * share)


def _fit(slices: Sequence[_Slice], idle_w: float) -> TokenFit:
    rows = [
        (
            math.fsum(p for p, _ in s.work.values()),
            math.fsum(d for _, d in s.work.values()),
            s.energy_j - idle_w * (s.end - s.start),
        )
        for s in slices
        if s.work and s.in_flight
    ]
    return fit_token_energy(rows)


def _weights(fit: TokenFit) -> tuple[float, float, str | None]:
    """Per-token weights for the split: the fit's, or 1 J per token when it is unusable."""
    if fit.note is not None and fit.prefill is None and fit.decode is None:
        return 1.0, 1.0, fit.note
    a, b = fit.prefill, fit.decode
    if (a is not None and a <= 0) or (b is not None and b <= 0):
        why = "a fitted energy per token is not positive (little or no dynamic energy?)"
        return 1.0, 1.0, why
    # a coefficient that is None has no tokens of its kind: its weight never applies
    return (a if a is not None else 1.0), (b if b is not None else 1.0), None


def _split_slice(
    piece: _Slice,
    books: list[list[float]],
    *,
    idle_w: float,
    weights: tuple[float, float],
    first: Sequence[float],
) -> None:
    """Add each in-flight request's share of one slice to ``books`` (prefill J, decode J)."""
    a, b = weights
    idle_part = idle_w * (piece.end - piece.start)
    members = set(piece.in_flight)
    weighted = [(pos, a * p, b * d) for pos, (p, d) in piece.work.items() if pos in members]
    total = math.fsum(wp + wd for _, wp, wd in weighted)
    by_time = (idle_part if total > 0 else piece.energy_j) / len(piece.in_flight)
    for pos in piece.in_flight:
        books[pos][0 if piece.end <= first[pos] else 1] += by_time
    if total > 0:
        scale = (piece.energy_j - idle_part) / total
        for pos, wp, wd in weighted:
            entry = books[pos]
            entry[0] += wp * scale
            entry[1] += wd * scale


def _coefficient(value: float | None, ci: tuple[float, float] | None) -> CoefficientRecord:
    low, high = ci if ci is not None else (None, None)
    return CoefficientRecord(value=value, ci95_low=low, ci95_high=high)


def _round_works(activity: RoundActivity) -> tuple[list[_Work], bool]:
    """The round's work spans, and whether they came from the engine's own steps."""
    positions = {g.request_index: i for i, g in enumerate(activity.generations)}
    if activity.steps and len(positions) == len(activity.generations):
        return _engine_work(activity.steps, positions), True
    return [w for i, g in enumerate(activity.generations) for w in _client_work(i, g)], False


def _request_records(
    index: int, activity: RoundActivity, books: list[list[float]]
) -> list[RequestEnergyRecord]:
    records = []
    for pos, (g, lat) in enumerate(zip(activity.generations, activity.latencies, strict=True)):
        pre, dec = books[pos]
        records.append(
            RequestEnergyRecord(
                index=g.request_index,
                round=index,
                input_tokens=g.input_tokens,
                output_tokens=g.output_tokens,
                ttft_ms=lat.ttft_ms,
                e2e_ms=lat.e2e_ms,
                energy_j=pre + dec,
                prefill_energy_j=pre,
                decode_energy_j=dec,
            )
        )
    return records


def attribute(
    rounds: Sequence[RoundActivity], *, curve: EnergyCurve, idle_power_w: float | None
) -> Attribution:
    """Attribute a window's energy to its requests, per round.

    Args:
        rounds: The window's rounds, in order, together spanning the window.
        curve: The window's cumulative energy.
        idle_power_w: Idle power of the covered domains (None: no baseline, every joule in a
            request's lifetime is split by work).

    Returns:
        Per request its energy split into prefill and decode, the unattributed energy and the
        record of the fit and the books of each round.
    """
    idle_w = idle_power_w or 0.0
    slices: list[list[_Slice]] = []
    engine = True
    for index, activity in enumerate(rounds):
        works, from_engine = _round_works(activity)
        engine = engine and from_engine
        slices.append(_round_slices(index, activity, works, curve))
    fit = _fit([s for rs in slices for s in rs], idle_w)
    a, b, fallback = _weights(fit)
    per_request: list[RequestEnergyRecord] = []
    unattributed: list[float] = []
    for index, (activity, round_slices) in enumerate(zip(rounds, slices, strict=True)):
        first = [span[1] for span in _lifetimes(activity)]
        books = [[0.0, 0.0] for _ in activity.generations]
        idle_j = [s.energy_j for s in round_slices if not s.in_flight]
        for piece in round_slices:
            if piece.in_flight:
                _split_slice(piece, books, idle_w=idle_w, weights=(a, b), first=first)
        unattributed.append(math.fsum(idle_j))
        per_request.extend(_request_records(index, activity, books))
    notes = (
        []
        if idle_power_w is not None
        else ["no idle baseline: all energy in a request's lifetime is split by work"]
    )
    record = AttributionRecord(
        timeline="engine" if engine else "client",
        power=curve.method,
        energy_per_prefill_token_j=_coefficient(fit.prefill, fit.prefill_ci),
        energy_per_decode_token_j=_coefficient(fit.decode, fit.decode_ci),
        fit_r2=fit.r2,
        fit_steps=fit.steps,
        weights="fit" if fallback is None else "per_token",
        fit_note=fallback or fit.note,
        idle_power_w=idle_power_w,
        round_energy_j=[curve.between(r.start, r.end) for r in rounds],
        round_unattributed_energy_j=unattributed,
        notes=notes,
    )
    return Attribution(per_request, math.fsum(unattributed), record)

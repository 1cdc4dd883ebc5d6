"""Every figure of METRICS.md as a pure function of what backends and meters reported.

The runner calls these after a measurement window closes: per-request latencies from token
times, the window's energy from the meters' readings, and every scalar metric of the window
by its canonical name. Nothing here measures, sleeps or reads a clock.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pytest_llem.backends.base import Generation, MemoryUsage
from pytest_llem.exceptions import InferenceError
from pytest_llem.meters.base import DOMAINS, EnergyReading
from pytest_llem.results.catalogue import (
    CATALOGUE,
    LATENCY_METRICS,
    LATENCY_STATISTICS,
    domain_energy_metric,
    lookup,
)
from pytest_llem.results.stats import percentile

__all__ = [
    "DOMAIN_ENERGY_METRICS",
    "DYNAMIC_METRICS",
    "FLOPS_METHOD",
    "LATENCY_METRICS",
    "LATENCY_STATISTICS",
    "METRIC_UNITS",
    "RequestLatency",
    "WindowEnergy",
    "combine_energy",
    "latency_values",
    "metric_source",
    "request_latency",
    "slo_values",
    "token_chunks",
    "window_values",
]

#: Energy of one domain, by metric name.
DOMAIN_ENERGY_METRICS: dict[str, str] = {domain_energy_metric(d): d for d in DOMAINS}
#: Metrics that need the idle baseline.
DYNAMIC_METRICS: tuple[str, ...] = tuple(name for name, m in CATALOGUE.items() if m.needs_baseline)
#: How ``flops_estimate`` is computed; reports print it next to the figure.
FLOPS_METHOD = "2 * non-embedding parameters * (input + output tokens); attention FLOPs excluded"

_DOMAIN_ITEMS = tuple(DOMAIN_ENERGY_METRICS.items())
_PERCENTILES = {"p50": 50.0, "p90": 90.0, "p95": 95.0, "p99": 99.0}

#: Unit of every scalar metric a window produces, by canonical name (from the catalogue).
METRIC_UNITS: dict[str, str] = {name: m.unit for name, m in CATALOGUE.items()}


@dataclass(frozen=True)
class RequestLatency:
    """Latencies of one request, in milliseconds.

    ``ttft_ms`` and ``e2e_ms`` are None for a request with no output token; ``tpot_ms`` is
    None with fewer than 2. ``itl_ms`` has one entry per output token after the first.
    """

    request_index: int
    output_tokens: int
    ttft_ms: float | None
    e2e_ms: float | None
    tpot_ms: float | None
    itl_ms: list[float] = field(default_factory=list)


def token_chunks(times: Sequence[float]) -> list[tuple[float, int]]:
    """Consecutive tokens sharing one timestamp, as ``(time, token count)``."""
    chunks: list[tuple[float, int]] = []
    for t in times:
        if chunks and chunks[-1][0] == t:
            chunks[-1] = (t, chunks[-1][1] + 1)
        else:
            chunks.append((t, 1))
    return chunks


def _itl_ms(times: Sequence[float]) -> list[float]:
    """Inter-token latencies with the chunk rule.

    The gap before a chunk of k tokens is split evenly over its k tokens. The first token is
    excluded; the other tokens of the first chunk arrived with it, so each gets a gap of 0 ms.
    That keeps one entry per token after the first, ``sum == e2e - ttft`` and
    ``mean == tpot``.
    """
    chunks = token_chunks(times)
    if not chunks:
        return []
    itl = [0.0] * (chunks[0][1] - 1)
    for (previous, _), (t, k) in itertools.pairwise(chunks):
        itl.extend([(t - previous) * 1000.0 / k] * k)
    return itl


def request_latency(gen: Generation, *, arrival: float | None = None) -> RequestLatency:
    """The latencies of one request (METRICS.md, Latency).

    Args:
        gen: What the backend returned for the request.
        arrival: Scheduled arrival (server scenario); defaults to ``gen.issued_at``.

    Returns:
        ttft, e2e, tpot and the inter-token latencies, in milliseconds.

    Raises:
        InferenceError: The backend gave a different number of token times than token ids.
    """
    times = gen.token_times
    if len(times) != gen.output_tokens:
        raise InferenceError(
            f"request {gen.request_index}: {gen.output_tokens} output tokens "
            f"but {len(times)} token times"
        )
    start = gen.issued_at if arrival is None else arrival
    if not times:
        return RequestLatency(gen.request_index, 0, None, None, None, [])
    ttft = (times[0] - start) * 1000.0
    e2e = (times[-1] - start) * 1000.0
    n = gen.output_tokens
    tpot = (e2e - ttft) / (n - 1) if n >= 2 else None
    return RequestLatency(gen.request_index, n, ttft, e2e, tpot, _itl_ms(times))


@dataclass(frozen=True)
class WindowEnergy:
    """The energy of one window, each domain taken from the first meter that measured it.

    ``domains`` has every domain (None where none measured it); ``total_j`` sums the covered
    ones only and is None when none is covered. ``sources`` and ``meters`` name, per covered
    domain, whether it was measured or estimated and by which meter; ``missing`` gives, per
    domain without a number, its note (also in ``notes``).
    """

    total_j: float | None
    domains: dict[str, float | None]
    sources: dict[str, str] = field(default_factory=dict)
    meters: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    emissions_kg: float | None = None
    missing: dict[str, str] = field(default_factory=dict)

    @property
    def covered(self) -> list[str]:
        """The domains some meter measured, in canonical order."""
        return [d for d in DOMAINS if self.domains.get(d) is not None]


def combine_energy(
    readings: Sequence[EnergyReading], assignment: Mapping[str, str] | None = None
) -> WindowEnergy:
    """Combine the readings of one window's meters into one energy per domain.

    Args:
        readings: One reading per meter, in priority order (the first that covers a domain
            with a number wins; the others are ignored for that domain).
        assignment: Domain -> the only meter it may be taken from (so a domain two meters
            cover is counted once, from the more direct one). None: priority order.

    Returns:
        Per-domain energy, the total over covered domains only, their sources, a note per
        uncovered domain (with the meters' reasons) and the summed emissions where known.
    """
    domains: dict[str, float | None] = {}
    sources: dict[str, str] = {}
    meters: dict[str, str] = {}
    notes: list[str] = []
    missing: dict[str, str] = {}
    for domain in DOMAINS:
        reasons: list[str] = []
        domains[domain] = None
        for reading in readings:
            got = reading.domains.get(domain)
            if got is None:
                continue
            if assignment is not None and assignment.get(domain) != reading.meter:
                continue
            if got.energy_j is None:
                reasons.append(f"{reading.meter}: {got.reason or 'not measured'}")
                continue
            domains[domain] = got.energy_j
            sources[domain] = got.source
            meters[domain] = reading.meter
            break
        else:
            why = "; ".join(reasons) if reasons else "no meter covers it"
            missing[domain] = f"{domain}: not measured ({why})"
            notes.append(missing[domain])
    notes.extend(f"{r.meter}: {note}" for r in readings for note in r.notes)
    covered = [v for v in domains.values() if v is not None]
    emissions = [r.emissions_kg for r in readings if r.emissions_kg is not None]
    return WindowEnergy(
        total_j=math.fsum(covered) if covered else None,
        domains=domains,
        sources=sources,
        meters=meters,
        notes=notes,
        emissions_kg=math.fsum(emissions) if emissions else None,
        missing=missing,
    )


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator; None when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def _per_round(value: float | None, rounds: int) -> float | None:
    return None if value is None else value / rounds


def latency_values(latencies: Sequence[RequestLatency]) -> dict[str, float | None]:
    """The per-window latency statistics (``ttft_ms.p50`` ...) of the given requests.

    Args:
        latencies: The window's per-request latencies.

    Returns:
        mean, p50, p90, p95, p99 and max of each latency metric; None where no request
        has that value (e.g. tpot when every request produced fewer than 2 tokens).
    """
    pooled: dict[str, list[float]] = {name: [] for name in LATENCY_METRICS}
    for lat in latencies:
        for name in ("ttft_ms", "tpot_ms", "e2e_ms"):
            value = getattr(lat, name)
            if value is not None:
                pooled[name].append(value)
        pooled["itl_ms"].extend(lat.itl_ms)
    out: dict[str, float | None] = {}
    for name, values in pooled.items():
        ordered = sorted(values)
        out[f"{name}.mean"] = math.fsum(ordered) / len(ordered) if ordered else None
        for stat, q in _PERCENTILES.items():
            out[f"{name}.{stat}"] = percentile(ordered, q) if ordered else None
        out[f"{name}.max"] = ordered[-1] if ordered else None
    return out


def window_values(
    *,
    generations: Sequence[Generation],
    duration_s: float,
    energy: WindowEnergy,
    rounds: int = 1,
    non_embedding_parameters: int | None,
    peak_memory: MemoryUsage,
    latencies: Sequence[RequestLatency] | None = None,
    idle_power_w: float | None = None,
) -> dict[str, float | None]:
    """Every scalar metric of one measurement window, by canonical name.

    Args:
        generations: Every request completed inside the window (all rounds).
        duration_s: The window's wall-clock length.
        energy: The window's combined energy.
        rounds: How many times the workload ran inside the window. Energy, duration and
            counts are reported per round; rates and ratios are unchanged by it.
        non_embedding_parameters: For ``flops_estimate``; None when unknown.
        peak_memory: Peak memory over the window.
        latencies: Per-request latencies when arrivals differ from issue times (server
            scenario); computed from ``generations`` otherwise.
        idle_power_w: Idle power of the covered domains (the baseline); None: no dynamic
            energy. Dynamic energy is not clamped: a negative value is reported as it is.

    Returns:
        The metrics of :data:`METRIC_UNITS`; None (never 0) where a figure is unknown,
        including every energy figure when no meter covered any domain, and where a
        ratio would divide by zero.

    Raises:
        ValueError: ``rounds`` is less than 1.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    requests = len(generations)
    input_tokens = sum(g.input_tokens for g in generations)
    output_tokens = sum(g.output_tokens for g in generations)
    energy_j = energy.total_j
    params = non_embedding_parameters
    values: dict[str, float | None] = {
        "duration_s": duration_s / rounds,
        "requests": requests / rounds,
        "input_tokens": input_tokens / rounds,
        "output_tokens": output_tokens / rounds,
        "energy_j": _per_round(energy_j, rounds),
        **{name: _per_round(energy.domains.get(d), rounds) for name, d in _DOMAIN_ITEMS},
        "avg_power_w": _ratio(energy_j, duration_s),
        "energy_per_output_token_j": _ratio(energy_j, output_tokens),
        "energy_per_request_j": _ratio(energy_j, requests),
        "output_tokens_per_j": _ratio(output_tokens, energy_j),
        **_dynamic_values(energy_j, idle_power_w, duration_s, rounds, output_tokens),
        "output_tokens_per_s": _ratio(output_tokens, duration_s),
        "total_tokens_per_s": _ratio(input_tokens + output_tokens, duration_s),
        "requests_per_s": _ratio(requests, duration_s),
    }
    if latencies is None:
        latencies = [request_latency(g) for g in generations]
    if energy.emissions_kg is not None:
        values["emissions_kg"] = energy.emissions_kg / rounds
    values.update(latency_values(latencies))
    values["peak_memory_mb"] = peak_memory.peak_mb
    values["flops_estimate"] = (
        None if params is None else 2.0 * params * (input_tokens + output_tokens) / rounds
    )
    return values


def _dynamic_values(
    energy_j: float | None,
    idle_power_w: float | None,
    duration_s: float,
    rounds: int,
    output_tokens: int,
) -> dict[str, float | None]:
    """idle_power_w, dynamic_energy_j (per round) and dynamic_energy_per_output_token_j."""
    if energy_j is None or idle_power_w is None:
        dynamic = None
    else:
        dynamic = energy_j - idle_power_w * duration_s
    return {
        "idle_power_w": idle_power_w if energy_j is not None else None,
        "dynamic_energy_j": _per_round(dynamic, rounds),
        "dynamic_energy_per_output_token_j": _ratio(dynamic, output_tokens),
    }


def metric_source(name: str, energy_sources: Mapping[str, str]) -> str:
    """Whether a metric was measured or estimated, by the catalogue's source rule.

    Args:
        name: Canonical metric name.
        energy_sources: Source per covered domain (``{"gpu": "measured"}``).

    Returns:
        For a domain's energy, that domain's source; for the other energy metrics
        ``measured`` only when every covered domain was measured, else ``estimated``
        (``attributed`` for the figures split per request, ``estimated`` likewise);
        ``estimated`` for ``flops_estimate`` and ``emissions_kg`` (a grid carbon-intensity
        model); ``measured`` for the rest (clock and counts).
    """
    known = lookup(name)
    rule = known.source if known is not None else "measured"
    if rule in DOMAINS:
        return energy_sources.get(rule, "measured")
    if rule in ("meters", "attributed"):
        measured = all(source == "measured" for source in energy_sources.values())
        return ("measured" if rule == "meters" else rule) if measured else "estimated"
    return rule


def _meets(value: float | None, bound: float | None, *, missing_ok: bool) -> bool:
    if bound is None:
        return True
    if value is None:
        return missing_ok
    return value <= bound


def slo_values(
    latencies: Sequence[RequestLatency],
    *,
    ttft_ms: float | None,
    tpot_ms: float | None,
    e2e_ms: float | None,
    duration_s: float,
    energy_j: float | None,
) -> dict[str, float | None]:
    """Service-level figures of one window (empty when no bound is set).

    A request is good when it meets every bound that is set. A request with no output token has
    no TTFT or E2E and is never good; one with fewer than 2 output tokens has no TPOT, so the
    TPOT bound does not apply to it. ``duration_s`` and ``energy_j`` are for the same span as
    ``latencies`` (per round, or both for the whole window).

    Returns:
        ``goodput_rps`` (good requests per second), ``energy_per_good_request_j``,
        ``slo_met_fraction`` and, per bound set, ``slo_<bound>_met_fraction``.
    """
    bounds = {"ttft_ms": ttft_ms, "tpot_ms": tpot_ms, "e2e_ms": e2e_ms}
    if all(bound is None for bound in bounds.values()) or not latencies:
        return {}
    good = 0
    met = {name: 0 for name, bound in bounds.items() if bound is not None}
    for lat in latencies:
        produced = lat.ttft_ms is not None
        checks = {
            "ttft_ms": produced and _meets(lat.ttft_ms, ttft_ms, missing_ok=False),
            "tpot_ms": produced and _meets(lat.tpot_ms, tpot_ms, missing_ok=True),
            "e2e_ms": produced and _meets(lat.e2e_ms, e2e_ms, missing_ok=False),
        }
        for name in met:
            met[name] += checks[name]
        good += all(checks[name] for name in met)
    n = len(latencies)
    values: dict[str, float | None] = {
        "goodput_rps": good / duration_s if duration_s > 0 else None,
        "energy_per_good_request_j": energy_j / good if energy_j is not None and good else None,
        "slo_met_fraction": good / n,
    }
    values.update({f"slo_{name}_met_fraction": count / n for name, count in met.items()})
    return values

"""A case's summary: every metric across its repetitions, its latency distributions and notes.

The runner calls :func:`summarise_case` once every window of a case is recorded. A metric no
window has a value for gets its reason from the windows' structured ``missing`` reasons, or
else from the metric catalogue; nothing is recovered by parsing notes.
"""

from __future__ import annotations

from collections.abc import Sequence

from pytest_llem.harness.metrics import FLOPS_METHOD, RequestLatency, metric_source
from pytest_llem.results.catalogue import LATENCY_METRICS, lookup
from pytest_llem.results.models import DistributionSummary, MetricSummary, RepetitionRecord
from pytest_llem.results.stats import distribution, summarise

__all__ = ["case_notes", "missing_reason", "summarise_case"]


def _unique(items: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(items))


def case_notes(
    repetitions: Sequence[RepetitionRecord],
    *,
    metered: bool,
    non_embedding_parameters: int | None,
) -> list[str]:
    """The notes of a case's windows: no meter, saturation, every energy note, the FLOPs method.

    Args:
        repetitions: The measured windows.
        metered: Whether any energy meter watched them.
        non_embedding_parameters: The model's (None: no ``flops_estimate``, no method note).
    """
    notes: list[str] = []
    if not metered:
        notes.append("no energy meter: energy figures are not measured")
    saturated = [rep for rep in repetitions if rep.server is not None and rep.server.saturated]
    if saturated:
        reason = saturated[0].server.saturation_reason if saturated[0].server else None
        notes.append(
            f"saturated in {len(saturated)} of {len(repetitions)} repetitions: {reason}; the "
            "figures describe an overloaded system, not the target load"
        )
    notes.extend(_unique([n for rep in repetitions for n in rep.energy_notes]))
    if non_embedding_parameters is not None:
        notes.append(f"flops_estimate: {FLOPS_METHOD}")
    return notes


def _merged_sources(repetitions: Sequence[RepetitionRecord]) -> dict[str, str]:
    """Source per domain over all repetitions; estimated in any one makes it estimated."""
    merged: dict[str, str] = {}
    for rep in repetitions:
        for domain, source in rep.energy_sources.items():
            if merged.get(domain) != "estimated":
                merged[domain] = source
    return merged


def missing_reason(name: str, repetitions: Sequence[RepetitionRecord]) -> str | None:
    """Why a metric has no value in any repetition.

    Returns:
        The windows' own reasons (``RepetitionRecord.missing``), each once; where no window
        gave one, the catalogue's reason for the metric; None when neither knows.
    """
    reasons = _unique([rep.missing[name] for rep in repetitions if name in rep.missing])
    if reasons:
        return "; ".join(reasons)
    known = lookup(name)
    return known.missing if known is not None else None


def summarise_case(
    repetitions: Sequence[RepetitionRecord], latencies: Sequence[RequestLatency]
) -> tuple[dict[str, MetricSummary], dict[str, DistributionSummary]]:
    """Summarise a case's repetitions and its pooled per-request latencies.

    Args:
        repetitions: The measured windows.
        latencies: Per-request latencies pooled over the measured windows.

    Returns:
        ``(metrics, latency)``: every scalar metric across repetitions with its unit (from the
        catalogue) and source, and the ttft/tpot/itl/e2e distributions over all requests.
    """
    sources = _merged_sources(repetitions)
    names = _unique([name for rep in repetitions for name in rep.values])
    metrics: dict[str, MetricSummary] = {}
    for name in names:
        values = [rep.values.get(name) for rep in repetitions]
        note = None
        if all(v is None for v in values):
            note = missing_reason(name, repetitions)
        elif name == "flops_estimate":
            note = FLOPS_METHOD
        known = lookup(name)
        metrics[name] = summarise(
            values,
            unit=known.unit if known is not None else "",
            source=metric_source(name, sources),
            note=note,
        )
    pooled: dict[str, list[float | None]] = {name: [] for name in LATENCY_METRICS}
    for lat in latencies:
        pooled["ttft_ms"].append(lat.ttft_ms)
        pooled["tpot_ms"].append(lat.tpot_ms)
        pooled["e2e_ms"].append(lat.e2e_ms)
        pooled["itl_ms"].extend(lat.itl_ms)
    latency = {name: distribution(values, unit="ms") for name, values in pooled.items()}
    return metrics, latency

"""One window's energy attributed to its requests, and the window's attribution figures.

:func:`record_window <pytest_llem.harness.window_record.record_window>` calls
:func:`attribute_window` once the window's energy is known; it cuts the window into its rounds,
builds the energy curve from the assigned meters' timelines and hands both to
:mod:`pytest_llem.harness.attribution`. :func:`attribution_values` gives the catalogue's
attributed figures of the window (per round, like every other figure of ``values``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from pytest_llem.harness.attribution import Attribution, RoundActivity, attribute
from pytest_llem.harness.metrics import LATENCY_STATISTICS, RequestLatency
from pytest_llem.harness.step_power import energy_curve
from pytest_llem.harness.window import Window
from pytest_llem.results.attribution import RequestEnergyRecord
from pytest_llem.results.models import PowerTimelineRecord
from pytest_llem.results.stats import percentile

__all__ = ["ATTRIBUTED_METRICS", "attribute_window", "attribution_values"]

#: The attributed figures a window has (None when its energy was not measured).
ATTRIBUTED_METRICS: tuple[str, ...] = (
    *(f"request_energy_j.{stat}" for stat in LATENCY_STATISTICS),
    "prefill_energy_j",
    "decode_energy_j",
    "unattributed_energy_j",
    "energy_per_prefill_token_j",
    "energy_per_decode_token_j",
)


def _rounds(window: Window, latencies: Sequence[RequestLatency]) -> list[RoundActivity] | None:
    if window.started_at is None or len(window.round_starts) != window.rounds:
        return None
    per_round = len(window.generations) // window.rounds
    end = window.started_at + window.duration_s
    bounds = [*window.round_starts[1:], end]
    steps = (
        window.steps if window.steps is not None and len(window.steps) == window.rounds else None
    )
    rounds = []
    for r, (start, stop) in enumerate(zip(window.round_starts, bounds, strict=True)):
        part = slice(r * per_round, (r + 1) * per_round)
        rounds.append(
            RoundActivity(
                start=window.started_at if r == 0 else start,
                end=stop,
                generations=window.generations[part],
                latencies=latencies[part],
                steps=steps[r] if steps is not None else None,
            )
        )
    return rounds


def attribute_window(
    window: Window,
    *,
    domains: Mapping[str, float | None],
    timelines: Sequence[PowerTimelineRecord],
    latencies: Sequence[RequestLatency],
    idle_power_w: float | None,
) -> Attribution | None:
    """The window's energy per request (None: no domain measured, or the window did not record
    its rounds' edges).

    Args:
        window: What the window saw.
        domains: Energy per domain over the window (None: not covered).
        timelines: The assigned meters' power timelines.
        latencies: The window's per-request latencies, in ``window.generations``' order.
        idle_power_w: Idle power of the covered domains (None: no baseline).
    """
    measured = {d: e for d, e in domains.items() if e is not None}
    rounds = _rounds(window, latencies)
    if not measured or rounds is None or window.started_at is None:
        return None
    curve = energy_curve(
        start=window.started_at,
        duration_s=window.duration_s,
        domains=measured,
        timelines=timelines,
    )
    return attribute(rounds, curve=curve, idle_power_w=idle_power_w)


def _sum(records: Sequence[RequestEnergyRecord], name: str) -> float:
    return math.fsum(getattr(r, name) or 0.0 for r in records)


def attribution_values(result: Attribution | None, rounds: int) -> dict[str, float | None]:
    """The window's attributed figures: the distribution of per-request energy, prefill and
    decode energy and the unattributed rest per round, and the fitted energies per token."""
    if result is None:
        return dict.fromkeys(ATTRIBUTED_METRICS)
    energies = sorted(r.energy_j for r in result.per_request if r.energy_j is not None)
    values: dict[str, float | None] = {}
    for stat in LATENCY_STATISTICS:
        if not energies:
            values[f"request_energy_j.{stat}"] = None
        elif stat == "mean":
            values["request_energy_j.mean"] = math.fsum(energies) / len(energies)
        elif stat == "max":
            values["request_energy_j.max"] = energies[-1]
        else:
            values[f"request_energy_j.{stat}"] = percentile(energies, float(stat[1:]))
    record = result.record
    values.update(
        {
            "prefill_energy_j": _sum(result.per_request, "prefill_energy_j") / rounds,
            "decode_energy_j": _sum(result.per_request, "decode_energy_j") / rounds,
            "unattributed_energy_j": result.unattributed_energy_j / rounds,
            "energy_per_prefill_token_j": record.energy_per_prefill_token_j.value,
            "energy_per_decode_token_j": record.energy_per_decode_token_j.value,
        }
    )
    return values

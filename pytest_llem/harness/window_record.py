"""One measured window as a repetition record: every figure, its notes and why any is missing.

The runner hands each closed :class:`~pytest_llem.harness.window.Window` to
:func:`record_window`, which combines the meters' readings, computes every metric of the
window with :mod:`pytest_llem.harness.metrics` and records, per metric without a value, the
reason the window knows (structured, in ``RepetitionRecord.missing``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pytest_llem.harness.attribution import Attribution
from pytest_llem.harness.baseline import idle_power
from pytest_llem.harness.metrics import (
    RequestLatency,
    WindowEnergy,
    combine_energy,
    request_latency,
    slo_values,
    window_values,
)
from pytest_llem.harness.scenarios import (
    achieved_rate,
    mean_concurrency,
    peak_concurrency,
    saturation,
)
from pytest_llem.harness.steady import steady_values
from pytest_llem.harness.window import QUANTISATION_PERIODS, CaseContext, Window, WindowPolicy
from pytest_llem.harness.window_attribution import attribute_window, attribution_values
from pytest_llem.results.catalogue import DOMAINS, STEADY_PREFIX, lookup
from pytest_llem.results.models import (
    DeviceStateRecord,
    PowerTimelineRecord,
    RepetitionRecord,
    ServerLoadRecord,
)
from pytest_llem.results.stats import percentile

__all__ = ["record_window", "window_missing"]


def _repetition(
    index: int,
    window: Window,
    energy: WindowEnergy,
    values: dict[str, float | None],
    server: ServerLoadRecord | None = None,
) -> RepetitionRecord:
    """The record of one window: totals over the whole window; ``values`` are per round."""
    gens = window.generations
    return RepetitionRecord(
        index=index,
        duration_s=window.duration_s,
        rounds=window.rounds,
        requests=len(gens),
        input_tokens=sum(g.input_tokens for g in gens),
        output_tokens=sum(g.output_tokens for g in gens),
        energy_j=energy.total_j,
        gpu_energy_j=energy.domains.get("gpu"),
        cpu_energy_j=energy.domains.get("cpu"),
        dram_energy_j=energy.domains.get("dram"),
        energy_sources=dict(energy.sources),
        energy_notes=list(energy.notes),
        emissions_kg=energy.emissions_kg,
        peak_memory_mb=window.peak_memory.peak_mb,
        peak_memory_kind=window.peak_memory.kind,
        server=server,
        values=values,
    )


def _server_record(window: Window) -> ServerLoadRecord | None:
    """The load of a server window (its first round when the workload ran several)."""
    if not window.loads:
        return None
    load = window.loads[0]
    reason = saturation(load)
    span = load.finishes[-1] - load.arrivals[0] if load.finishes else 0.0
    return ServerLoadRecord(
        target_rate_rps=load.target_rate_rps,
        achieved_rate_rps=achieved_rate(load),
        mean_concurrency=mean_concurrency(load, span),
        peak_concurrency=peak_concurrency(load),
        concurrency_bound_share=load.concurrency_bound_share,
        saturated=reason is not None,
        saturation_reason=reason,
    )


def _server_values(record: ServerLoadRecord | None, window: Window) -> dict[str, float | None]:
    if record is None:
        return {}
    waits = [w * 1e3 for load in window.loads for w in load.waits_s]
    return {
        "target_rate_rps": record.target_rate_rps,
        "achieved_rate_rps": record.achieved_rate_rps,
        "mean_concurrency": record.mean_concurrency,
        "peak_concurrency": float(record.peak_concurrency),
        "queue_wait_ms.mean": sum(waits) / len(waits) if waits else None,
        "queue_wait_ms.p99": percentile(waits, 99) if waits else None,
    }


def _too_short(window: Window, policy: WindowPolicy, energy: WindowEnergy) -> WindowEnergy:
    """No energy for a window shorter than the meters can resolve (never reported measured)."""
    if policy.floor_s <= 0 or window.duration_s >= policy.floor_s:
        return energy
    why = (
        f"window of {window.duration_s:.3f} s is shorter than {QUANTISATION_PERIODS} x the "
        f"meter's {policy.update_period_s:g} s update period ({policy.floor_s:g} s), even after "
        f"repeating the workload {window.rounds} times"
    )
    short = {d: f"{d}: not measured ({why})" for d in energy.covered}
    return WindowEnergy(
        total_j=None,
        domains=dict.fromkeys(energy.domains),
        notes=[*short.values(), *energy.notes],
        missing={**energy.missing, **short},
    )


def _timelines(window: Window, assignment: Mapping[str, str] | None) -> list[PowerTimelineRecord]:
    records = []
    for reading in window.readings:
        for timeline in reading.timelines:
            if assignment is not None and assignment.get(timeline.domain) != reading.meter:
                continue
            records.append(
                PowerTimelineRecord(
                    domain=timeline.domain,
                    meter=reading.meter,
                    times_s=list(timeline.times_s),
                    watts=list(timeline.watts),
                    method=timeline.method,
                    period_s=timeline.period_s,
                    samples=timeline.samples,
                )
            )
    return records


def _device_states(window: Window) -> dict[str, dict[str, DeviceStateRecord]]:
    states: dict[str, dict[str, DeviceStateRecord]] = {}
    for edge in ("start", "end"):
        found = {
            label: DeviceStateRecord(
                temperature_c=state.temperature_c,
                sm_clock_mhz=state.sm_clock_mhz,
                memory_clock_mhz=state.memory_clock_mhz,
                power_limit_w=state.power_limit_w,
                throttle_reasons=list(state.throttle_reasons),
            )
            for reading in window.readings
            for label, state in getattr(reading, f"{edge}_states").items()
        }
        if found:
            states[edge] = found
    return states


def _cross_check(window: Window, assignment: Mapping[str, str] | None) -> dict[str, float]:
    return {
        domain: diff
        for reading in window.readings
        for domain, diff in reading.cross_check.items()
        if assignment is None or assignment.get(domain) == reading.meter
    }


def _thermal_values(states: Mapping[str, Mapping[str, DeviceStateRecord]]) -> dict[str, float]:
    values: dict[str, float] = {}
    for edge in ("start", "end"):
        temps = [
            s.temperature_c for s in states.get(edge, {}).values() if s.temperature_c is not None
        ]
        if temps:
            values[f"temperature_{edge}_c"] = max(temps)
    return values


def _lap_errors(window: Window) -> list[str]:
    return [
        f"steady_state: {lap.error}"
        for marks in window.marks
        for lap in marks.values()
        if lap.error is not None
    ]


def _window_metrics(
    window: Window, context: CaseContext, energy: WindowEnergy, latencies: list[RequestLatency]
) -> tuple[dict[str, float | None], str | None]:
    """Every whole-window figure (steady state aside), and why there is no idle power."""
    config = context.config
    idle_w, no_idle = idle_power(context.baseline, energy.covered, problem=context.baseline_problem)
    values = window_values(
        generations=window.generations,
        duration_s=window.duration_s,
        energy=energy,
        rounds=window.rounds,
        non_embedding_parameters=context.non_embedding_parameters,
        peak_memory=window.peak_memory,
        latencies=latencies,
        idle_power_w=idle_w,
    )
    values.update(
        slo_values(
            latencies,
            ttft_ms=config.slo.ttft_ms,
            tpot_ms=config.slo.tpot_ms,
            e2e_ms=config.slo.e2e_ms,
            duration_s=window.duration_s,
            energy_j=energy.total_j,
        )
    )
    return values, no_idle


def _attribute(
    window: Window,
    energy: WindowEnergy,
    timelines: Sequence[PowerTimelineRecord],
    latencies: Sequence[RequestLatency],
    values: dict[str, float | None],
) -> Attribution | None:
    """The window's energy per request; its attributed figures go into ``values``."""
    attributed = attribute_window(
        window,
        domains=energy.domains if energy.total_j is not None else {},
        timelines=timelines,
        latencies=latencies,
        idle_power_w=values.get("idle_power_w"),
    )
    values.update(attribution_values(attributed, window.rounds))
    return attributed


def record_window(
    index: int, window: Window, context: CaseContext
) -> tuple[RepetitionRecord, list[RequestLatency]]:
    """One window's record and its per-request latencies.

    Args:
        index: The repetition's index.
        window: What the window saw.
        context: What the case's windows are measured against.

    Returns:
        The repetition record (values per round, notes, and ``missing``: per metric without a
        value, the reason this window knows) and the window's per-request latencies.
    """
    energy = _too_short(window, context.policy, combine_energy(window.readings, context.assignment))
    latencies = [
        request_latency(g, arrival=a)
        for g, a in zip(window.generations, window.arrivals, strict=True)
    ]
    values, no_idle = _window_metrics(window, context, energy, latencies)
    timelines = _timelines(window, context.assignment)
    attributed = _attribute(window, energy, timelines, latencies, values)
    cross_check = _cross_check(window, context.assignment)
    states = _device_states(window)
    if cross_check:
        values["counter_vs_power_diff"] = next(iter(cross_check.values()))
    values.update(_thermal_values(states))
    server = _server_record(window)
    values.update(_server_values(server, window))
    steady, steady_notes = steady_values(window, latencies, context)
    values.update(steady)
    repetition = _repetition(index, window, energy, values, server)
    steady_reasons = _unique([*_lap_errors(window), *steady_notes])
    repetition.energy_notes.extend(steady_reasons)
    dynamic_reason = no_idle if energy.total_j is not None else None
    if dynamic_reason is not None:
        repetition.energy_notes.append(f"dynamic: {dynamic_reason}")
    dynamic = values.get("dynamic_energy_j")
    if dynamic is not None and dynamic < 0:
        repetition.dynamic_energy_negative = True
        repetition.energy_notes.append(
            "dynamic: energy below idle power x duration (reported unclamped; the baseline may "
            "be stale or the machine busier when it was taken)"
        )
    repetition.missing = window_missing(
        values,
        energy=energy,
        notes=repetition.energy_notes,
        steady=steady_reasons,
        dynamic=dynamic_reason,
    )
    repetition.power_timeline = timelines
    if attributed is not None:
        repetition.per_request = attributed.per_request
        repetition.unattributed_energy_j = attributed.unattributed_energy_j
        repetition.attribution = attributed.record
    repetition.counter_vs_power_diff = cross_check
    repetition.device_states = states
    repetition.machine_state = window.machine
    return repetition, latencies


def window_missing(
    values: Mapping[str, float | None],
    *,
    energy: WindowEnergy,
    notes: Sequence[str],
    steady: Sequence[str] = (),
    dynamic: str | None = None,
) -> dict[str, str]:
    """Why each energy figure of one window that has no value is missing.

    Only reasons that depend on the window are given; the ones that hold for every window
    alike (no parameter count, fewer than 2 tokens per request, ...) are the catalogue's.

    Args:
        values: The window's figures (None: no value).
        energy: The window's combined energy (``missing`` holds each uncovered domain's note).
        notes: The window's energy notes, quoted when no domain was measured.
        steady: Why the steady span's energy is missing (lap errors, too short a span).
        dynamic: Why there is no idle power for the covered domains (the energy was measured).

    Returns:
        Metric name -> reason, for the metrics of ``values`` without a value whose reason
        this window knows.
    """
    no_energy = "no energy domain measured" + (f": {'; '.join(notes)}" if notes else "")
    missing: dict[str, str] = {}
    for name, value in values.items():
        known = lookup(name)
        if value is not None or known is None or not known.follows_meters:
            continue
        reason: str | None
        if name.startswith(STEADY_PREFIX) and steady:
            reason = "; ".join(steady)
        elif known.source in DOMAINS:
            reason = energy.missing.get(known.source)
        elif known.needs_baseline and dynamic is not None:
            reason = dynamic
        else:
            reason = no_energy if energy.total_j is None else None
        if reason is not None:
            missing[name] = reason
    return missing


def _unique(items: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(items))

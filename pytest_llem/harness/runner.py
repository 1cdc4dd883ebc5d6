"""The runner: warmup, measured repetitions and the measurement window of one case.

``run_case`` drives a scenario's workload through a backend while the energy meters watch,
exactly as METRICS.md's measurement window says, then turns what it saw into repetition
records and summaries with :mod:`pytest_llem.harness.metrics` and
:mod:`pytest_llem.harness.stats`. The caller (the ``llem`` fixture) wraps them in a CaseResult.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pytest_llem.backends.base import Backend, GenerateParams, Generation, MemoryUsage, Request
from pytest_llem.config.models import CaseConfig
from pytest_llem.exceptions import ConfigurationError, EnergyMeterError, InferenceError
from pytest_llem.harness.metrics import (
    DOMAIN_ENERGY_METRICS,
    ENERGY_METRICS,
    FLOPS_METHOD,
    LATENCY_METRICS,
    METRIC_UNITS,
    RequestLatency,
    WindowEnergy,
    combine_energy,
    latency_values,
    metric_source,
    request_latency,
    slo_values,
    window_values,
)
from pytest_llem.harness.scenarios import (
    Mark,
    ServerLoad,
    Workload,
    achieved_rate,
    build_workload,
    mean_concurrency,
    peak_concurrency,
    saturation,
)
from pytest_llem.harness.stats import distribution, percentile, summarise
from pytest_llem.meters.base import DomainReading, EnergyMeter, EnergyReading
from pytest_llem.results.models import (
    DistributionSummary,
    MetricSummary,
    RepetitionRecord,
    ServerLoadRecord,
)

__all__ = [
    "CaseMeasurement",
    "Window",
    "measure_window",
    "run_case",
    "summarise_case",
]

Clock = Callable[[], float]


@dataclass
class CaseMeasurement:
    """What the runner measured for one case, ready to go into a ``CaseResult``.

    ``metrics`` and ``latency`` are the summaries of :func:`summarise_case`; ``latencies``
    are the per-request latencies pooled over the measured repetitions.
    """

    repetitions: list[RepetitionRecord]
    latencies: list[RequestLatency]
    metrics: dict[str, MetricSummary]
    latency: dict[str, DistributionSummary]
    warmup: int
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Window:
    """What one measurement window saw, before any metric is computed.

    ``arrivals[i]`` is the scheduled arrival of ``generations[i]`` (None: its issue time).
    """

    generations: list[Generation]
    duration_s: float
    readings: list[EnergyReading]
    peak_memory: MemoryUsage
    rounds: int = 1
    arrivals: list[float | None] = field(default_factory=list)
    loads: list[ServerLoad] = field(default_factory=list)
    marks: dict[str, Lap] = field(default_factory=dict)
    steady_from: int | None = None


@dataclass(frozen=True)
class Lap:
    """The meters read at a named moment inside a window (``readings`` None: a meter could not
    read mid-window, ``error`` says why)."""

    time: float
    readings: list[EnergyReading] | None
    error: str | None = None


def _lapper(meters: Sequence[EnergyMeter], clock: Clock, marks: dict[str, Lap]) -> Mark:
    def mark(name: str) -> None:
        now = clock()
        try:
            readings = [_lap(meter) for meter in meters]
        except EnergyMeterError as e:
            marks[name] = Lap(now, None, str(e))
            return
        marks[name] = Lap(now, readings)

    return mark


def _lap(meter: EnergyMeter) -> EnergyReading:
    lap = getattr(meter, "lap", None)
    if lap is None:
        raise EnergyMeterError(f"{meter.name}: cannot read energy mid-window")
    reading: EnergyReading = lap()
    return reading


def _abandon(started: Sequence[EnergyMeter]) -> None:
    """Close the windows of started meters while another error propagates (theirs are moot)."""
    for meter in reversed(started):
        with contextlib.suppress(EnergyMeterError):
            meter.stop()


def _start_meters(meters: Sequence[EnergyMeter]) -> None:
    started: list[EnergyMeter] = []
    try:
        for meter in meters:
            meter.start()
            started.append(meter)
    except BaseException:
        _abandon(started)
        raise


def _stop_meters(meters: Sequence[EnergyMeter]) -> list[EnergyReading]:
    """Stop every meter in reverse start order; re-raise the first failure once all stopped."""
    readings: list[EnergyReading] = []
    failure: EnergyMeterError | None = None
    for meter in reversed(meters):
        try:
            readings.append(meter.stop())
        except EnergyMeterError as error:
            failure = failure or error
    if failure is not None:
        raise failure
    readings.reverse()
    return readings


def measure_window(
    *,
    backend: Backend,
    meters: Sequence[EnergyMeter],
    workload: Workload,
    clock: Clock = time.perf_counter,
    rounds: int = 1,
) -> Window:
    """Run ``workload`` ``rounds`` times inside one measurement window (METRICS.md).

    Peak memory is reset and the backend synchronised before the meters start; the window
    runs from just after the meters' ``start()`` to the backend's final ``synchronize()``;
    the meters stop afterwards, in reverse order.

    Args:
        backend: The loaded backend.
        meters: Energy meters in priority order.
        workload: The scenario's workload.
        clock: Wall clock of the window (``time.perf_counter``).
        rounds: Times the workload runs inside the window.

    Returns:
        The window's generations, duration, meter readings and peak memory.

    Raises:
        EnergyMeterError: A meter failed; every started meter has been stopped.
    """
    backend.reset_peak_memory()
    backend.synchronize()
    _start_meters(meters)
    marks: dict[str, Lap] = {}
    mark = _lapper(meters, clock, marks)
    try:
        t0 = clock()
        runs = [workload(mark) for _ in range(rounds)]
        backend.synchronize()
        t1 = clock()
    except BaseException:
        _abandon(meters)
        raise
    readings = _stop_meters(meters)
    generations = [g for run in runs for g in run.generations]
    arrivals: list[float | None] = []
    for run in runs:
        arrivals.extend(run.arrivals if run.arrivals is not None else [None] * len(run.generations))
    loads = [run.load for run in runs if run.load is not None]
    return Window(
        generations,
        t1 - t0,
        readings,
        backend.peak_memory(),
        rounds,
        arrivals,
        loads,
        marks,
        runs[0].steady_from if runs else None,
    )


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


STEADY = "steady_state."


def _lap_difference(start: EnergyReading, end: EnergyReading) -> EnergyReading:
    domains = {}
    for name, last in end.domains.items():
        first = start.domains.get(name)
        both = first is not None and first.energy_j is not None and last.energy_j is not None
        energy = last.energy_j - first.energy_j if both else None  # type: ignore[operator,union-attr]
        domains[name] = DomainReading(last.domain, energy, last.source, reason=last.reason)
    return EnergyReading(end.meter, end.duration_s - start.duration_s, domains)


def _steady_values(window: Window, latencies: Sequence[RequestLatency]) -> dict[str, float | None]:
    """Figures of the steady state alone (server scenario with ``traffic.steady_state``): from
    the issue of the first batch holding a request at or past the ramp-up to the issue of the
    last batch. Energy comes from the meters read at those two moments; latency from the
    requests scheduled from the ramp-up's end on; tokens from those produced in between."""
    start, end = window.marks.get("steady_start"), window.marks.get("steady_end")
    if start is None or end is None or window.steady_from is None:
        return {}
    duration = end.time - start.time
    tokens = sum(1 for g in window.generations for t in g.token_times if start.time < t <= end.time)
    total: float | None = None
    if start.readings is not None and end.readings is not None:
        energy = combine_energy(
            [_lap_difference(a, b) for a, b in zip(start.readings, end.readings, strict=True)]
        )
        total = energy.total_j
    steady = [lat for lat in latencies if lat.request_index >= window.steady_from]
    values: dict[str, float | None] = {
        "duration_s": duration,
        "requests": float(len(steady)),
        "output_tokens": float(tokens),
        "energy_j": total,
        "avg_power_w": total / duration if total is not None and duration > 0 else None,
        "energy_per_output_token_j": total / tokens if total is not None and tokens else None,
        "output_tokens_per_s": tokens / duration if duration > 0 else None,
        **latency_values(steady),
    }
    return {f"{STEADY}{name}": value for name, value in values.items()}


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


def _check_window(window: Window, expected: int) -> None:
    if len(window.generations) != expected:
        raise InferenceError(
            f"backend returned {len(window.generations)} generations for {expected} requests"
        )


def run_case(
    *,
    backend: Backend,
    meters: Sequence[EnergyMeter],
    config: CaseConfig,
    prompts: Sequence[str] = (),
    requests: Sequence[Request] | None = None,
    clock: Clock = time.perf_counter,
    sleep: Callable[[float], None] = time.sleep,
    non_embedding_parameters: int | None = None,
    scenario: str | None = None,
) -> CaseMeasurement:
    """Measure one case: ``config.warmup`` unmeasured runs, then ``config.repeat`` windows.

    Args:
        backend: A loaded backend.
        meters: Energy meters in priority order (may be empty: energy is then None).
        config: The case.
        prompts: One request per prompt, in order (when ``requests`` is not given).
        requests: The workload's requests, prepared by the caller.
        clock: Wall clock of the windows.
        sleep: How the server scenario waits for the next arrival.
        non_embedding_parameters: The model's, for ``flops_estimate`` (None if unknown).
        scenario: How requests are driven (default: ``config.scenario``).

    Returns:
        The repetition records, pooled per-request latencies and their summaries.

    Raises:
        ConfigurationError: No prompts, or an unknown scenario.
        EnergyMeterError: A meter failed in a window (every started meter was stopped).
        InferenceError: The backend failed or returned the wrong number of generations.
    """
    if requests is None:
        requests = [Request(index=i, prompt=p) for i, p in enumerate(prompts)]
    if not requests:
        raise ConfigurationError("a case needs at least one prompt")
    workload = build_workload(
        scenario or config.scenario,
        backend=backend,
        requests=requests,
        params=GenerateParams.from_case(config),
        config=config,
        clock=clock,
        sleep=sleep,
    )
    for _ in range(config.warmup):
        workload()
    repetitions: list[RepetitionRecord] = []
    latencies: list[RequestLatency] = []
    for index in range(config.repeat):
        window = measure_window(backend=backend, meters=meters, workload=workload, clock=clock)
        _check_window(window, workload.requests * window.rounds)
        repetition, window_latencies = _measured(
            index, window, config, non_embedding_parameters=non_embedding_parameters
        )
        repetitions.append(repetition)
        latencies.extend(window_latencies)
    metrics, latency = summarise_case(repetitions, latencies)
    notes = [*workload.notes, *_case_notes(repetitions, meters, non_embedding_parameters)]
    return CaseMeasurement(
        repetitions=repetitions,
        latencies=latencies,
        metrics=metrics,
        latency=latency,
        warmup=config.warmup,
        notes=notes,
    )


def _measured(
    index: int, window: Window, config: CaseConfig, *, non_embedding_parameters: int | None
) -> tuple[RepetitionRecord, list[RequestLatency]]:
    """One window's record and its per-request latencies."""
    energy = combine_energy(window.readings)
    latencies = [
        request_latency(g, arrival=a)
        for g, a in zip(window.generations, window.arrivals, strict=True)
    ]
    values = window_values(
        generations=window.generations,
        duration_s=window.duration_s,
        energy=energy,
        rounds=window.rounds,
        non_embedding_parameters=non_embedding_parameters,
        peak_memory=window.peak_memory,
        latencies=latencies,
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
    server = _server_record(window)
    values.update(_server_values(server, window))
    values.update(_steady_values(window, latencies))
    repetition = _repetition(index, window, energy, values, server)
    repetition.energy_notes.extend(
        f"steady_state: {lap.error}" for lap in window.marks.values() if lap.error is not None
    )
    return repetition, latencies


def _unique(items: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _case_notes(
    repetitions: Sequence[RepetitionRecord],
    meters: Sequence[EnergyMeter],
    non_embedding_parameters: int | None,
) -> list[str]:
    notes: list[str] = []
    if not meters:
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


def _missing_note(name: str, repetitions: Sequence[RepetitionRecord]) -> str | None:
    """Why a metric has no value in any repetition."""
    name = name.removeprefix(STEADY)
    energy_notes = _unique([n for rep in repetitions for n in rep.energy_notes])
    if name in DOMAIN_ENERGY_METRICS:
        domain = DOMAIN_ENERGY_METRICS[name]
        return "; ".join(n for n in energy_notes if n.startswith(f"{domain}:")) or None
    if name in ENERGY_METRICS:
        reasons = "; ".join(energy_notes)
        return f"no energy domain measured: {reasons}" if reasons else "no energy domain measured"
    if name == "flops_estimate":
        return "non-embedding parameter count unknown"
    if name.startswith(("tpot_ms.", "itl_ms.")):
        return "no request produced 2 or more output tokens"
    if name == "peak_memory_mb":
        return "peak memory unavailable"
    return None


def summarise_case(
    repetitions: Sequence[RepetitionRecord], latencies: Sequence[RequestLatency]
) -> tuple[dict[str, MetricSummary], dict[str, DistributionSummary]]:
    """Summarise a case's repetitions and its pooled per-request latencies.

    Args:
        repetitions: The measured windows.
        latencies: Per-request latencies pooled over the measured windows.

    Returns:
        ``(metrics, latency)``: every scalar metric across repetitions with its unit and
        source, and the ttft/tpot/itl/e2e distributions over all requests.
    """
    sources = _merged_sources(repetitions)
    names = _unique([name for rep in repetitions for name in rep.values])
    metrics: dict[str, MetricSummary] = {}
    for name in names:
        values = [rep.values.get(name) for rep in repetitions]
        note = None
        if all(v is None for v in values):
            note = _missing_note(name, repetitions)
        elif name == "flops_estimate":
            note = FLOPS_METHOD
        base = name.removeprefix(STEADY)
        metrics[name] = summarise(
            values,
            unit=METRIC_UNITS.get(base, ""),
            source=metric_source(base, sources),
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

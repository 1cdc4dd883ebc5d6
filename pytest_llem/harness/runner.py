"""The runner: warmup, measured repetitions and the measurement window of one case.

``run_case`` drives a scenario's workload through a backend while the energy meters watch,
exactly as METRICS.md's measurement window says, then turns what it saw into repetition
records and summaries with :mod:`pytest_llem.harness.metrics` and
:mod:`pytest_llem.harness.stats`. The caller (the ``llem`` fixture) wraps them in a CaseResult.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from pytest_llem.backends.base import Backend, GenerateParams, Generation, MemoryUsage, Request
from pytest_llem.config.models import CaseConfig
from pytest_llem.exceptions import ConfigurationError, EnergyMeterError, InferenceError
from pytest_llem.harness.baseline import idle_power
from pytest_llem.harness.metrics import (
    DOMAIN_ENERGY_METRICS,
    DYNAMIC_METRICS,
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
from pytest_llem.harness.windows import abandon_meters, start_meters, stop_meters
from pytest_llem.meters.base import EnergyMeter, EnergyReading, reading_between
from pytest_llem.meters.capabilities import LapsMidWindow
from pytest_llem.results.models import (
    BaselineRecord,
    DeviceStateRecord,
    DistributionSummary,
    MetricSummary,
    PowerTimelineRecord,
    RepetitionRecord,
    ServerLoadRecord,
)

__all__ = [
    "MAX_ROUNDS",
    "QUANTISATION_PERIODS",
    "CaseMeasurement",
    "Window",
    "WindowPolicy",
    "measure_extended_window",
    "measure_window",
    "run_case",
    "summarise_case",
]

Clock = Callable[[], float]

#: A window must span this many counter update periods (5% worst-case quantisation).
QUANTISATION_PERIODS = 20
#: The most rounds of the workload one window may hold.
MAX_ROUNDS = 10_000
#: Tries at one repetition's window before it is reported as too short to measure.
_MAX_EXTENSIONS = 4
#: Aim this much above the target length, so timing noise rarely forces another try.
_HEADROOM = 1.2


@dataclass(frozen=True)
class WindowPolicy:
    """How long a measurement window must last (METRICS.md, Short windows).

    ``target_s`` = max(min_window_s, 20 x the slowest meter's update period): the runner repeats
    the workload inside one window until it lasts that long. ``floor_s`` = 20 x update period:
    a window that still ends shorter has its energy reported as not measured.
    """

    target_s: float = 0.0
    floor_s: float = 0.0
    update_period_s: float | None = None

    @classmethod
    def for_meters(
        cls, *, min_window_s: float, update_periods: Sequence[float | None]
    ) -> WindowPolicy:
        """The policy for meters with these update periods (None: the meter has none)."""
        periods = [p for p in update_periods if p is not None and p > 0]
        period = max(periods) if periods else None
        floor = QUANTISATION_PERIODS * period if period is not None else 0.0
        return cls(max(min_window_s, floor), floor, period)


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
    ``marks`` holds, per round, the meters read at the workload's named moments.
    """

    generations: list[Generation]
    duration_s: float
    readings: list[EnergyReading]
    peak_memory: MemoryUsage
    rounds: int = 1
    arrivals: list[float | None] = field(default_factory=list)
    loads: list[ServerLoad] = field(default_factory=list)
    marks: list[dict[str, Lap]] = field(default_factory=list)
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
    if not isinstance(meter, LapsMidWindow):
        raise EnergyMeterError(f"{meter.name}: cannot read energy mid-window")
    return meter.lap()


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
    start_meters(meters)
    marks: list[dict[str, Lap]] = [{} for _ in range(rounds)]
    try:
        t0 = clock()
        runs = [workload(_lapper(meters, clock, round_marks)) for round_marks in marks]
        backend.synchronize()
        t1 = clock()
    except BaseException:
        abandon_meters(meters)
        raise
    readings = stop_meters(meters)
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


def _steady_values(
    window: Window, latencies: Sequence[RequestLatency], context: _Context
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
    return {f"{STEADY}{name}": value for name, value in values.items()}, notes


def _steady_spans(
    window: Window, latencies: Sequence[RequestLatency], context: _Context
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
    start: Lap, end: Lap, covered: Sequence[str], context: _Context
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
    policy: WindowPolicy | None = None,
    baseline: BaselineRecord | None = None,
    assignment: Mapping[str, str] | None = None,
    baseline_problem: str | None = None,
) -> CaseMeasurement:
    """Measure one case: ``config.warmup`` unmeasured runs, then ``config.repeat`` windows.

    Each window repeats the workload (``rounds``) until it lasts ``policy.target_s``; the
    warmup's duration gives the first guess, and a window that still comes out short is
    measured again with more rounds.

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
        policy: The shortest window (none by default).
        baseline: Idle power per domain, for dynamic energy (None: no dynamic figures).
        assignment: Domain -> the meter it is taken from (None: the first meter covering it).
        baseline_problem: Why there is no baseline, for the dynamic figures' notes.

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
    policy = policy or WindowPolicy()
    per_round: float | None = None
    for _ in range(config.warmup):
        started = clock()
        workload()
        per_round = clock() - started
    rounds = _rounds_for(policy.target_s, per_round, 1)
    repetitions: list[RepetitionRecord] = []
    latencies: list[RequestLatency] = []
    extension_notes: list[str] = []
    context = _Context(
        config, non_embedding_parameters, policy, baseline, assignment, baseline_problem
    )
    for index in range(config.repeat):
        window = measure_extended_window(backend, meters, workload, clock, rounds, policy)
        rounds = window.rounds
        _check_window(window, workload.requests * window.rounds)
        repetition, window_latencies = _measured(index, window, context)
        repetitions.append(repetition)
        latencies.extend(window_latencies)
    if policy.target_s > 0 and any(rep.rounds > 1 for rep in repetitions):
        extension_notes.append(
            f"short windows: the workload ran {'/'.join(str(r.rounds) for r in repetitions)} "
            f"times per window to last at least {policy.target_s:g} s "
            f"(max(--llem-min-window-s, {QUANTISATION_PERIODS} x update period)); "
            "figures are per round"
        )
    metrics, latency = summarise_case(repetitions, latencies)
    notes = [
        *workload.notes,
        *extension_notes,
        *_case_notes(repetitions, meters, non_embedding_parameters),
    ]
    return CaseMeasurement(
        repetitions=repetitions,
        latencies=latencies,
        metrics=metrics,
        latency=latency,
        warmup=config.warmup,
        notes=notes,
    )


def _rounds_for(target_s: float, per_round_s: float | None, current: int) -> int:
    """Rounds needed for a window of ``target_s`` when one round takes ``per_round_s``."""
    if target_s <= 0 or per_round_s is None:
        return current
    if per_round_s <= 0:
        return min(MAX_ROUNDS, max(current * 2, 2))
    return max(1, min(MAX_ROUNDS, math.ceil(target_s * _HEADROOM / per_round_s)))


def measure_extended_window(
    backend: Backend,
    meters: Sequence[EnergyMeter],
    workload: Workload,
    clock: Clock,
    rounds: int,
    policy: WindowPolicy,
) -> Window:
    """A window lasting at least ``policy.target_s``: the workload runs ``rounds`` times, and
    while the window comes out shorter it is measured again with more rounds (a few times at
    most; the energy of a window still shorter than ``policy.floor_s`` is dropped later)."""
    window = measure_window(
        backend=backend, meters=meters, workload=workload, clock=clock, rounds=rounds
    )
    for _ in range(_MAX_EXTENSIONS):
        if window.duration_s >= policy.target_s or window.rounds >= MAX_ROUNDS:
            break
        more = _rounds_for(policy.target_s, window.duration_s / window.rounds, window.rounds)
        window = measure_window(
            backend=backend,
            meters=meters,
            workload=workload,
            clock=clock,
            rounds=max(more, window.rounds + 1),
        )
    return window


@dataclass(frozen=True)
class _Context:
    """What every window of one case is measured against."""

    config: CaseConfig
    non_embedding_parameters: int | None
    policy: WindowPolicy
    baseline: BaselineRecord | None
    assignment: Mapping[str, str] | None
    baseline_problem: str | None = None


def _too_short(window: Window, policy: WindowPolicy, energy: WindowEnergy) -> WindowEnergy:
    """No energy for a window shorter than the meters can resolve (never reported measured)."""
    if policy.floor_s <= 0 or window.duration_s >= policy.floor_s:
        return energy
    why = (
        f"window of {window.duration_s:.3f} s is shorter than {QUANTISATION_PERIODS} x the "
        f"meter's {policy.update_period_s:g} s update period ({policy.floor_s:g} s), even after "
        f"repeating the workload {window.rounds} times"
    )
    return WindowEnergy(
        total_j=None,
        domains=dict.fromkeys(energy.domains),
        notes=[*(f"{d}: not measured ({why})" for d in energy.covered), *energy.notes],
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


def _measured(
    index: int, window: Window, context: _Context
) -> tuple[RepetitionRecord, list[RequestLatency]]:
    """One window's record and its per-request latencies."""
    config = context.config
    non_embedding_parameters = context.non_embedding_parameters
    energy = _too_short(window, context.policy, combine_energy(window.readings, context.assignment))
    idle_w, no_idle = idle_power(context.baseline, energy.covered, problem=context.baseline_problem)
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
        idle_power_w=idle_w,
    )
    cross_check = _cross_check(window, context.assignment)
    states = _device_states(window)
    if cross_check:
        values["counter_vs_power_diff"] = next(iter(cross_check.values()))
    values.update(_thermal_values(states))
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
    steady, steady_notes = _steady_values(window, latencies, context)
    values.update(steady)
    repetition = _repetition(index, window, energy, values, server)
    lap_errors = [
        f"steady_state: {lap.error}"
        for marks in window.marks
        for lap in marks.values()
        if lap.error is not None
    ]
    repetition.energy_notes.extend(_unique([*lap_errors, *steady_notes]))
    if no_idle is not None and energy.total_j is not None:
        repetition.energy_notes.append(f"dynamic: {no_idle}")
    dynamic = values.get("dynamic_energy_j")
    if dynamic is not None and dynamic < 0:
        repetition.dynamic_energy_negative = True
        repetition.energy_notes.append(
            "dynamic: energy below idle power x duration (reported unclamped; the baseline may "
            "be stale or the machine busier when it was taken)"
        )
    repetition.power_timeline = _timelines(window, context.assignment)
    repetition.counter_vs_power_diff = cross_check
    repetition.device_states = states
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
    energy_notes = _unique([n for rep in repetitions for n in rep.energy_notes])
    if name.startswith(STEADY):
        steady = [n for n in energy_notes if n.startswith(STEADY.rstrip("."))]
        name = name.removeprefix(STEADY)
        if steady and (name in ENERGY_METRICS or name in DOMAIN_ENERGY_METRICS):
            return "; ".join(steady)
    if name in DOMAIN_ENERGY_METRICS:
        domain = DOMAIN_ENERGY_METRICS[name]
        return "; ".join(n for n in energy_notes if n.startswith(f"{domain}:")) or None
    if name in DYNAMIC_METRICS:
        dynamic = [n.removeprefix("dynamic: ") for n in energy_notes if n.startswith("dynamic:")]
        if dynamic:
            return "; ".join(_unique(dynamic))
    if name == "emissions_kg":
        return "no meter reports emissions (codecarbon does, as an estimate)"
    if name == "counter_vs_power_diff":
        return "no meter has both an energy counter and power samples for the same window"
    if name.startswith("temperature_"):
        return "no meter reports device temperatures"
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

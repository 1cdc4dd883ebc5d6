"""The runner: warmup, measured repetitions and the measurement window of one case.

``run_case`` drives a scenario's workload through a backend while the energy meters watch,
exactly as METRICS.md's measurement window says. Each closed window becomes a repetition record
(:mod:`pytest_llem.harness.window_record`, with its steady state from
:mod:`pytest_llem.harness.steady`), and the case is summarised by
:mod:`pytest_llem.harness.case_summary`. The caller (the ``llem`` fixture) wraps the result in a
CaseResult.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import cast

from pytest_llem.backends.base import Backend, GenerateParams, MemoryUsage, Request
from pytest_llem.backends.steps import RecordsSteps, StepTimeline
from pytest_llem.config.models import CaseConfig
from pytest_llem.exceptions import ConfigurationError, EnergyMeterError, InferenceError
from pytest_llem.harness.adaptive import AdaptiveStop
from pytest_llem.harness.case_summary import case_notes, summarise_case
from pytest_llem.harness.machine_state import MachineProbe
from pytest_llem.harness.metrics import RequestLatency
from pytest_llem.harness.prefill_check import PrefillCheck
from pytest_llem.harness.scenarios import Mark, Workload, WorkloadRun, build_workload
from pytest_llem.harness.window import (
    MAX_ROUNDS,
    QUANTISATION_PERIODS,
    CaseContext,
    Clock,
    Lap,
    Window,
    WindowPolicy,
)
from pytest_llem.harness.window_record import record_window
from pytest_llem.harness.windows import abandon_meters, start_meters, stop_meters
from pytest_llem.meters.base import EnergyMeter, EnergyReading
from pytest_llem.meters.capabilities import LapsMidWindow
from pytest_llem.results.adaptive import AUTO, AdaptivePlan, AdaptiveRecord
from pytest_llem.results.models import (
    BaselineRecord,
    DistributionSummary,
    MetricSummary,
    RepetitionRecord,
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

#: Tries at one repetition's window before it is reported as too short to measure.
_MAX_EXTENSIONS = 4
#: Aim this much above the target length, so timing noise rarely forces another try.
_HEADROOM = 1.2


@dataclass
class CaseMeasurement:
    """What the runner measured for one case, ready to go into a ``CaseResult``.

    ``metrics`` and ``latency`` are the summaries of :func:`summarise_case`; ``latencies``
    are the per-request latencies pooled over the measured repetitions; ``adaptive`` says how
    a ``repeat="auto"`` case chose its number of windows.
    """

    repetitions: list[RepetitionRecord]
    latencies: list[RequestLatency]
    metrics: dict[str, MetricSummary]
    latency: dict[str, DistributionSummary]
    warmup: int
    notes: list[str] = field(default_factory=list)
    adaptive: AdaptiveRecord | None = None


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
    machine: MachineProbe | None = None,
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
        machine: Reads the host's state at the window's edges, outside it (None: not read).

    Returns:
        The window's generations, duration, meter readings and peak memory.

    Raises:
        EnergyMeterError: A meter failed; every started meter has been stopped.
    """
    backend.reset_peak_memory()
    backend.synchronize()
    edge = machine.snapshot() if machine is not None else None
    timeline = _record_steps(backend)
    start_meters(meters)
    marks: list[dict[str, Lap]] = [{} for _ in range(rounds)]
    round_starts: list[float] = []
    try:
        t0 = clock()
        runs = [
            _run_round(workload, _lapper(meters, clock, round_marks), clock, round_starts, timeline)
            for round_marks in marks
        ]
        backend.synchronize()
        t1 = clock()
    except BaseException:
        abandon_meters(meters)
        raise
    finally:
        if timeline is not None:
            cast(RecordsSteps, backend).record_steps(None)
    readings = stop_meters(meters)
    state = (
        machine.window(edge, machine.snapshot())
        if machine is not None and edge is not None
        else None
    )
    window = _window_of(runs, marks, readings, backend.peak_memory())
    return replace(
        window,
        duration_s=t1 - t0,
        machine=state,
        started_at=t0,
        round_starts=round_starts,
        steps=timeline.rounds if timeline is not None else None,
    )


def _window_of(
    runs: Sequence[WorkloadRun],
    marks: list[dict[str, Lap]],
    readings: list[EnergyReading],
    peak: MemoryUsage,
) -> Window:
    """The window of these rounds (its timing is set by the caller)."""
    arrivals: list[float | None] = []
    for run in runs:
        arrivals.extend(run.arrivals if run.arrivals is not None else [None] * len(run.generations))
    return Window(
        [g for run in runs for g in run.generations],
        0.0,
        readings,
        peak,
        len(runs),
        arrivals,
        [run.load for run in runs if run.load is not None],
        marks,
        runs[0].steady_from if runs else None,
    )


def _run_round(
    workload: Workload,
    mark: Mark,
    clock: Clock,
    starts: list[float],
    timeline: StepTimeline | None,
) -> WorkloadRun:
    """One round of the workload inside a window; its start goes into ``starts``."""
    starts.append(clock())
    if timeline is not None:
        timeline.begin_round()
    return workload(mark)


def _record_steps(backend: Backend) -> StepTimeline | None:
    """A step timeline the backend fills from now on, if it reports its engine's steps."""
    if not isinstance(backend, RecordsSteps):
        return None
    timeline = StepTimeline()
    backend.record_steps(timeline)
    return timeline


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
    machine: MachineProbe | None = None,
    adaptive: AdaptiveStop | None = None,
) -> CaseMeasurement:
    """Measure one case: ``config.warmup`` unmeasured runs, then ``config.repeat`` windows
    (with ``repeat="auto"``, windows until ``adaptive`` says to stop).

    Each window repeats the workload (``rounds``) until it lasts ``policy.target_s``; the
    warmup's duration gives the first guess, and a window that still comes out short is
    measured again with more rounds. The rounds carry over from window to window, so an
    adaptive case's windows are as long as a fixed one's.

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
        machine: Reads the host's state at each window's edges (None: not read).
        adaptive: When a ``repeat="auto"`` case stops (default: the default plan, no gate);
            ignored for a fixed ``repeat``.

    Returns:
        The repetition records, pooled per-request latencies and their summaries.

    Raises:
        ConfigurationError: No prompts, or an unknown scenario.
        EnergyMeterError: A meter failed in a window (every started meter was stopped).
        InferenceError: The backend failed or returned the wrong number of generations.
    """
    if requests is None:
        requests = [Request(index=i, prompt=p) for i, p in enumerate(prompts)]
    workload = _workload(scenario or config.scenario, backend, requests, config, clock, sleep)
    policy = policy or WindowPolicy()
    stop: AdaptiveStop | None = None
    if config.repeat == AUTO:
        stop = adaptive or AdaptiveStop(AdaptivePlan(), clock)
        stop.start()
    rounds = _rounds_for(policy.target_s, _warm_up(workload, config.warmup, clock), 1)
    context = CaseContext(
        config, non_embedding_parameters, policy, baseline, assignment, baseline_problem
    )
    repetitions, latencies, record = _measure_windows(
        backend, meters, workload, clock, rounds, context, stop, machine=machine
    )
    if config.prefill_check:
        PrefillCheck.for_case(
            backend=backend, meters=meters, config=config, requests=requests,
            scenario=scenario or config.scenario, clock=clock, policy=policy, assignment=assignment,
        ).measure(repetitions)  # fmt: skip
    metrics, latency = summarise_case(repetitions, latencies)
    notes = [
        *workload.notes,
        *_extension_notes(repetitions, policy),
        *_adaptive_notes(record),
        *case_notes(
            repetitions, metered=bool(meters), non_embedding_parameters=non_embedding_parameters
        ),
    ]
    return CaseMeasurement(
        repetitions=repetitions,
        latencies=latencies,
        metrics=metrics,
        latency=latency,
        warmup=config.warmup,
        notes=notes,
        adaptive=record,
    )


def _workload(
    scenario: str,
    backend: Backend,
    requests: Sequence[Request],
    config: CaseConfig,
    clock: Clock,
    sleep: Callable[[float], None],
) -> Workload:
    """The scenario's workload over ``requests`` (refused when there are none)."""
    if not requests:
        raise ConfigurationError("a case needs at least one prompt")
    return build_workload(
        scenario,
        backend=backend,
        requests=requests,
        params=GenerateParams.from_case(config),
        config=config,
        clock=clock,
        sleep=sleep,
    )


def _measure_windows(
    backend: Backend,
    meters: Sequence[EnergyMeter],
    workload: Workload,
    clock: Clock,
    rounds: int,
    context: CaseContext,
    stop: AdaptiveStop | None,
    *,
    machine: MachineProbe | None = None,
) -> tuple[list[RepetitionRecord], list[RequestLatency], AdaptiveRecord | None]:
    """The measured windows: ``repeat`` of them, or until ``stop`` says so (``auto``); the
    host's state read at each window's edges by ``machine``."""
    repetitions: list[RepetitionRecord] = []
    latencies: list[RequestLatency] = []
    fixed = context.config.repeat
    while stop is not None or len(repetitions) < int(fixed):
        window = measure_extended_window(
            backend, meters, workload, clock, rounds, context.policy, machine=machine
        )
        rounds = window.rounds
        _check_window(window, workload.requests * window.rounds)
        repetition, window_latencies = record_window(len(repetitions), window, context)
        repetitions.append(repetition)
        latencies.extend(window_latencies)
        reason = stop.after(repetitions, window.duration_s) if stop is not None else None
        if stop is not None and reason is not None:
            return repetitions, latencies, stop.record(len(repetitions), reason)
    return repetitions, latencies, None


def _adaptive_notes(record: AdaptiveRecord | None) -> list[str]:
    """The note of a ``repeat=auto`` case: its windows, why it stopped, its looks' level."""
    if record is None:
        return []
    looks = ", ".join(str(n) for n in record.looks) or "none"
    return [
        f"repeat=auto: {record.summary}; rule {record.rule}, looked after {looks} windows "
        f"at {record.confidence:.2%} (Bonferroni over {record.planned_looks} planned looks)"
    ]


def _warm_up(workload: Workload, warmup: int, clock: Clock) -> float | None:
    """Run the unmeasured warmup; the last run's duration (None without warmup)."""
    per_round: float | None = None
    for _ in range(warmup):
        started = clock()
        workload()
        per_round = clock() - started
    return per_round


def _extension_notes(repetitions: Sequence[RepetitionRecord], policy: WindowPolicy) -> list[str]:
    """The note on windows that repeated the workload to last long enough (none otherwise)."""
    if policy.target_s <= 0 or not any(rep.rounds > 1 for rep in repetitions):
        return []
    return [
        f"short windows: the workload ran {'/'.join(str(r.rounds) for r in repetitions)} "
        f"times per window to last at least {policy.target_s:g} s "
        f"(max(--llem-min-window-s, {QUANTISATION_PERIODS} x update period)); "
        "figures are per round"
    ]


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
    *,
    machine: MachineProbe | None = None,
) -> Window:
    """A window lasting at least ``policy.target_s``: the workload runs ``rounds`` times, and
    while the window comes out shorter it is measured again with more rounds (a few times at
    most; the energy of a window still shorter than ``policy.floor_s`` is dropped later)."""
    window = measure_window(
        backend=backend,
        meters=meters,
        workload=workload,
        clock=clock,
        rounds=rounds,
        machine=machine,
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
            machine=machine,
        )
    return window

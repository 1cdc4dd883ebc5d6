"""Scenarios: how a workload's requests are driven through a backend.

A scenario turns a case into a :class:`Workload` that the runner calls inside the measurement
window. Everything a scenario can prepare (batches, the arrival schedule) is prepared before the
window opens, so the window holds only the requests.

- ``offline``: every request is available at once; consecutive batches of ``batch_size``.
- ``single_stream``: one request at a time, each issued when the previous one completed.
- ``server``: an open loop. Requests arrive on a precomputed, seeded schedule and are issued
  whether or not earlier ones finished, up to ``traffic.max_concurrency`` in flight; latency is
  measured from the scheduled arrival, so time spent queueing counts. An engine without its own
  scheduler (transformers) serves the queue in batches: whenever it is free it takes every
  request that has arrived and is waiting (at most ``batch_size``, and at most
  ``max_concurrency``) and generates them together to completion. That is request-level
  batching, not continuous batching: a request arriving during a batch waits for the next one.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field

from pytest_llem.backends.base import (
    Backend,
    GenerateParams,
    Generation,
    Request,
    SchedulingBackend,
)
from pytest_llem.config.models import CaseConfig, TrafficConfig
from pytest_llem.exceptions import ConfigurationError
from pytest_llem.harness.traffic import arrival_offsets, request_count

__all__ = [
    "SCENARIOS",
    "Mark",
    "ScenarioFactory",
    "ServerLoad",
    "Workload",
    "WorkloadRun",
    "achieved_rate",
    "build_workload",
    "mean_concurrency",
    "offline",
    "peak_concurrency",
    "saturation",
    "server",
    "single_stream",
    "split_batches",
]

Clock = Callable[[], float]
Sleep = Callable[[float], None]


@dataclass
class ServerLoad:
    """What the server scenario's load looked like in one run.

    ``waits_s`` are the queueing delays (issue time minus scheduled arrival) per request;
    ``concurrency_bound_share`` is the share of batches cut short by ``max_concurrency`` while
    more requests were waiting (for an engine with its own scheduler: the share of requests
    that had to wait for a free slot).
    """

    target_rate_rps: float
    arrivals: list[float]
    issues: list[float]
    finishes: list[float]
    waits_s: list[float]
    concurrency_bound_share: float
    max_concurrency: int | None


@dataclass
class WorkloadRun:
    """One run of a workload: a Generation per request and, for the server scenario, each
    request's scheduled arrival (perf_counter seconds) and the load it saw."""

    generations: list[Generation]
    arrivals: list[float] | None = None
    load: ServerLoad | None = None
    steady_from: int | None = None


#: Called by a workload at a named moment inside the window (``steady_start``, ``steady_end``);
#: the runner reads the meters there without closing the window.
Mark = Callable[[str], None]


def _no_mark(name: str) -> None:
    return None


@dataclass
class Workload:
    """A prepared workload: ``workload(mark)`` issues every request once."""

    run: Callable[[Mark], WorkloadRun]
    requests: int
    scenario: str = "offline"
    notes: list[str] = field(default_factory=list)

    def __call__(self, mark: Mark = _no_mark) -> WorkloadRun:
        return self.run(mark)


#: Builds a :class:`Workload` for a case (called once per case, outside any window).
ScenarioFactory = Callable[..., Workload]


def split_batches(requests: Sequence[Request], batch_size: int) -> list[list[Request]]:
    """Consecutive batches of at most ``batch_size`` requests, in order.

    Args:
        requests: The workload's requests.
        batch_size: Requests per batch (at least 1).

    Returns:
        The batches, e.g. sizes 4, 4, 2 for 10 requests in batches of 4.
    """
    if batch_size < 1:
        raise ConfigurationError(f"batch_size must be at least 1, got {batch_size}")
    return [list(requests[i : i + batch_size]) for i in range(0, len(requests), batch_size)]


def _batched(
    backend: Backend, requests: Sequence[Request], params: GenerateParams, size: int, name: str
) -> Workload:
    batches = split_batches(requests, size)

    def run(mark: Mark) -> WorkloadRun:
        generations: list[Generation] = []
        for batch in batches:
            generations.extend(backend.generate(batch, params=params))
        return WorkloadRun(generations)

    return Workload(run, len(requests), name)


def offline(
    *,
    backend: Backend,
    requests: Sequence[Request],
    params: GenerateParams,
    config: CaseConfig,
    **_: object,
) -> Workload:
    """The offline scenario: every request available at once, sent in consecutive batches of
    ``config.batch_size``; a request's arrival is the moment its batch is issued."""
    return _batched(backend, requests, params, config.batch_size, "offline")


def single_stream(
    *,
    backend: Backend,
    requests: Sequence[Request],
    params: GenerateParams,
    config: CaseConfig,
    **_: object,
) -> Workload:
    """The single-stream scenario: one request at a time, each issued when the previous one
    completed; a request's arrival is the moment it is issued."""
    return _batched(backend, requests, params, 1, "single_stream")


def _server_run(
    traffic: TrafficConfig,
    generations: list[Generation],
    arrivals: list[float],
    issues: list[float],
    finishes: list[float],
    bound_share: float,
) -> WorkloadRun:
    """A server run's generations with its schedule, the load it saw and its steady start."""
    load = ServerLoad(
        target_rate_rps=traffic.rate,
        arrivals=arrivals,
        issues=issues,
        finishes=finishes,
        waits_s=[max(0.0, s - a) for s, a in zip(issues, arrivals, strict=True)],
        concurrency_bound_share=bound_share,
        max_concurrency=traffic.max_concurrency,
    )
    steady = _steady_from(traffic, len(arrivals)) if traffic.steady_state else None
    return WorkloadRun(generations, arrivals, load, steady)


def _steady_from(traffic: TrafficConfig, requests: int) -> int:
    """Index of the first request past the ramp-up."""
    return math.ceil(traffic.ramp_up_fraction * requests)


def _scheduled_requests(requests: Sequence[Request], count: int) -> list[Request]:
    """``count`` requests cycling through ``requests``, indexed 0..count-1."""
    return [dataclasses.replace(requests[i % len(requests)], index=i) for i in range(count)]


def server(
    *,
    backend: Backend,
    requests: Sequence[Request],
    params: GenerateParams,
    config: CaseConfig,
    clock: Clock = time.perf_counter,
    sleep: Sleep = time.sleep,
    **_: object,
) -> Workload:
    """The server scenario (see the module docstring for how the queue is served)."""
    traffic = config.traffic
    offsets = arrival_offsets(traffic, count=request_count(traffic, len(requests)))
    scheduled = _scheduled_requests(requests, len(offsets))
    schedule = (
        f"server: {len(offsets)} {traffic.arrival} arrivals at {traffic.rate:g} requests/s "
        f"(seed {traffic.seed})"
    )
    if backend.capabilities.scheduling and isinstance(backend, SchedulingBackend):
        submitted = _submitting_run(
            backend, scheduled, offsets, params, config, clock=clock, sleep=sleep
        )
        note = f"{schedule}, each submitted at its arrival to the engine's own scheduler"
        return Workload(submitted, len(scheduled), "server", [note])
    limit = config.batch_size
    if traffic.max_concurrency is not None:
        limit = min(limit, traffic.max_concurrency)
    batched = _batching_run(
        backend, scheduled, offsets, params, config, limit=limit, clock=clock, sleep=sleep
    )
    note = f"{schedule}, served in batches of up to {limit} by request-level batching"
    return Workload(batched, len(scheduled), "server", [note])


def _batching_run(
    backend: Backend,
    scheduled: Sequence[Request],
    offsets: Sequence[float],
    params: GenerateParams,
    config: CaseConfig,
    *,
    limit: int,
    clock: Clock,
    sleep: Sleep,
) -> Callable[[Mark], WorkloadRun]:
    """The server scenario by request-level batching: whenever the engine is free, the requests
    that have arrived (up to ``limit``) go to ``generate`` as one batch."""
    traffic = config.traffic
    concurrency_binds = traffic.max_concurrency is not None and traffic.max_concurrency < (
        config.batch_size
    )
    steady_from = _steady_from(traffic, len(scheduled))

    def run(mark: Mark) -> WorkloadRun:
        start = clock()
        arrivals = [start + offset for offset in offsets]
        generations: list[Generation] = []
        issues: list[float] = []
        finishes: list[float] = []
        batches = bound = 0
        i = 0
        while i < len(scheduled):
            now = clock()
            if arrivals[i] > now:
                sleep(arrivals[i] - now)
                now = max(clock(), arrivals[i])
            j = i
            while j < len(scheduled) and arrivals[j] <= now and j - i < limit:
                j += 1
            batches += 1
            if concurrency_binds and j < len(scheduled) and arrivals[j] <= now:
                bound += 1
            if traffic.steady_state:
                if i <= steady_from < j:
                    mark("steady_start")
                if j == len(scheduled):
                    mark("steady_end")
            issued = clock()
            out = backend.generate(scheduled[i:j], params=params)
            finished = clock()
            generations.extend(out)
            issues.extend([issued] * (j - i))
            finishes.extend([finished] * (j - i))
            i = j
        bound_share = bound / batches if batches else 0.0
        return _server_run(traffic, generations, arrivals, issues, finishes, bound_share)

    return run


def _submitting_run(
    backend: SchedulingBackend,
    scheduled: Sequence[Request],
    offsets: Sequence[float],
    params: GenerateParams,
    config: CaseConfig,
    *,
    clock: Clock,
    sleep: Sleep,
) -> Callable[[Mark], WorkloadRun]:
    """The server scenario for an engine with its own scheduler: every request is submitted at
    its scheduled arrival (or, when ``max_concurrency`` requests are in flight, as soon as one
    finishes) and the engine decides how to batch them."""
    traffic = config.traffic
    steady_from = _steady_from(traffic, len(scheduled))

    def run(mark: Mark) -> WorkloadRun:
        start = clock()
        arrivals = [start + offset for offset in offsets]
        futures: list[Future[Generation]] = []
        issues: list[float] = []
        waited = 0
        for k, request in enumerate(scheduled):
            now = clock()
            if arrivals[k] > now:
                sleep(arrivals[k] - now)
            if traffic.max_concurrency is not None:
                running = [f for f in futures if not f.done()]
                if len(running) >= traffic.max_concurrency:
                    waited += 1
                    while len(running) >= traffic.max_concurrency:
                        wait(running, return_when=FIRST_COMPLETED)
                        running = [f for f in futures if not f.done()]
            if traffic.steady_state and k == steady_from:
                mark("steady_start")
            if traffic.steady_state and k == len(scheduled) - 1:
                mark("steady_end")
            issues.append(clock())
            futures.append(backend.submit(request, params=params))
        generations = [future.result() for future in futures]
        finishes = [
            g.token_times[-1] if g.token_times else issued
            for g, issued in zip(generations, issues, strict=True)
        ]
        bound_share = waited / len(scheduled)
        return _server_run(traffic, generations, arrivals, issues, finishes, bound_share)

    return run


#: Scenarios by name.
SCENARIOS: dict[str, ScenarioFactory] = {
    "offline": offline,
    "single_stream": single_stream,
    "server": server,
}


def build_workload(
    scenario: str,
    *,
    backend: Backend,
    requests: Sequence[Request],
    params: GenerateParams,
    config: CaseConfig,
    clock: Clock = time.perf_counter,
    sleep: Sleep = time.sleep,
) -> Workload:
    """The workload of a case under the named scenario.

    Raises:
        ConfigurationError: The scenario is unknown.
    """
    try:
        factory = SCENARIOS[scenario]
    except KeyError:
        known = ", ".join(sorted(SCENARIOS))
        raise ConfigurationError(f"unknown scenario {scenario!r}; choose from: {known}") from None
    return factory(
        backend=backend, requests=requests, params=params, config=config, clock=clock, sleep=sleep
    )


def mean_concurrency(load: ServerLoad, duration_s: float) -> float | None:
    """Time-averaged requests in flight (arrived, not finished) over ``duration_s``."""
    if duration_s <= 0:
        return None
    busy = sum(f - a for a, f in zip(load.arrivals, load.finishes, strict=True))
    return busy / duration_s


def peak_concurrency(load: ServerLoad) -> int:
    """Most requests in flight (arrived, not finished) at any moment."""
    events = sorted(
        [(a, 1) for a in load.arrivals] + [(f, -1) for f in load.finishes],
        key=lambda e: (e[0], e[1]),
    )
    peak = current = 0
    for _, step in events:
        current += step
        peak = max(peak, current)
    return peak


def achieved_rate(load: ServerLoad) -> float | None:
    """Requests issued per second between the first and the last issue."""
    if len(load.issues) < 2:
        return None
    span = load.issues[-1] - load.issues[0]
    return (len(load.issues) - 1) / span if span > 0 else None


#: Share of batches cut short by max_concurrency above which it counts as the binding limit.
BOUND_SHARE_LIMIT = 0.25


def saturation(load: ServerLoad) -> str | None:
    """Why the run was saturated, or None: the queueing delay kept growing (the last quarter of
    requests waited more than twice as long as the first quarter, and longer than a mean
    service time), the time from arrival to finish grew the same way (an engine with its own
    scheduler queues inside, where the harness sees no wait), or ``max_concurrency`` cut short
    more than a quarter of the batches."""
    reasons = []
    n = len(load.waits_s)
    if n >= 4:
        quarter = max(1, n // 4)
        first = sum(load.waits_s[:quarter]) / quarter
        last = sum(load.waits_s[-quarter:]) / quarter
        service = sum(f - s for s, f in zip(load.issues, load.finishes, strict=True)) / n
        if last > 2 * first and last > service:
            reasons.append(
                f"the queue kept growing: waits rose from {first * 1e3:.1f} ms (first quarter) "
                f"to {last * 1e3:.1f} ms (last quarter)"
            )
        else:
            reasons.extend(_growing_sojourn(load, quarter))
    if load.concurrency_bound_share > BOUND_SHARE_LIMIT:
        reasons.append(
            f"max_concurrency={load.max_concurrency} was the binding limit for "
            f"{load.concurrency_bound_share:.0%} of issues"
        )
    return "; ".join(reasons) or None


def _growing_sojourn(load: ServerLoad, quarter: int) -> list[str]:
    """The saturation reason when requests spent ever longer from arrival to finish: the last
    quarter's mean more than twice the first quarter's (which holds one service time, so
    this is a backlog of more than one service time that built up over the run)."""
    sojourns = [f - a for a, f in zip(load.arrivals, load.finishes, strict=True)]
    first = sum(sojourns[:quarter]) / quarter
    last = sum(sojourns[-quarter:]) / quarter
    if first <= 0 or last <= 2 * first:
        return []
    return [
        f"requests took ever longer from arrival to finish: {first * 1e3:.1f} ms (first "
        f"quarter) rising to {last * 1e3:.1f} ms (last quarter)"
    ]

"""A simulated continuously batching engine and meter with known per-token energy costs.

Each step prefills the waiting requests it admits (their whole prompt, producing their first
token) and decodes one token for every running request. A step lasts ``step_s +
prefill_s * prefill tokens + decode_s * decode tokens`` and costs ``idle_w * duration +
prefill_j * prefill tokens + decode_j * decode tokens`` joules (times a seeded jitter of
``noise``); between arrivals the engine idles at ``idle_w``. The run gives the generations the
backend would return, the engine steps it would report and the meter's power timeline.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from pytest_llem.backends.base import Generation
from pytest_llem.backends.steps import EngineStep, StepWork
from pytest_llem.results.models import PowerTimelineRecord

__all__ = ["SimEngine", "SimRun"]


@dataclass
class SimRun:
    """What one simulated run produced (times are absolute seconds)."""

    generations: list[Generation]
    steps: list[EngineStep]
    times: list[float]
    watts: list[float]
    energy_j: float
    start: float
    end: float

    def timeline(self) -> PowerTimelineRecord:
        """The meter's power timeline, times relative to the run's start."""
        return PowerTimelineRecord(
            domain="gpu", meter="sim", times_s=[t - self.start for t in self.times],
            watts=list(self.watts), method="sim", period_s=0.0, samples=len(self.times),
        )  # fmt: skip


@dataclass
class _Live:
    index: int
    arrival: float
    input_tokens: int
    output_tokens: int
    times: list[float] = field(default_factory=list)


@dataclass
class SimEngine:
    """The engine's costs (see the module docstring)."""

    idle_w: float = 50.0
    prefill_j: float = 0.004
    decode_j: float = 0.08
    step_s: float = 0.004
    prefill_s: float = 0.00002
    decode_s: float = 0.0005
    max_running: int = 8
    noise: float = 0.01
    seed: int = 7

    def run(self, requests: list[tuple[float, int, int]], start: float) -> SimRun:
        """Run ``(arrival offset s, input tokens, output tokens)`` requests from ``start``."""
        rng = random.Random(self.seed)
        pending = sorted(
            (_Live(i, start + at, n_in, n_out) for i, (at, n_in, n_out) in enumerate(requests)),
            key=lambda r: r.arrival,
        )
        running: list[_Live] = []
        done: list[_Live] = []
        t, energy = start, 0.0
        times: list[float] = []
        watts: list[float] = []
        steps: list[EngineStep] = []
        while pending or running:
            if not running and pending and pending[0].arrival > t:
                times.append(pending[0].arrival)
                watts.append(self.idle_w)
                energy += self.idle_w * (pending[0].arrival - t)
                t = pending[0].arrival
            admitted = []
            while (
                pending
                and pending[0].arrival <= t
                and len(running) + len(admitted) < (self.max_running)
            ):
                admitted.append(pending.pop(0))
            decoding = [r for r in running if len(r.times) < r.output_tokens]
            p = sum(r.input_tokens for r in admitted)
            d = len(decoding)
            duration = self.step_s + self.prefill_s * p + self.decode_s * d
            cost = (self.prefill_j * p + self.decode_j * d) * (1 + rng.uniform(-1, 1) * self.noise)
            step_j = self.idle_w * duration + cost
            end = t + duration
            work = [StepWork(r.index, r.input_tokens, 0) for r in admitted]
            work += [StepWork(r.index, 0, 1) for r in decoding]
            steps.append(EngineStep(t, end, tuple(work)))
            for r in (*admitted, *decoding):
                r.times.append(end)
            running = [r for r in (*running, *admitted) if len(r.times) < r.output_tokens]
            done.extend(r for r in admitted + decoding if len(r.times) >= r.output_tokens)
            times.append(end)
            watts.append(step_j / duration)
            energy += step_j
            t = end
        generations = [
            Generation(r.index, r.input_tokens, list(range(r.output_tokens)), r.times, r.arrival)
            for r in sorted(done, key=lambda r: r.index)
        ]
        return SimRun(generations, steps, times, watts, energy, start, t)

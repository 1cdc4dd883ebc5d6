"""What a measurement window is: how long it must last, what it saw, and what it is measured
against.

The runner (:mod:`pytest_llem.harness.runner`) fills these in; the window's record
(:mod:`pytest_llem.harness.window_record`) and its steady state
(:mod:`pytest_llem.harness.steady`) read them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from pytest_llem.backends.base import Generation, MemoryUsage
from pytest_llem.backends.steps import EngineStep
from pytest_llem.config.models import CaseConfig
from pytest_llem.harness.scenarios import ServerLoad
from pytest_llem.meters.base import EnergyReading
from pytest_llem.results.machine_state import WindowMachineState
from pytest_llem.results.models import BaselineRecord

__all__ = [
    "MAX_ROUNDS",
    "QUANTISATION_PERIODS",
    "CaseContext",
    "Clock",
    "Lap",
    "Window",
    "WindowPolicy",
]

Clock = Callable[[], float]

#: A window must span this many counter update periods (5% worst-case quantisation).
QUANTISATION_PERIODS = 20
#: The most rounds of the workload one window may hold.
MAX_ROUNDS = 10_000


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


@dataclass(frozen=True)
class Window:
    """What one measurement window saw, before any metric is computed.

    ``arrivals[i]`` is the scheduled arrival of ``generations[i]`` (None: its issue time).
    ``marks`` holds, per round, the meters read at the workload's named moments; ``machine``
    the host's state between the window's edges (None: not probed). ``started_at`` is the
    window's opening and ``round_starts`` each round's (perf_counter); ``steps`` the engine
    steps of each round where the backend reports them.
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
    machine: WindowMachineState | None = None
    started_at: float | None = None
    round_starts: list[float] = field(default_factory=list)
    steps: list[list[EngineStep]] | None = None


@dataclass(frozen=True)
class Lap:
    """The meters read at a named moment inside a window (``readings`` None: a meter could not
    read mid-window, ``error`` says why)."""

    time: float
    readings: list[EnergyReading] | None
    error: str | None = None


@dataclass(frozen=True)
class CaseContext:
    """What every window of one case is measured against."""

    config: CaseConfig
    non_embedding_parameters: int | None
    policy: WindowPolicy
    baseline: BaselineRecord | None
    assignment: Mapping[str, str] | None
    baseline_problem: str | None = None

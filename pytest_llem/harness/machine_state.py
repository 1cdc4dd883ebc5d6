"""Reading the machine's state at each measurement window's edges, and summarising it per case.

The runner takes a :class:`HostSnapshot` just before the meters start and just after they
stop (outside the measured window, so reading ``/proc`` costs the window nothing);
:meth:`MachineProbe.window` turns the two into a
:class:`~pytest_llem.results.machine_state.WindowMachineState`: other processes' CPU use is all
busy CPU time of ``/proc/stat`` less this pytest process tree's (so short-lived processes that
come and go between the edges count too), with CPU steal, the load average, the CPU frequency
and foreign processes on the measured GPUs. :func:`summarise_machine_state` adds the GPUs'
clocks, power limits and throttle reasons from the windows' device states. The ``/proc`` and
``/sys`` roots are arguments, so tests read a fake tree. Nothing unreadable is 0: it is None,
with the reason.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pytest_llem.harness.isolation import check_isolation, descendants
from pytest_llem.meters.base import EnergyMeter
from pytest_llem.results.drift import DriftMargin, side_disturbances
from pytest_llem.results.machine_state import (
    GpuMachineState,
    MachineStateSummary,
    OtherProcess,
    WindowMachineState,
)
from pytest_llem.results.models import RepetitionRecord

__all__ = [
    "THERMAL_REASONS",
    "HostSnapshot",
    "MachineProbe",
    "gpu_process_counter",
    "summarise_machine_state",
]

#: NVML clock event reasons that the workload does not cause itself: heat and hardware
#: slowdowns (a power cap, idle or an applications-clock setting are the workload's or the
#: settings', and settings are compared through the power limit).
THERMAL_REASONS: frozenset[str] = frozenset(
    {"SwThermalSlowdown", "HwThermalSlowdown", "HwSlowdown", "HwPowerBrakeSlowdown"}
)
#: Other processes shown by name in a window's record.
_TOP_OTHER = 3
#: Below this share of a core a process is not named.
_MIN_NAMED_CORES = 0.05


@dataclass(frozen=True)
class _CpuTimes:
    busy: int
    steal: int
    idle: int
    total: int


@dataclass(frozen=True)
class HostSnapshot:
    """The host's counters at one window edge (ticks are ``/proc`` clock ticks)."""

    time: float
    cpu: _CpuTimes | None
    cpu_count: int | None
    own_ticks: int | None
    processes: dict[int, tuple[str, int, int]] = field(default_factory=dict)
    load_1m: float | None = None
    cpu_freq_mhz: float | None = None
    gpu_foreign: int | None = None
    unavailable: dict[str, str] = field(default_factory=dict)
    other_runnable: int | None = None


def _read_cpu(proc: Path) -> tuple[_CpuTimes, int]:
    """The aggregate CPU line of ``/proc/stat`` and the number of CPUs it lists."""
    lines = (proc / "stat").read_text().splitlines()
    count = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
    head = next(line for line in lines if line.startswith("cpu "))
    # user nice system idle iowait irq softirq steal (guest time is inside user already)
    ticks = [int(v) for v in head.split()[1:9]]
    ticks += [0] * (8 - len(ticks))
    user, nice, system, idle, iowait, irq, softirq, steal = ticks
    return _CpuTimes(user + nice + system + irq + softirq, steal, idle + iowait, sum(ticks)), count


def _read_process(proc: Path, pid: int) -> tuple[int, str, int, int, int, str] | None:
    """``(ppid, name, own ticks, reaped children's ticks, start time, state)`` of one
    process, None if gone."""
    try:
        stat = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    name = stat[stat.find("(") + 1 : stat.rfind(")")]
    fields = stat.rsplit(")", 1)[-1].split()
    try:
        # fields[0] is field 3 of proc(5): ppid is 4, utime..cstime 14..17, starttime 22
        ppid = int(fields[1])
        own = int(fields[11]) + int(fields[12])
        children = int(fields[13]) + int(fields[14])
        started = int(fields[19])
    except (IndexError, ValueError):
        return None
    return ppid, name, own, children, started, fields[0]


def _read_frequency(proc: Path, sys: Path) -> float:
    """Mean current CPU frequency, MHz: cpufreq's ``scaling_cur_freq``, else ``cpuinfo``."""
    cpus = sys / "devices" / "system" / "cpu"
    khz = []
    for path in sorted(cpus.glob("cpu[0-9]*/cpufreq/scaling_cur_freq")):
        try:
            khz.append(float(path.read_text().strip()))
        except (OSError, ValueError):
            continue
    if khz:
        return statistics.fmean(khz) / 1000.0
    mhz = [
        float(line.split(":", 1)[1])
        for line in (proc / "cpuinfo").read_text().splitlines()
        if line.startswith("cpu MHz") and ":" in line
    ]
    if not mhz:
        raise ValueError("neither cpufreq nor /proc/cpuinfo gives a frequency")
    return statistics.fmean(mhz)


def gpu_process_counter(meters: Sequence[EnergyMeter]) -> Callable[[set[int]], int | None]:
    """How many compute processes of other programs run on the measured GPUs (None: no meter
    lists GPU processes), given this run's own process ids."""

    def count(ours: set[int]) -> int | None:
        isolation = check_isolation(meters, mode="warn", ours=ours)
        return None if isolation is None else len(isolation.foreign)

    return count


class MachineProbe:
    """Reads the machine's state at window edges.

    Args:
        proc: The ``/proc`` tree to read (a fake one in tests).
        sys: The ``/sys`` tree (CPU frequency).
        root_pid: The process whose tree is this run's own (default: this process).
        clock: Wall clock between the edges.
        clock_tick: ``/proc`` ticks per second (default: ``SC_CLK_TCK``).
        gpu_processes: Counts foreign processes on the measured GPUs (:func:`gpu_process_counter`).
    """

    def __init__(
        self,
        *,
        proc: Path = Path("/proc"),
        sys: Path = Path("/sys"),
        root_pid: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        clock_tick: int | None = None,
        gpu_processes: Callable[[set[int]], int | None] | None = None,
    ) -> None:
        self.proc = proc
        self.sys = sys
        self.root_pid = os.getpid() if root_pid is None else root_pid
        self.clock = clock
        self.clock_tick = clock_tick or _clock_tick()
        self.gpu_processes = gpu_processes

    def snapshot(self) -> HostSnapshot:
        """The host's counters now."""
        unavailable: dict[str, str] = {}
        now = self.clock()
        cpu: _CpuTimes | None = None
        count: int | None = None
        try:
            cpu, count = _read_cpu(self.proc)
        except (OSError, StopIteration, ValueError) as e:
            unavailable["cpu"] = f"{self.proc / 'stat'} unreadable: {_why(e)}"
        own, processes, ours, runnable = self._processes(unavailable)
        load = self._load(unavailable)
        freq: float | None = None
        try:
            freq = _read_frequency(self.proc, self.sys)
        except (OSError, ValueError) as e:
            unavailable["cpu_freq_mhz"] = f"CPU frequency unreadable: {_why(e)}"
        gpu = self.gpu_processes(ours) if self.gpu_processes is not None else None
        if gpu is None:
            unavailable["gpu_foreign_processes"] = "no meter lists the GPUs' processes"
        return HostSnapshot(now, cpu, count, own, processes, load, freq, gpu, unavailable, runnable)

    def _processes(
        self, unavailable: dict[str, str]
    ) -> tuple[int | None, dict[int, tuple[str, int, int]], set[int], int | None]:
        """This tree's ticks (its reaped children's included), other processes' ticks by pid,
        this tree's pids, and how many other processes are runnable now."""
        try:
            entries = [int(e.name) for e in self.proc.iterdir() if e.name.isdigit()]
        except OSError as e:
            unavailable["own_cpu_cores"] = f"{self.proc} unreadable: {_why(e)}"
            return None, {}, {self.root_pid}, None
        read = {pid: got for pid in entries if (got := _read_process(self.proc, pid)) is not None}
        if self.root_pid not in read:
            unavailable["own_cpu_cores"] = f"process {self.root_pid} not in {self.proc}"
            return None, {}, {self.root_pid}, None
        ours = descendants(self.root_pid, {pid: got[0] for pid, got in read.items()})
        own = sum(read[pid][2] + read[pid][3] for pid in ours)
        others = {pid: (got[1], got[2], got[4]) for pid, got in read.items() if pid not in ours}
        runnable = sum(1 for pid, got in read.items() if pid not in ours and got[5] == "R")
        return own, others, ours, runnable

    def _load(self, unavailable: dict[str, str]) -> float | None:
        try:
            return float((self.proc / "loadavg").read_text().split()[0])
        except (OSError, IndexError, ValueError) as e:
            unavailable["load_1m"] = f"{self.proc / 'loadavg'} unreadable: {_why(e)}"
            return None

    def window(self, start: HostSnapshot, end: HostSnapshot) -> WindowMachineState:
        """What happened on the host between two edges."""
        seconds = max(end.time - start.time, 0.0)
        unavailable = {**start.unavailable, **end.unavailable}
        state = WindowMachineState(
            seconds=seconds,
            cpu_count=end.cpu_count,
            load_1m=end.load_1m,
            cpu_freq_mhz=end.cpu_freq_mhz,
            gpu_foreign_processes=end.gpu_foreign,
        )
        if start.cpu is not None and end.cpu is not None:
            total = end.cpu.total - start.cpu.total
            if total > 0:
                state.steal_fraction = (end.cpu.steal - start.cpu.steal) / total
            if seconds > 0:
                state.idle_cores = (end.cpu.idle - start.cpu.idle) / self.clock_tick / seconds
        if start.other_runnable is not None and end.other_runnable is not None:
            state.other_runnable = (start.other_runnable + end.other_runnable) / 2
        if seconds <= 0:
            unavailable.setdefault("other_cpu_cores", "the window had no wall time")
        elif start.own_ticks is not None and end.own_ticks is not None:
            own_s = (end.own_ticks - start.own_ticks) / self.clock_tick
            state.own_cpu_cores = own_s / seconds
            if start.cpu is not None and end.cpu is not None:
                busy_s = (end.cpu.busy - start.cpu.busy) / self.clock_tick
                # Ticks are counted per CPU and per process apart: a few ticks' disagreement
                # can make the difference slightly negative, which means none.
                other = max(busy_s - own_s, 0.0) / seconds
                count = end.cpu_count or None
                state.other_cpu_cores = min(other, count) if count else other
                state.cpu_resolution_cores = 2 * (count or 1) / self.clock_tick / seconds
            state.top_other = _top_other(start, end, seconds, self.clock_tick)
        else:
            unavailable.setdefault("other_cpu_cores", "this process tree's CPU time unreadable")
        if state.other_cpu_cores is None and "cpu" in unavailable:
            unavailable["other_cpu_cores"] = unavailable["cpu"]
        state.unavailable = unavailable
        return state


def _top_other(
    start: HostSnapshot, end: HostSnapshot, seconds: float, tick: int
) -> list[OtherProcess]:
    used = []
    for pid, (name, ticks, started) in end.processes.items():
        before = start.processes.get(pid)
        # A process born between the edges (its pid new, or reused: another start time) used
        # all its time within them.
        delta = ticks - (before[1] if before is not None and before[2] == started else 0)
        cores = delta / tick / seconds
        if cores >= _MIN_NAMED_CORES:
            used.append(OtherProcess(pid=pid, name=name, cores=round(cores, 3)))
    used.sort(key=lambda p: -p.cores)
    return used[:_TOP_OTHER]


def _clock_tick() -> int:
    try:
        return int(os.sysconf("SC_CLK_TCK"))
    except (AttributeError, ValueError, OSError):
        return 100


def _why(error: BaseException) -> str:
    return str(error) or type(error).__name__


# --- per case --------------------------------------------------------------------------------


def _spread(values: list[float]) -> tuple[float | None, float | None, float | None]:
    if not values:
        return None, None, None
    return statistics.fmean(values), min(values), max(values)


def _gpus(repetitions: Sequence[RepetitionRecord]) -> dict[str, GpuMachineState]:
    clocks: dict[str, list[float]] = {}
    limits: dict[str, list[float]] = {}
    temperatures: dict[str, list[float]] = {}
    throttle: dict[str, list[str]] = {}
    for rep in repetitions:
        for edge, states in rep.device_states.items():
            for label, state in states.items():
                clocks.setdefault(label, [])
                if edge == "end" and state.sm_clock_mhz is not None:
                    clocks[label].append(state.sm_clock_mhz)
                if state.power_limit_w is not None and state.power_limit_w not in limits.get(
                    label, []
                ):
                    limits.setdefault(label, []).append(state.power_limit_w)
                if state.temperature_c is not None:
                    temperatures.setdefault(label, []).append(state.temperature_c)
                hot = [r for r in state.throttle_reasons if r in THERMAL_REASONS]
                throttle.setdefault(label, [])
                throttle[label].extend(r for r in hot if r not in throttle[label])
    return {
        label: GpuMachineState(
            sm_clock_mhz=statistics.median(clocks[label]) if clocks[label] else None,
            power_limits_w=limits.get(label, []),
            max_temperature_c=max(temperatures[label]) if label in temperatures else None,
            thermal_throttle=throttle.get(label, []),
        )
        for label in sorted(clocks)
    }


def summarise_machine_state(
    repetitions: Sequence[RepetitionRecord], *, measured_hot: bool, margin: DriftMargin
) -> MachineStateSummary | None:
    """The machine's state over a case's windows, and whether it changed between them.

    Args:
        repetitions: The case's windows (those without a machine-state record are left out).
        measured_hot: Whether a window started well above idle temperature.
        margin: The drift margin in force (``--llem-drift-margin``).

    Returns:
        The summary; None when no window has a machine-state record.
    """
    states = [rep.machine_state for rep in repetitions if rep.machine_state is not None]
    if not states:
        return None

    def values(name: str) -> list[float]:
        return [float(v) for s in states if (v := getattr(s, name)) is not None]

    _, other_min, other_max = _spread(values("other_cpu_cores"))
    timed = [(s.other_cpu_cores, s.seconds) for s in states if s.other_cpu_cores is not None]
    wall = sum(seconds for _, seconds in timed)
    other_mean = sum(c * t for c, t in timed) / wall if wall > 0 else None
    resolution = max(values("cpu_resolution_cores"), default=None)
    # Each window's figure is off by up to its resolution x its seconds (core-seconds), the
    # windows independently: their combined error over the total wall time.
    errors = [s.cpu_resolution_cores * s.seconds for s in states if s.cpu_resolution_cores]
    mean_resolution = math.sqrt(sum(e * e for e in errors)) / wall if errors and wall else None
    steal_mean, steal_min, steal_max = _spread(values("steal_fraction"))
    load_mean, _, load_max = _spread(values("load_1m"))
    freq_mean, _, _ = _spread(values("cpu_freq_mhz"))
    idle_mean, _, _ = _spread(values("idle_cores"))
    runnable_mean, _, _ = _spread(values("other_runnable"))
    gpu = [s.gpu_foreign_processes for s in states if s.gpu_foreign_processes is not None]
    counts = [s.cpu_count for s in states if s.cpu_count]
    summary = MachineStateSummary(
        windows=len(states),
        cpu_count=max(counts) if counts else None,
        other_cpu_cores_mean=other_mean,
        other_cpu_cores_min=other_min,
        other_cpu_cores_max=other_max,
        cpu_resolution_cores=resolution,
        mean_resolution_cores=mean_resolution,
        steal_fraction_mean=steal_mean,
        steal_fraction_min=steal_min,
        steal_fraction_max=steal_max,
        load_1m_mean=load_mean,
        load_1m_max=load_max,
        cpu_freq_mhz_mean=freq_mean,
        idle_cores_mean=idle_mean,
        other_runnable_mean=runnable_mean,
        gpu_foreign_processes_min=min(gpu) if gpu else None,
        gpu_foreign_processes_max=max(gpu) if gpu else None,
        gpus=_gpus(repetitions),
        measured_hot=measured_hot,
        busy=other_max is not None and other_max > margin.cpu_cores,
        unavailable={
            name: reason
            for s in states
            for name, reason in s.unavailable.items()
            if name not in WindowMachineState.model_fields or not values(name)
        },
    )
    summary.disturbances = side_disturbances(summary, margin)
    summary.disturbed = bool(summary.disturbances)
    return summary

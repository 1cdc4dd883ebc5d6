"""The machine's state around each measurement window, and its summary per case.

What says whether the machine was disturbed while a case was measured: the CPU time other
processes used (outside this pytest process tree), CPU steal, the load average, the CPU
frequency, foreign processes on the measured GPUs, and the GPUs' clocks, power limits and
throttle reasons. :mod:`pytest_llem.harness.machine_state` records these at each window edge;
:mod:`pytest_llem.results.drift` judges two runs' summaries. A figure that could not be read
is None, and ``unavailable`` says why: never 0.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["GpuMachineState", "MachineStateSummary", "OtherProcess", "WindowMachineState"]


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OtherProcess(_Record):
    """A process outside this run's process tree that used CPU during a window."""

    pid: int
    name: str
    cores: float = Field(description="Its CPU time over the window's wall time, cores.")


class WindowMachineState(_Record):
    """The host around one measured window: its two edges (just before the meters start,
    just after they stop) and what happened between them."""

    seconds: float = Field(description="Wall time between the two edges, s.")
    cpu_count: int | None = Field(default=None, description="CPUs in /proc/stat.")
    other_cpu_cores: float | None = Field(
        default=None,
        description="CPU time used by processes outside this pytest process tree over the "
        "edges' wall time, cores (all CPU busy time of /proc/stat less this tree's).",
    )
    cpu_resolution_cores: float | None = Field(
        default=None,
        description="How finely the CPU figures resolve over this window, cores: /proc counts "
        "in clock ticks, so 2 ticks per CPU over the wall time.",
    )
    own_cpu_cores: float | None = Field(
        default=None, description="CPU time of this pytest process tree over the wall time."
    )
    steal_fraction: float | None = Field(
        default=None, description="Share of CPU time the hypervisor gave to other guests."
    )
    idle_cores: float | None = Field(
        default=None, description="Idle (and I/O wait) CPU time over the wall time, cores."
    )
    other_runnable: float | None = Field(
        default=None,
        description="Processes outside this tree that were runnable (state R: running or "
        "waiting for a CPU), mean of the two edges: what they asked for, not what they got.",
    )
    load_1m: float | None = Field(default=None, description="1-minute load average, end edge.")
    cpu_freq_mhz: float | None = Field(
        default=None, description="Mean current frequency over the CPUs, end edge, MHz."
    )
    top_other: list[OtherProcess] = Field(
        default_factory=list, description="The other processes that used the most CPU."
    )
    gpu_foreign_processes: int | None = Field(
        default=None,
        description="Compute processes of other programs on the measured GPUs, end edge "
        "(None: no meter lists GPU processes).",
    )
    unavailable: dict[str, str] = Field(
        default_factory=dict, description="Field name -> why it could not be read."
    )


class GpuMachineState(_Record):
    """One measured GPU over a case's windows (from each window's device states)."""

    sm_clock_mhz: float | None = Field(
        default=None, description="Median SM clock at the windows' end edges, MHz."
    )
    power_limits_w: list[float] = Field(
        default_factory=list, description="Every enforced power limit seen, W."
    )
    max_temperature_c: float | None = None
    thermal_throttle: list[str] = Field(
        default_factory=list,
        description="Clock event reasons outside the workload's own control seen at an edge "
        "(thermal, hardware slowdown, power brake).",
    )


class MachineStateSummary(_Record):
    """The machine's state over one case's windows.

    ``disturbed`` says the state changed between the case's windows beyond the drift margin
    in force when the case ran (``disturbances`` says how); a machine that was steadily busy
    is not disturbed, only ``busy``.
    """

    windows: int = Field(description="Windows with a machine-state record.")
    cpu_count: int | None = None
    other_cpu_cores_mean: float | None = Field(
        default=None, description="Over the windows' total wall time (each window by its length)."
    )
    other_cpu_cores_min: float | None = None
    other_cpu_cores_max: float | None = None
    cpu_resolution_cores: float | None = Field(
        default=None, description="The coarsest window's resolution of the CPU figures, cores."
    )
    mean_resolution_cores: float | None = Field(
        default=None,
        description="How finely the means over all windows resolve, cores (the windows' "
        "clock-tick resolutions combined over their total wall time).",
    )
    steal_fraction_mean: float | None = None
    steal_fraction_min: float | None = None
    steal_fraction_max: float | None = None
    load_1m_mean: float | None = None
    load_1m_max: float | None = None
    cpu_freq_mhz_mean: float | None = None
    idle_cores_mean: float | None = None
    other_runnable_mean: float | None = None
    gpu_foreign_processes_max: int | None = None
    gpu_foreign_processes_min: int | None = None
    gpus: dict[str, GpuMachineState] = Field(
        default_factory=dict, description="Device label -> its state over the windows."
    )
    measured_hot: bool = False
    busy: bool = Field(
        default=False,
        description="Other processes used more CPU than the drift margin (steadily or not).",
    )
    disturbed: bool = False
    disturbances: list[str] = Field(default_factory=list)
    unavailable: dict[str, str] = Field(
        default_factory=dict, description="Field name -> why no window could read it."
    )

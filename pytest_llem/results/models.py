"""Pydantic models of results: a metric summary, a case, and the run record written to disk.

The run record is the only thing reports read. Its JSON Schema (``llem schema``) is generated
from :class:`RunRecord`; bump ``SCHEMA_VERSION`` on any change to the record, and keep the
versions this code still reads in ``SUPPORTED_SCHEMA_VERSIONS``.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pytest_llem.results.adaptive import AdaptiveRecord
from pytest_llem.results.attribution import AttributionRecord, RequestEnergyRecord
from pytest_llem.results.machine_state import MachineStateSummary, WindowMachineState
from pytest_llem.results.manifests import (
    ContainerInfo,
    GpuManifest,
    PartialRecord,
    PythonEnvironment,
    RunManifest,
    ShardManifest,
)
from pytest_llem.results.search import CapacityRecord, SearchRecord

__all__ = [
    "SCHEMA_VERSION",
    "SUPPORTED_SCHEMA_VERSIONS",
    "BaselineDomain",
    "BaselineRecord",
    "CaseError",
    "CaseRecord",
    "CaseResult",
    "ContainerInfo",
    "CooldownRecord",
    "DeviceStateRecord",
    "DistributionSummary",
    "ForeignProcess",
    "GpuInfo",
    "GpuManifest",
    "IsolationRecord",
    "LoadRecord",
    "MachineInfo",
    "MeterRecord",
    "MetricSummary",
    "MetricUnavailableError",
    "PartialRecord",
    "PowerTimelineRecord",
    "ProfileRecord",
    "PromptsRecord",
    "PythonEnvironment",
    "RepetitionRecord",
    "RunManifest",
    "RunRecord",
    "ServerLoadRecord",
    "ShardManifest",
    "UncheckedDevice",
    "unsupported_schema_version",
]

SCHEMA_VERSION = "1.0"
#: Every ``schema_version`` this code reads: the current one and the older ones whose records
#: still validate against :class:`RunRecord` (fields added since then have defaults).
SUPPORTED_SCHEMA_VERSIONS: tuple[str, ...] = ("1.0",)


def unsupported_schema_version(version: object) -> str | None:
    """Why a record (or journal) of ``version`` cannot be read here, or None when it can.

    Args:
        version: The ``schema_version`` found in the document.

    Returns:
        None for a supported version, else one line naming the version and the supported ones.
    """
    if isinstance(version, str) and version in SUPPORTED_SCHEMA_VERSIONS:
        return None
    return (
        f"unsupported schema_version {version!r}; this pytest-llem reads "
        f"{', '.join(SUPPORTED_SCHEMA_VERSIONS)}"
    )


MetricSource = Literal["measured", "estimated", "attributed", "computed"]


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MetricUnavailableError(KeyError):
    """A metric name that this case does not have."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "metric unavailable"


class MetricSummary(_Record):
    """One metric over the measured repetitions: order statistics, spread and the 95% bootstrap
    interval of the median. Values are None when the metric could not be measured (``note``
    says why) and the interval is None when there are fewer than 3 repetitions."""

    n: int = Field(description="Repetitions with a value.")
    median: float | None = None
    mean: float | None = None
    stdev: float | None = Field(default=None, description="Sample standard deviation (n-1).")
    min: float | None = None
    max: float | None = None
    ci95_low: float | None = Field(
        default=None, description="Bootstrap 95% interval of the median, low."
    )
    ci95_high: float | None = Field(
        default=None, description="Bootstrap 95% interval of the median, high."
    )
    unit: str = Field(description="Unit of every value (J, W, tokens/s, ms, ...).")
    source: MetricSource = Field(
        default="measured",
        description="measured (counter or clock), estimated (a model), attributed.",
    )
    note: str | None = Field(default=None, description="Why a value or the interval is missing.")

    @property
    def available(self) -> bool:
        """Whether the metric has a value."""
        return self.median is not None


class DistributionSummary(_Record):
    """Per-request values pooled over all measured repetitions (latencies)."""

    n: int
    mean: float | None = None
    min: float | None = None
    max: float | None = None
    p50: float | None = None
    p90: float | None = None
    p95: float | None = None
    p99: float | None = None
    unit: str = "ms"


class MeterRecord(_Record):
    """A meter as used for a case: what it covers and how finely."""

    name: str
    domains: list[str]
    sources: dict[str, str] = Field(description="Domain -> measured or estimated.")
    update_period_s: float | None = Field(
        default=None, description="The energy counter's update period, s (see its note)."
    )
    update_period_measured: bool = Field(
        default=False, description="True when the period was measured on this machine."
    )
    resolution_note: str | None = None
    energy_quantum_j: float | None = None
    devices: list[str] = Field(default_factory=list)
    selected_because: str | None = None
    used_for: list[str] = Field(
        default_factory=list,
        description="Domains this run takes from this meter (a domain comes from one meter).",
    )
    notes: list[str] = Field(default_factory=list)
    details: dict[str, str] = Field(default_factory=dict)


class ServerLoadRecord(_Record):
    """The load a server-scenario window achieved, next to the one asked for."""

    target_rate_rps: float
    achieved_rate_rps: float | None = Field(
        default=None, description="Requests issued per second, first issue to last."
    )
    mean_concurrency: float | None = Field(
        default=None, description="Time-averaged requests in flight (arrived, not finished)."
    )
    peak_concurrency: int
    concurrency_bound_share: float = Field(
        description="Share of batches cut short by max_concurrency while requests waited."
    )
    saturated: bool
    saturation_reason: str | None = None


class PowerTimelineRecord(_Record):
    """Power of one domain through one window, downsampled to a bounded number of points."""

    domain: str
    meter: str
    times_s: list[float] = Field(description="Seconds since the window opened.")
    watts: list[float] = Field(description="Power at each time (bucket means), W.")
    method: str = Field(description="What was sampled (e.g. NVML_FI_DEV_POWER_INSTANT).")
    period_s: float = Field(description="The sampler's period, s.")
    samples: int = Field(description="Raw samples before downsampling.")


class DeviceStateRecord(_Record):
    """A device's thermal and clock state at a window edge (None: the device cannot say)."""

    temperature_c: float | None = None
    sm_clock_mhz: float | None = None
    memory_clock_mhz: float | None = None
    power_limit_w: float | None = None
    throttle_reasons: list[str] = Field(default_factory=list)


class RepetitionRecord(_Record):
    """One measured window. Energy fields are totals over the window (all ``rounds``);
    ``values`` are per round."""

    index: int
    duration_s: float
    rounds: int = 1
    requests: int
    input_tokens: int
    output_tokens: int
    energy_j: float | None = Field(
        default=None, description="Sum over covered domains; None if none."
    )
    gpu_energy_j: float | None = None
    cpu_energy_j: float | None = None
    dram_energy_j: float | None = None
    energy_sources: dict[str, str] = Field(default_factory=dict)
    energy_notes: list[str] = Field(default_factory=list)
    emissions_kg: float | None = None
    peak_memory_mb: float | None = None
    peak_memory_kind: str = "unavailable"
    server: ServerLoadRecord | None = Field(
        default=None, description="Target and achieved load (server scenario only)."
    )
    values: dict[str, float | None] = Field(
        default_factory=dict, description="Every scalar metric of this window by its name."
    )
    missing: dict[str, str] = Field(
        default_factory=dict,
        description="Metric name -> why this window has no value for it, where the window "
        "knows (the metric catalogue gives the reasons that hold for every window).",
    )
    dynamic_energy_negative: bool = Field(
        default=False,
        description="dynamic_energy_j came out below 0 (reported unclamped: check the baseline).",
    )
    power_timeline: list[PowerTimelineRecord] = Field(default_factory=list)
    counter_vs_power_diff: dict[str, float] = Field(
        default_factory=dict,
        description="Per domain, (counter energy - integrated power samples) / integrated power.",
    )
    device_states: dict[str, dict[str, DeviceStateRecord]] = Field(
        default_factory=dict,
        description="'start' and 'end' of the window: device label -> state.",
    )
    machine_state: WindowMachineState | None = Field(
        default=None, description="The host around the window: other processes' CPU use, ..."
    )
    per_request: list[RequestEnergyRecord] = Field(
        default_factory=list, description="Energy attributed to each measured request."
    )
    unattributed_energy_j: float | None = Field(
        default=None, description="Window energy while no request was in flight (J)."
    )
    attribution: AttributionRecord | None = None


class BaselineDomain(_Record):
    """Idle power of one domain."""

    idle_power_w: float = Field(description="Mean power with the system idle, W.")
    stdev_w: float | None = Field(
        default=None, description="Standard deviation of the sub-window powers, W."
    )
    relative_spread: float | None = Field(
        default=None, description="stdev_w / idle_power_w (None when idle power is 0)."
    )
    seconds: float = Field(description="How long idle power was measured, s.")
    windows: int = Field(description="Sub-windows the spread is computed over.")
    source: str = Field(description="measured or estimated, as the meter's energy.")
    meter: str


class BaselineRecord(_Record):
    """Idle power per domain, measured before the first case (or reused from the cache)."""

    domains: dict[str, BaselineDomain] = Field(default_factory=dict)
    taken_at: datetime
    seconds: float = Field(description="Length of the idle measurement, s.")
    cached: bool = Field(description="Reused from the baseline cache rather than measured now.")
    cache_key: str | None = None
    idle_temperature_c: dict[str, float] = Field(
        default_factory=dict, description="Device label -> temperature at the end of idle, C."
    )
    notes: list[str] = Field(default_factory=list)


class CooldownRecord(_Record):
    """What ``--llem-cooldown`` did before a case."""

    mode: str = Field(description="off, temperature or seconds.")
    waited_s: float = 0.0
    start_temperature_c: float | None = None
    end_temperature_c: float | None = None
    target_temperature_c: float | None = None
    reached: bool = True
    note: str | None = None


class ForeignProcess(_Record):
    """A compute process on a measured GPU that is not this run's."""

    device: str
    pid: int
    memory_mb: float | None = None


class UncheckedDevice(_Record):
    """A measured GPU whose processes could not be listed, so its isolation is unknown."""

    device: str
    reason: str


class IsolationRecord(_Record):
    """Who else ran on the measured GPUs before the case (``--llem-isolation``)."""

    mode: str = Field(
        description="warn, skip or fail: what foreign processes, or GPUs that cannot be "
        "checked, lead to."
    )
    checked: bool = Field(
        description="True only when every measured GPU's processes were listed; False when a "
        "GPU could not be checked (see unchecked) or listing failed (see note)."
    )
    foreign: list[ForeignProcess] = Field(default_factory=list)
    unchecked: list[UncheckedDevice] = Field(
        default_factory=list,
        description="GPUs whose processes could not be listed, each with the reason.",
    )
    note: str | None = None


class PromptsRecord(_Record):
    """Where a case's prompts came from and how they were fitted to ``max_input_tokens``."""

    source: str
    requests: int
    overflow: str = Field(description="truncate or filter: what was done to overlong prompts.")
    truncated: int = 0
    filtered: int = 0
    input_tokens: DistributionSummary = Field(
        description="Prompt lengths in tokens, after truncation, over the prompt set."
    )
    notes: list[str] = Field(default_factory=list)


class LoadRecord(_Record):
    """Whether the case loaded its model or reused one already loaded."""

    reused: bool
    seconds: float


class CaseError(_Record):
    """Why a case failed."""

    type: str
    message: str


class CaseResult(_Record):
    """What ``llem.run()`` returns: the measurements of one case.

    ``result["energy_per_output_token_j"]`` gives a metric's :class:`MetricSummary` by its
    canonical name (``"ttft_ms.p99"`` for a latency percentile).
    """

    params: dict[str, Any] = Field(default_factory=dict, description="Fully resolved config.")
    backend: str = ""
    model: str = ""
    backend_info: dict[str, Any] = Field(default_factory=dict)
    meters: list[MeterRecord] = Field(default_factory=list)
    metrics: dict[str, MetricSummary] = Field(default_factory=dict)
    latency: dict[str, DistributionSummary] = Field(
        default_factory=dict, description="Per-request latencies pooled over repetitions."
    )
    repetitions: list[RepetitionRecord] = Field(default_factory=list)
    load: LoadRecord | None = None
    prompts: PromptsRecord | None = None
    sweep: dict[str, Any] = Field(
        default_factory=dict, description="This case's sweep values by parameter path."
    )
    warmup: int = 0
    notes: list[str] = Field(default_factory=list)
    baseline: BaselineRecord | None = Field(
        default=None, description="The idle baseline dynamic energy was computed against."
    )
    cooldown: CooldownRecord | None = None
    measured_hot: bool = Field(
        default=False,
        description="A window started well above the idle temperature (leakage bias).",
    )
    multi_node: bool = Field(
        default=False,
        description="The engine may use GPUs this process cannot measure (Ray executor, or more "
        "parallel ranks than GPUs it sees, as across nodes): energy covers the measured GPUs "
        "only.",
    )
    isolation: IsolationRecord | None = None
    worker: str | None = Field(default=None, description="The xdist worker that ran the case.")
    visible_devices: str | None = Field(
        default=None, description="CUDA_VISIBLE_DEVICES as the case saw it."
    )
    shared_domains: list[str] = Field(
        default_factory=list,
        description="Domains shared with other xdist workers: not attributable to this case.",
    )
    machine_state: MachineStateSummary | None = Field(
        default=None, description="The machine's state over the windows (None: not recorded)."
    )
    adaptive: AdaptiveRecord | None = Field(
        default=None, description="How many windows repeat=auto took and why it stopped."
    )
    capacity: CapacityRecord | None = Field(
        default=None, description="llem.capacity: the highest rate meeting the SLO, and each rate."
    )
    search: SearchRecord | None = Field(
        default=None, description="llem.search: the best configuration, frontier, evaluated."
    )
    part_of: str | None = Field(
        default=None, description="The case whose search measured this point (None: its own)."
    )

    def __getitem__(self, name: str) -> MetricSummary:
        try:
            return self.metrics[name]
        except KeyError:
            known = ", ".join(sorted(self.metrics)) or "none"
            raise MetricUnavailableError(f"no metric {name!r}; this case has: {known}") from None

    def __contains__(self, name: object) -> bool:
        return name in self.metrics

    def value(self, name: str, statistic: str = "median") -> float | None:
        """A single statistic of a metric, None when unmeasured."""
        got = getattr(self[name], statistic)
        return None if got is None or (isinstance(got, float) and math.isnan(got)) else float(got)


class CaseRecord(CaseResult):
    """One case in the run record: the result plus its pytest identity and outcome."""

    id: str = Field(description="pytest node id (with #N for a second run in one test).")
    name: str
    outcome: Literal["passed", "failed", "skipped", "error"] = "passed"
    error: CaseError | None = None
    machine: MachineInfo | None = Field(
        default=None,
        description="The machine of this case in a merged record (None: the run's machine).",
    )
    calibration_runs: list[list[RepetitionRecord]] = Field(
        default_factory=list,
        description="--llem-calibrate=N: the measured windows of runs 2..N of the case (run 1's "
        "are `repetitions`).",
    )


class GpuInfo(_Record):
    """One GPU visible to NVML."""

    index: int
    name: str
    uuid: str | None = None
    driver: str | None = None
    power_limit_w: float | None = None
    memory_total_mb: float | None = None


class MachineInfo(_Record):
    """The machine a run was measured on."""

    hostname: str
    platform: str
    cpu_model: str | None = None
    cpu_count: int | None = None
    memory_total_gb: float | None = None
    gpus: list[GpuInfo] = Field(default_factory=list)
    gpu_note: str | None = None
    python: str
    libraries: dict[str, str | None] = Field(default_factory=dict)
    git_commit: str | None = None
    git_dirty: bool | None = None


class ProfileRecord(_Record):
    """The workload profile a run used and why (``--llem-profile``; docs/profiles.md)."""

    name: Literal["smoke", "standard", "full"]
    reason: str = Field(
        description="Why this profile: the option or ini key that set it, or what 'auto' saw."
    )


class RunRecord(_Record):
    """One pytest session's benchmark results: the document reports are built from."""

    schema_version: str = SCHEMA_VERSION
    run_id: str
    created_at: datetime
    finished_at: datetime | None = None
    machine: MachineInfo
    options: dict[str, Any] = Field(default_factory=dict)
    machines: list[MachineInfo] = Field(
        default_factory=list, description="Every machine of a merged record (empty otherwise)."
    )
    baseline: BaselineRecord | None = Field(
        default=None, description="The session's idle baseline (None: disabled or no meter)."
    )
    profile: ProfileRecord | None = Field(
        default=None, description="The workload profile of the run (None: an older record)."
    )
    cases: list[CaseRecord] = Field(default_factory=list)
    comparison: dict[str, Any] | None = Field(
        default=None,
        description="When the run was compared with a baseline: the baseline and, per case and "
        "metric, baseline, current, ratio, its interval and the verdict.",
    )
    calibration: dict[str, Any] | None = Field(
        default=None,
        description="--llem-calibrate=N: per case and gated metric the between-run spread, "
        "the A/A false-alarm rate and the regression caught with 80% power; the recommended "
        "--llem-fail-on (see docs/ci.md, Calibrating the gate).",
    )
    manifest: RunManifest | None = Field(
        default=None,
        description="What the run needs to be reproduced (None: a record from before it).",
    )
    shard: ShardManifest | None = Field(
        default=None, description="The shard this run is (--llem-shard=K/N; None: not sharded)."
    )
    shards: list[ShardManifest] = Field(
        default_factory=list, description="The shards a merged record was made of."
    )
    partial: PartialRecord | None = Field(
        default=None, description="A merged record of shards with shards missing (None: whole)."
    )

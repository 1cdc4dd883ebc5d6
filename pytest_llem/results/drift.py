"""Drift is not a regression: whether two runs of a case ran on the same machine conditions.

A comparison's verdict is about the code only when the machine was the same on both sides. This
module judges two cases' :class:`~pytest_llem.results.machine_state.MachineStateSummary` under
a :class:`DriftMargin` (``--llem-drift-margin``, docs/ci.md "Reading a disturbed case"):

- a side is *disturbed* when its machine state changed between its own windows (other
  processes' CPU use or CPU steal varying by more than the margin, foreign GPU processes coming
  and going, a GPU power limit changing, a GPU throttled for heat or by hardware);
- the two sides *differ* when other processes' mean CPU use or steal differ by more than the
  margin, the GPUs' SM clocks by more than the clock margin, their power limits at all, foreign
  GPU processes are on one side only, or one side was measured hot and the other not.

Either makes the case ``disturbed``: :mod:`pytest_llem.results.compare` then reports a breach
as ``inconclusive`` with the evidence. A machine that was equally busy on both sides is only a
warning: a steady load slows both runs alike.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from pytest_llem.results.machine_state import MachineStateSummary

__all__ = [
    "DEFAULT_DRIFT_MARGIN",
    "DISTURBED_PREFIX",
    "MARGIN_HELP",
    "CaseDrift",
    "DriftMargin",
    "DriftMarginError",
    "assess_drift",
    "parse_drift_margin",
    "side_disturbances",
]

#: How the reason of a verdict changed by drift starts.
DISTURBED_PREFIX = "machine disturbed ("


@dataclass(frozen=True)
class DriftMargin:
    """How far two machine states may differ before a case is disturbed.

    Attributes:
        cpu_cores: Other processes' CPU use (and CPU steal), in cores.
        gpu_clock: Relative difference of a GPU's median SM clock (None: not judged).
        enabled: False for ``--llem-drift-margin=off`` (machine state is recorded, not judged).
    """

    cpu_cores: float = 0.5
    gpu_clock: float | None = 0.10
    enabled: bool = True

    @property
    def text(self) -> str:
        """The margin as ``--llem-drift-margin`` writes it."""
        if not self.enabled:
            return "off"
        clock = "off" if self.gpu_clock is None else f"{self.gpu_clock * 100:g}%"
        return f"cpu={self.cpu_cores:g},gpu_clock={clock}"

    def __str__(self) -> str:
        return self.text


DEFAULT_DRIFT_MARGIN = DriftMargin()
#: The option's help (``--llem-drift-margin``, ``llem compare --drift-margin``; argparse text).
MARGIN_HELP = (
    "How far the machine's state may differ between the baseline and this run (or change "
    "between windows) before a breach is inconclusive, not regressed: other processes' CPU use "
    "in cores, GPU SM clock, e.g. 'cpu=0.5,gpu_clock=10%%', or off (default: "
    "cpu=0.5,gpu_clock=10%%)."
)


class DriftMarginError(argparse.ArgumentTypeError, ValueError):
    """A malformed drift margin (argparse reports it as a usage error naming the option)."""


def _number(text: str, what: str, *, percent: bool) -> float:
    raw = text.strip()
    scale = 1.0
    if percent and raw.endswith("%"):
        raw, scale = raw[:-1], 0.01
    try:
        value = float(raw) * scale
    except ValueError:
        raise DriftMarginError(f"{what}: {text.strip()!r} is not a number") from None
    if not value >= 0 or value == float("inf"):
        raise DriftMarginError(f"{what}: {text.strip()!r} must be a finite number >= 0")
    return value


def parse_drift_margin(text: str) -> DriftMargin:
    """Parse ``0.5``, ``cpu=0.5,gpu_clock=10%``, ``gpu_clock=off`` or ``off``.

    A bare number is the CPU margin in cores; keys not given keep their defaults.

    Raises:
        DriftMarginError: One line saying what is wrong (a ``ValueError``).
    """
    value = text.strip()
    if value.lower() in ("off", "none"):
        return DriftMargin(enabled=False)
    if not value:
        raise DriftMarginError("empty drift margin (e.g. 0.5 or cpu=0.5,gpu_clock=10%)")
    if "=" not in value:
        return DriftMargin(cpu_cores=_number(value, "cpu", percent=False))
    cpu, clock = DEFAULT_DRIFT_MARGIN.cpu_cores, DEFAULT_DRIFT_MARGIN.gpu_clock
    for part in value.split(","):
        key, sep, raw = part.partition("=")
        key = key.strip()
        if not sep or key not in ("cpu", "gpu_clock"):
            raise DriftMarginError(f"{part.strip()!r}: expected cpu=CORES or gpu_clock=PERCENT|off")
        if key == "cpu":
            cpu = _number(raw, "cpu", percent=False)
        elif raw.strip().lower() == "off":
            clock = None
        else:
            clock = _number(raw, "gpu_clock", percent=True)
    return DriftMargin(cpu_cores=cpu, gpu_clock=clock)


@dataclass(frozen=True)
class CaseDrift:
    """The machine states of one case's two sides, judged.

    Attributes:
        case_id: The case.
        disturbed: A breach of this case is not attributed to the code.
        evidence: Why it is disturbed, one figure each.
        warnings: Figures worth knowing that do not change a verdict (an equally busy machine).
        note: Why drift could not be judged (a side without a machine-state record).
    """

    case_id: str
    disturbed: bool
    evidence: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    note: str | None = None

    @property
    def reason(self) -> str:
        """``machine disturbed (...)`` with the evidence."""
        return f"{DISTURBED_PREFIX}{'; '.join(self.evidence)})"


def _cores(value: float, count: int | None) -> str:
    return f"{value:.1f} of {count} cores" if count else f"{value:.1f} cores"


def _cpu_disturbances(state: MachineStateSummary, margin: DriftMargin) -> list[str]:
    found = []
    low, high = state.other_cpu_cores_min, state.other_cpu_cores_max
    # A short window resolves CPU time coarsely (clock ticks): only variation beyond both
    # extremes' resolution counts.
    slack = 2 * (state.cpu_resolution_cores or 0.0)
    if low is not None and high is not None and high - low - slack > margin.cpu_cores:
        found.append(
            f"other processes' CPU use varied between windows from {low:.1f} to "
            f"{_cores(high, state.cpu_count)}"
        )
    count = state.cpu_count
    steal_low, steal_high = state.steal_fraction_min, state.steal_fraction_max
    if (
        count
        and steal_low is not None
        and steal_high is not None
        and (steal_high - steal_low) * count > margin.cpu_cores
    ):
        found.append(
            f"CPU steal varied between windows from {steal_low:.0%} to {steal_high:.0%} "
            f"of {count} cores"
        )
    return found


def side_disturbances(state: MachineStateSummary, margin: DriftMargin) -> list[str]:
    """How one side's machine state changed between its own windows (empty: it did not).

    Args:
        state: The case's summary.
        margin: The margin in force.
    """
    if not margin.enabled:
        return []
    found = _cpu_disturbances(state, margin)
    low, high = state.gpu_foreign_processes_min, state.gpu_foreign_processes_max
    if low is not None and high is not None and low != high:
        found.append(f"foreign processes on the measured GPUs came and went ({low} to {high})")
    for label, gpu in sorted(state.gpus.items()):
        if len(gpu.power_limits_w) > 1:
            limits = ", ".join(f"{w:g}" for w in gpu.power_limits_w)
            found.append(f"GPU {label} power limit changed between windows ({limits} W)")
        if gpu.thermal_throttle:
            found.append(f"GPU {label} throttled ({', '.join(gpu.thermal_throttle)})")
    return found


def _differ_cpu(
    base: MachineStateSummary, cur: MachineStateSummary, margin: DriftMargin
) -> list[str]:
    found = []
    count = cur.cpu_count or base.cpu_count
    b, c = base.other_cpu_cores_mean, cur.other_cpu_cores_mean
    slack = (base.mean_resolution_cores or 0.0) + (cur.mean_resolution_cores or 0.0)
    if b is not None and c is not None and abs(c - b) - slack > margin.cpu_cores:
        found.append(
            f"other processes used {_cores(c, count)} during the current run, "
            f"{b:.1f} during the baseline"
        )
    if not found:
        found.extend(_differ_demand(base, cur, margin, count))
    b, c = base.steal_fraction_mean, cur.steal_fraction_mean
    if count and b is not None and c is not None and abs(c - b) * count > margin.cpu_cores:
        found.append(
            f"CPU steal took {_cores(c * count, count)} during the current run, "
            f"{b * count:.1f} during the baseline"
        )
    b_gpu, c_gpu = base.gpu_foreign_processes_max, cur.gpu_foreign_processes_max
    if b_gpu is not None and c_gpu is not None and (b_gpu == 0) != (c_gpu == 0):
        found.append(
            f"{c_gpu} foreign processes on the measured GPUs during the current run, "
            f"{b_gpu} during the baseline"
        )
    return found


def _differ_demand(
    base: MachineStateSummary, cur: MachineStateSummary, margin: DriftMargin, count: int | None
) -> list[str]:
    """On a machine with no idle CPU, what others *used* is capped by what this run took, so
    their demand (runnable processes) tells whether they competed harder."""
    idle = [s.idle_cores_mean for s in (base, cur) if s.idle_cores_mean is not None]
    b, c = base.other_runnable_mean, cur.other_runnable_mean
    if not idle or min(idle) >= margin.cpu_cores or b is None or c is None:
        return []
    if abs(c - b) <= margin.cpu_cores:
        return []
    cores = f" of {count} cores" if count else " cores"
    return [
        f"other processes kept {c:.1f} runnable during the current run, {b:.1f} during the "
        f"baseline, with {min(idle):.1f}{cores} idle"
    ]


def _differ_gpu(
    base: MachineStateSummary, cur: MachineStateSummary, margin: DriftMargin
) -> list[str]:
    found = []
    for label in sorted(set(base.gpus) & set(cur.gpus)):
        old, new = base.gpus[label], cur.gpus[label]
        if old.power_limits_w and new.power_limits_w and old.power_limits_w != new.power_limits_w:
            found.append(
                f"GPU {label} power limit {'/'.join(f'{w:g}' for w in new.power_limits_w)} W in "
                f"the current run, {'/'.join(f'{w:g}' for w in old.power_limits_w)} W in the "
                "baseline"
            )
        b, c = old.sm_clock_mhz, new.sm_clock_mhz
        if (
            margin.gpu_clock is not None
            and b
            and c is not None
            and abs(c - b) / b > margin.gpu_clock
        ):
            found.append(
                f"GPU {label} SM clock {c:.0f} MHz in the current run, {b:.0f} MHz in the "
                f"baseline (margin {margin.gpu_clock:.0%})"
            )
    if base.measured_hot != cur.measured_hot:
        hot, cold = ("current run", "baseline") if cur.measured_hot else ("baseline", "current run")
        found.append(f"the {hot} was measured hot, the {cold} was not")
    return found


def _busy_warning(
    base: MachineStateSummary, cur: MachineStateSummary, margin: DriftMargin
) -> str | None:
    b, c = base.other_cpu_cores_mean, cur.other_cpu_cores_mean
    if b is None or c is None or max(b, c) <= margin.cpu_cores:
        return None
    count = cur.cpu_count or base.cpu_count
    return (
        f"busy machine: other processes used {_cores(c, count)} during the current run and "
        f"{b:.1f} during the baseline (within the {margin.cpu_cores:g}-core margin): the "
        "verdicts stand, a steady load slows both sides alike"
    )


def assess_drift(
    case_id: str,
    base: MachineStateSummary | None,
    cur: MachineStateSummary | None,
    margin: DriftMargin = DEFAULT_DRIFT_MARGIN,
) -> CaseDrift:
    """Judge whether one case's two sides ran under the same machine conditions.

    Args:
        case_id: The case.
        base: The baseline case's machine state (None: not recorded).
        cur: The current case's.
        margin: ``--llem-drift-margin``.

    Returns:
        The case's drift: disturbed with the evidence, or not with any warnings, or not
        judged with a note (drift off, or a side without a record).
    """
    if not margin.enabled:
        return CaseDrift(case_id, False, note="drift not judged (--llem-drift-margin=off)")
    missing = [side for side, state in (("baseline", base), ("current run", cur)) if state is None]
    if base is None or cur is None:
        return CaseDrift(
            case_id,
            False,
            note=f"drift not judged: no machine-state record in the {' and '.join(missing)}",
        )
    evidence = [f"current run: {d}" for d in side_disturbances(cur, margin)]
    evidence.extend(f"baseline: {d}" for d in side_disturbances(base, margin))
    evidence = [*_differ_cpu(base, cur, margin), *_differ_gpu(base, cur, margin), *evidence]
    if evidence:
        return CaseDrift(case_id, True, tuple(evidence))
    warning = _busy_warning(base, cur, margin)
    return CaseDrift(case_id, False, warnings=(warning,) if warning else ())

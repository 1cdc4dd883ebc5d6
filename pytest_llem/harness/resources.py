"""What a case needs of the machine, and whether it has it to itself.

Before a case is measured the case runner (``harness.case``) asks here whether this process
sees the GPUs the engine needs, whether another process runs on a measured GPU
(``--llem-isolation``), and afterwards which of its figures share a domain with other xdist
workers or include GPUs the case does not use. Each answer is a note for the run record, or an
error that makes the case skip or fail.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from pytest_llem.config.models import CaseConfig
from pytest_llem.exceptions import GpuNotIsolatedError, NotEnoughGpusError
from pytest_llem.harness.isolation import check_isolation, unchecked_note
from pytest_llem.meters.base import EnergyMeter
from pytest_llem.results.models import IsolationRecord, MeterRecord, MetricSummary

__all__ = [
    "SPANNING_EXECUTORS",
    "check_case_isolation",
    "check_gpu_count",
    "executor_of",
    "flag_shared",
    "gpus_needed",
    "isolation_notes",
    "multi_node_note",
    "shared_note",
    "unused_gpus_note",
]

logger = logging.getLogger("pytest_llem")


def gpus_needed(case: CaseConfig) -> int:
    """GPUs a case's engine asks for: tensor x pipeline parallel size of its backend's group."""
    group = getattr(case, case.backend, None)
    tensor = int(getattr(group, "tensor_parallel_size", 1) or 1)
    pipeline = int(getattr(group, "pipeline_parallel_size", 1) or 1)
    return tensor * pipeline


#: Engine executors that place parallel ranks beyond this process's GPUs (other nodes).
SPANNING_EXECUTORS = ("ray", "external_launcher")


def executor_of(case: CaseConfig) -> str | None:
    """The engine's own executor setting (``vllm.distributed_executor_backend``), if any."""
    group = getattr(case, case.backend, None)
    executor = getattr(group, "distributed_executor_backend", None)
    return executor if isinstance(executor, str) else None


def check_gpu_count(case: CaseConfig) -> None:
    """Refuse a multi-GPU case on a process that sees fewer GPUs (``--llem-gpus=0-1,2-3``),
    unless the engine's executor places its ranks itself (Ray, an external launcher).

    Raises:
        NotEnoughGpusError: The case needs more GPUs than this process sees (a skip).
    """
    needed = gpus_needed(case)
    if needed <= 1 or case.device == "cpu" or executor_of(case) in SPANNING_EXECUTORS:
        return
    from pytest_llem.meters.inventory import gpu_inventory

    gpus, why = gpu_inventory()
    if len(gpus) < needed:
        seen = f"{len(gpus)} GPU(s)" if gpus else f"no GPU ({why})"
        raise NotEnoughGpusError(
            case.backend,
            "tensor_parallel_size",
            f"the case needs {needed} GPUs (tensor x pipeline parallel) but this process sees "
            f"{seen}; give each xdist worker a group with --llem-gpus=0-1,2-3",
        )


def multi_node_note(case: CaseConfig) -> str | None:
    """Why a case's energy may miss GPUs its engine uses, or None: the engine runs through Ray
    (whose workers may sit on other nodes) or has more parallel ranks than this process sees
    GPUs. The meters measure only this machine's GPUs this process can see."""
    executor = executor_of(case)
    needed = gpus_needed(case)
    seen: int | None = None
    if needed > 1 and case.device != "cpu":
        from pytest_llem.meters.inventory import gpu_inventory

        seen = len(gpu_inventory()[0])
    beyond = seen is not None and needed > seen
    if executor != "ray" and not beyond:
        return None
    why = (
        f"{case.backend}.distributed_executor_backend=ray: the engine's workers may run on "
        "other nodes"
        if executor == "ray"
        else f"the engine runs {needed} parallel ranks (tensor x pipeline) but this process sees "
        f"{seen} GPU(s)"
    )
    return (
        f"multi-node: {why}; energy covers only the GPUs this process measures (other nodes' "
        "GPUs are not measured), so energy figures are a lower bound of the case's own"
    )


def unused_gpus_note(
    case: CaseConfig, device: str, records: Sequence[MeterRecord], assignment: Mapping[str, str]
) -> str | None:
    """A note when the GPU meter measures more GPUs than the case's engine uses: the idle power
    of the others is in its energy (pin with CUDA_VISIBLE_DEVICES or --llem-gpus)."""
    meter = assignment.get("gpu")
    if meter is None or not device.startswith("cuda"):
        return None
    measured = max((len(r.devices) for r in records if r.name == meter), default=0)
    used = gpus_needed(case)
    if measured <= used:
        return None
    return (
        f"{meter} measures all {measured} visible GPUs but the case uses {used}: the others' "
        "power is in gpu_energy_j (dynamic energy subtracts their idle power); set "
        "CUDA_VISIBLE_DEVICES or --llem-gpus to measure only the GPUs in use"
    )


def check_case_isolation(
    meters: Sequence[EnergyMeter], assignment: Mapping[str, str], *, mode: str
) -> IsolationRecord | None:
    """Look for foreign processes on the measured GPUs; raise when told to skip or fail.

    A GPU that could not be checked counts as not isolated: isolation is not established.

    Args:
        meters: The session's meters.
        assignment: Which meter each domain is taken from; without a ``gpu`` domain nothing is
            checked.
        mode: ``--llem-isolation``: ``warn`` logs what stands against isolation, ``skip`` and
            ``fail`` raise.

    Returns:
        What was seen, or None when no GPU is measured or no meter can list its processes.

    Raises:
        GpuNotIsolatedError: Isolation is not established and ``mode`` is not ``warn``.
    """
    if "gpu" not in assignment:
        return None
    isolation = check_isolation(meters, mode=mode)
    problems = isolation_notes(isolation) if isolation is not None else []
    if not problems:
        return isolation
    if mode != "warn":
        raise GpuNotIsolatedError("; ".join(problems), isolation=isolation)
    for problem in problems:
        logger.warning("llem: %s", problem)
    return isolation


def isolation_notes(isolation: IsolationRecord) -> list[str]:
    """What stands against the GPU being this case's alone: foreign processes, unchecked GPUs."""
    notes = [_foreign_note(isolation)] if isolation.foreign else []
    unchecked = unchecked_note(isolation)
    return [*notes, unchecked] if unchecked else notes


def _foreign_note(isolation: IsolationRecord) -> str:
    seen = ", ".join(
        f"pid {p.pid} on {p.device}"
        + (f" ({p.memory_mb:.0f} MiB)" if p.memory_mb is not None else "")
        for p in isolation.foreign
    )
    return f"other processes run on the measured GPU: {seen} (--llem-isolation={isolation.mode})"


def flag_shared(metrics: dict[str, MetricSummary], shared: Sequence[str]) -> list[str]:
    """Note the domains every xdist worker shares, on the case and on their energy figures.

    ``metrics`` is updated in place: each shared domain's energy figure gets the note.
    """
    if not shared:
        return []
    for domain in shared:
        summary = metrics.get(f"{domain}_energy_j")
        if summary is not None:
            metrics[f"{domain}_energy_j"] = summary.model_copy(
                update={"note": shared_note([domain])}
            )
    return [shared_note(shared)]


def shared_note(domains: Sequence[str]) -> str:
    """Why a figure of the ``domains`` every xdist worker shares is not the case's alone."""
    return (
        f"{', '.join(domains)}: shared by every xdist worker on this machine, so the figure "
        "includes the other workers' load; not attributable to this case"
    )

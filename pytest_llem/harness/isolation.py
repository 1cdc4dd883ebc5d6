"""Is the measured GPU ours alone? Other processes' work on it would be counted as ours.

Before a case is measured, the meters that can list compute processes (NVML) are asked who runs
on the measured GPUs; this process and its descendants (engine workers such as vLLM's) are
ours, anything else is foreign. A GPU whose processes cannot be listed is not checked, with the
reason: its isolation is unknown, never assumed. ``--llem-isolation=warn|skip|fail`` decides
what happens, and the run record keeps what was seen.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from pytest_llem.exceptions import EnergyMeterError
from pytest_llem.meters.base import EnergyMeter, ProcessesUnknown
from pytest_llem.meters.capabilities import ListsProcesses
from pytest_llem.results.models import ForeignProcess, IsolationRecord, UncheckedDevice

__all__ = [
    "ISOLATION_MODES",
    "check_isolation",
    "descendants",
    "own_processes",
    "unchecked_note",
]

logger = logging.getLogger("pytest_llem")

#: Values of ``--llem-isolation``.
ISOLATION_MODES: tuple[str, ...] = ("warn", "skip", "fail")


def _parent(pid: int, proc: Path) -> int | None:
    try:
        stat = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces: the ppid follows the last ')'.
    fields = stat.rsplit(")", 1)[-1].split()
    return int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else None


def own_processes(root_pid: int | None = None, *, proc: Path = Path("/proc")) -> set[int]:
    """This process and every descendant (read from ``/proc``; just this pid elsewhere)."""
    root = os.getpid() if root_pid is None else root_pid
    if not proc.is_dir():
        return {root}
    parents: dict[int, int] = {}
    for entry in proc.iterdir():
        if entry.name.isdigit():
            parent = _parent(int(entry.name), proc)
            if parent is not None:
                parents[int(entry.name)] = parent
    return descendants(root, parents)


def descendants(root: int, parents: Mapping[int, int]) -> set[int]:
    """``root`` and every process whose chain of parents (pid -> parent pid) leads to it."""
    ours = {root}
    grew = True
    while grew:
        grew = False
        for pid, parent in parents.items():
            if parent in ours and pid not in ours:
                ours.add(pid)
                grew = True
    return ours


def check_isolation(
    meters: Sequence[EnergyMeter], *, mode: str, ours: set[int] | None = None
) -> IsolationRecord | None:
    """List foreign compute processes on the measured GPUs.

    Args:
        meters: The session's meters; those with ``running_processes()`` are asked.
        mode: ``warn``, ``skip`` or ``fail`` (what the caller will do when some are found).
        ours: Process ids counted as this run's own (default: this process and descendants).

    Returns:
        What was seen (``checked`` is False when a GPU or a meter could not be checked), or None
        when no meter can list GPU processes.
    """
    listers = [m for m in meters if isinstance(m, ListsProcesses)]
    if not listers:
        return None
    ours = own_processes() if ours is None else ours
    foreign: list[ForeignProcess] = []
    unchecked: list[UncheckedDevice] = []
    problems: list[str] = []
    for meter in listers:
        try:
            listed = meter.running_processes()
        except EnergyMeterError as e:
            problems.append(f"{meter.name}: {e}")
            continue
        for device, processes in listed.items():
            if isinstance(processes, ProcessesUnknown):
                unchecked.append(UncheckedDevice(device=device, reason=processes.reason))
                continue
            foreign.extend(
                ForeignProcess(device=device, pid=pid, memory_mb=memory)
                for pid, memory in processes
                if pid not in ours
            )
    return IsolationRecord(
        mode=mode,
        checked=not problems and not unchecked,
        foreign=foreign,
        unchecked=unchecked,
        note="; ".join(problems) or None,
    )


def unchecked_note(isolation: IsolationRecord) -> str | None:
    """Why isolation could not be established on some measured GPU, or None when it was."""
    if isolation.checked:
        return None
    why = [f"{u.device}: {u.reason}" for u in isolation.unchecked]
    if isolation.note:
        why.append(isolation.note)
    return (
        "isolation of the measured GPU could not be checked, so other processes' load may be "
        f"in its energy: {'; '.join(why)} (--llem-isolation={isolation.mode})"
    )

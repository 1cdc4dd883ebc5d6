"""Peak resident memory of processes, from Linux's ``/proc``, for backends on the CPU.

The kernel keeps each process's peak resident set size (``VmHWM`` in ``/proc/PID/status``) and
resets it when ``5`` is written to ``/proc/PID/clear_refs``, so a peak can be read per interval.
Where that is not allowed, :func:`lifetime_peak_rss` gives the peak over the process's life.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pytest_llem.backends.base import MemoryUsage

__all__ = ["MIB", "lifetime_peak_rss", "proc_file", "read_vm_hwm_kib", "reset_peak_rss"]

#: Bytes in a mebibyte: every peak is reported in MiB.
MIB = 1024 * 1024


def proc_file(name: str, pid: int | None = None) -> Path:
    """``/proc/self/NAME``, or ``/proc/PID/NAME`` for another process."""
    return Path("/proc") / ("self" if pid is None else str(pid)) / name


def reset_peak_rss(clear_refs: Path) -> bool:
    """Reset a process's peak-RSS mark through its ``clear_refs`` file.

    Returns:
        Whether the kernel took it (False without ``/proc``, or for another user's process).
    """
    try:
        clear_refs.write_text("5")
    except OSError:
        return False
    return True


def read_vm_hwm_kib(status: Path) -> int | None:
    """The ``VmHWM`` line (KiB) of a process's ``status`` file; None when it cannot be read."""
    try:
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def lifetime_peak_rss() -> MemoryUsage:
    """This process's peak resident set size over its whole life (``getrusage``)."""
    try:
        import resource
    except ImportError:
        return MemoryUsage(peak_mb=None, kind="unavailable", note="no peak-RSS source here")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    peak_mb = peak / MIB if sys.platform == "darwin" else peak / 1024
    return MemoryUsage(peak_mb=peak_mb, kind="process_rss", note="process lifetime peak")

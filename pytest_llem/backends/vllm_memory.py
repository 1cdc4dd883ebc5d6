"""Peak memory of a vLLM engine, wherever vLLM keeps the model.

vLLM runs its engine core and workers in processes of their own (unless
``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so this process's allocator may see none of the model:
on CPU the peaks of the whole process tree are summed, on CUDA NVML reports what vLLM's
processes hold when the allocator here is empty.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Any

from pytest_llem.backends.base import MemoryUsage
from pytest_llem.backends.support import MIB, proc_file, read_vm_hwm_kib, reset_peak_rss

__all__ = ["PeakMemory", "process_tree"]

logger = logging.getLogger("pytest_llem")


class PeakMemory:
    """Peak memory of the engine over an interval, wherever vLLM keeps the model.

    vLLM runs its engine core (and its workers) in processes of their own unless
    ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, so on CPU the peak resident set size of every process
    in this process's tree is read (``VmHWM``, reset through ``clear_refs``) and summed: each
    process's own peak, so the sum bounds their joint peak from above and pages they share count
    once per process. On CUDA the allocator of this process is used when the model lives here;
    otherwise NVML gives the GPU memory vLLM's processes hold, which is their peak since vLLM
    reserves its KV cache up front.
    """

    def __init__(self, *, device: str = "cpu") -> None:
        self.device = device
        self._reset_pids: set[int] = set()

    def describe(self) -> str:
        """What :meth:`peak` measures on this device, for the run record."""
        if self.device == "cuda":
            return (
                "CUDA allocator peak when the engine runs in this process, else the GPU memory "
                "held by vLLM's processes (NVML)"
            )
        return (
            "sum of the peak resident set sizes of this process and the vLLM engine processes "
            "it started (engine core, workers)"
        )

    def reset(self) -> None:
        """Start a new interval (processes that refuse a reset keep their lifetime peak)."""
        if self.device == "cuda":
            torch = _allocator_in_use()
            if torch is not None:
                torch.cuda.reset_peak_memory_stats()
            return
        self._reset_pids = set()
        for pid in process_tree():
            if reset_peak_rss(proc_file("clear_refs", pid)):
                self._reset_pids.add(pid)

    def peak(self) -> MemoryUsage:
        """Peak memory in MiB since :meth:`reset`, with what was measured."""
        if self.device == "cuda":
            return self._cuda_peak()
        peaks = {pid: read_vm_hwm_kib(proc_file("status", pid)) for pid in process_tree()}
        known = {pid: kib for pid, kib in peaks.items() if kib is not None}
        if not known:
            return MemoryUsage(peak_mb=None, kind="unavailable", note="no /proc peak-RSS here")
        note = f"sum over {len(known)} processes: this one and the vLLM engine processes it started"
        lifetime = [pid for pid in known if pid not in self._reset_pids]
        if lifetime:
            note += f"; over the process lifetime for {len(lifetime)} of them"
        return MemoryUsage(peak_mb=sum(known.values()) / 1024, kind="process_rss", note=note)

    def _cuda_peak(self) -> MemoryUsage:
        torch = _allocator_in_use()
        if torch is not None:
            return MemoryUsage(
                peak_mb=torch.cuda.max_memory_allocated() / MIB, kind="cuda_allocated"
            )
        held = _nvml_memory_mib(set(process_tree()))
        if held is None:
            return MemoryUsage(
                peak_mb=None,
                kind="unavailable",
                note="vLLM's model runs in its engine processes and NVML cannot see them",
            )
        return MemoryUsage(
            peak_mb=held,
            kind="device_used",
            note="GPU memory held by vLLM's engine processes at the window's end (NVML); vLLM "
            "reserves its KV cache up front, so this is its peak",
        )


def process_tree() -> list[int]:
    """This process and every process below it (vLLM's engine core and its workers)."""
    pids = [os.getpid()]
    try:
        psutil: Any = importlib.import_module("psutil")
    except ImportError:
        return pids
    try:
        pids.extend(child.pid for child in psutil.Process().children(recursive=True))
    except Exception:  # a child may exit while the tree is walked
        logger.debug("listing child processes failed", exc_info=True)
    return pids


def _allocator_in_use() -> Any:
    """torch, when this process's CUDA allocator holds memory (the engine runs in-process)."""
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available() and torch.cuda.memory_allocated() > 0:
            return torch
    except Exception:
        logger.debug("reading the CUDA allocator failed", exc_info=True)
    return None


def _nvml_memory_mib(pids: set[int]) -> float | None:
    """GPU memory (MiB) that the given processes hold on every visible GPU, by NVML."""
    try:
        pynvml: Any = importlib.import_module("pynvml")
        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        used = 0
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            for process in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                memory = getattr(process, "usedGpuMemory", None)
                if process.pid in pids and memory:
                    used += int(memory)
        return used / MIB
    except Exception:
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            logger.debug("nvmlShutdown failed", exc_info=True)

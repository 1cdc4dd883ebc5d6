"""What machine a run was measured on: CPU, memory, GPUs, Python, library versions and commit.

Collected once per session for the run record. Nothing here fails a run: a fact that cannot be
read is left out (None) rather than guessed.
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from pytest_llem.results.models import GpuInfo, MachineInfo

__all__ = ["LIBRARIES", "collect_machine_info", "git_state", "library_versions", "this_machine"]

#: Distributions whose versions go into the record (None when not installed).
LIBRARIES = (
    "pytest-llem",
    "pytest",
    "pydantic",
    "numpy",
    "torch",
    "transformers",
    "tokenizers",
    "codecarbon",
    "nvidia-ml-py",
    "vllm",
    "tensorrt-llm",
    "zeus",
    "pytest-xdist",
)


def library_versions(names: tuple[str, ...] = LIBRARIES) -> dict[str, str | None]:
    """Installed versions of ``names`` (None for those not installed)."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _memory_total_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 2)
    except (OSError, ValueError, IndexError):
        pass
    return None


def git_state(root: Path) -> tuple[str | None, bool | None]:
    """The commit checked out at ``root`` and whether the tree has changes (None outside git)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
        )
        if commit.returncode != 0:
            return None, None
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None, None
    dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
    return commit.stdout.strip() or None, dirty


def collect_machine_info(
    *, root: Path, gpus: list[GpuInfo], gpu_note: str | None = None
) -> MachineInfo:
    """Describe this machine; ``gpus`` come from NVML (see ``meters.inventory``)."""
    commit, dirty = git_state(root)
    return MachineInfo(
        hostname=socket.gethostname(),
        platform=platform.platform(),
        cpu_model=_cpu_model(),
        cpu_count=os.cpu_count(),
        memory_total_gb=_memory_total_gb(),
        gpus=gpus,
        gpu_note=gpu_note,
        python=sys.version.split()[0],
        libraries=library_versions(),
        git_commit=commit,
        git_dirty=dirty,
    )


def this_machine(root: Path) -> MachineInfo:
    """Describe this machine with the GPUs NVML lists (none, with the reason, where it cannot).

    Args:
        root: The project's root folder, whose git commit the record names.
    """
    from pytest_llem.meters.inventory import gpu_inventory

    gpus, gpu_note = gpu_inventory()
    return collect_machine_info(root=root, gpus=gpus, gpu_note=gpu_note)

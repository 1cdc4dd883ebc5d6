"""Scaling out over pytest-xdist: one worker per GPU (or GPU group), model-load groups kept on
one worker, and what a worker can and cannot attribute to its own cases.

``--llem-gpus=0,1,2,3`` gives xdist worker ``gwN`` the N-th group; ``0-1,2-3`` gives each worker
two GPUs (a tensor-parallel engine on each). The worker's ``CUDA_VISIBLE_DEVICES`` is set in its
``pytest_configure``, before any test imports an engine, so engines and the NVML meter see only
that worker's GPUs. Results travel back to the controller inside the test reports (see
``fixtures``), which writes one run record.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pytest_llem.exceptions import ConfigurationError

__all__ = [
    "SHARED_DOMAINS",
    "WorkerInfo",
    "load_group_name",
    "parse_gpu_groups",
    "pin_worker",
    "pinned_devices",
    "worker_info",
]

#: Domains every worker of one machine shares: under xdist a case's figure includes the others'.
SHARED_DOMAINS: tuple[str, ...] = ("cpu", "dram")


def _named(option: str | None, message: str) -> ConfigurationError:
    return ConfigurationError(f"{option}: {message}" if option else message)


def _span(text: str, option: str | None) -> list[int]:
    first, sep, last = text.partition("-")
    try:
        start = int(first)
        end = int(last) if sep else start
    except ValueError as e:
        raise _named(option, f"{text!r} is not a GPU index or range (e.g. 0,1 or 0-1,2-3)") from e
    if start < 0 or end < start:
        raise _named(option, f"{text!r} is not an increasing range of indices")
    return list(range(start, end + 1))


def parse_gpu_groups(
    text: str | None, *, option: str | None = "--llem-gpus"
) -> tuple[tuple[int, ...], ...] | None:
    """``--llem-gpus``: one group of GPU indices per worker.

    ``0,1,2,3`` is four groups of one; ``0-1,2-3`` two groups of two. Indices are those the
    controller sees (positions in its own ``CUDA_VISIBLE_DEVICES`` when that is set).
    ``option`` is how messages name the setting (the ini key when the value came from there);
    None leaves the name out, for a caller that adds it.

    Raises:
        ConfigurationError: A malformed entry, or a GPU in two groups.
    """
    if text is None or not text.strip():
        return None
    groups = tuple(tuple(_span(part.strip(), option)) for part in text.split(",") if part.strip())
    if not groups:
        raise _named(option, "no GPU given")
    seen: set[int] = set()
    for group in groups:
        twice = seen.intersection(group)
        if twice:
            raise _named(option, f"GPU {min(twice)} is given to two workers")
        seen.update(group)
    return groups


def pinned_devices(group: Sequence[int], parent: str | None) -> str:
    """The ``CUDA_VISIBLE_DEVICES`` value for a worker given ``group``.

    Args:
        group: GPU indices as the controller sees them.
        parent: The controller's ``CUDA_VISIBLE_DEVICES`` (None: every GPU, in NVML order).

    Raises:
        ConfigurationError: An index beyond the GPUs the controller sees.
    """
    if parent is None:
        return ",".join(str(i) for i in group)
    entries = [entry.strip() for entry in parent.split(",") if entry.strip()]
    beyond = [i for i in group if i >= len(entries)]
    if beyond:
        raise ConfigurationError(
            f"--llem-gpus: GPU {beyond[0]} requested but CUDA_VISIBLE_DEVICES={parent!r} "
            f"shows {len(entries)}"
        )
    return ",".join(entries[i] for i in group)


@dataclass(frozen=True)
class WorkerInfo:
    """This process's place in an xdist run (``id`` None: not an xdist worker)."""

    id: str | None = None
    index: int = 0
    count: int = 1


def worker_info(workerinput: Mapping[str, Any] | None) -> WorkerInfo:
    """Read xdist's ``config.workerinput`` (None on the controller or without xdist)."""
    if not workerinput:
        return WorkerInfo()
    worker_id = str(workerinput.get("workerid", "gw0"))
    digits = worker_id.removeprefix("gw")
    index = int(digits) if digits.isdigit() else 0
    return WorkerInfo(worker_id, index, int(workerinput.get("workercount", 1)))


def pin_worker(
    groups: Sequence[Sequence[int]], worker: WorkerInfo, environ: dict[str, str] | None = None
) -> str:
    """Set this process's ``CUDA_VISIBLE_DEVICES`` to its worker's group; returns the value.

    Raises:
        ConfigurationError: More workers than groups.
    """
    env = os.environ if environ is None else environ
    if worker.index >= len(groups):
        raise ConfigurationError(
            f"--llem-gpus gives {len(groups)} GPU group(s) but xdist started worker "
            f"{worker.id} (use -n {len(groups)} or -n auto)"
        )
    value = pinned_devices(groups[worker.index], env.get("CUDA_VISIBLE_DEVICES"))
    env["CUDA_VISIBLE_DEVICES"] = value
    return value


def load_group_name(key: object) -> str:
    """A short, stable xdist group name for a model-load key (same load: same worker)."""
    digest = hashlib.sha256(repr(key).encode()).hexdigest()[:12]
    return f"llem-{digest}"

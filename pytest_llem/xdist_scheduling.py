"""How a session spreads over pytest-xdist workers: each worker pinned to its GPU group, and each
model-load group scheduled onto one worker, so a model is loaded once per run.

The work behind the plugin's xdist hooks lives here; the hooks themselves stay in ``plugin`` as
one-line delegations (xdist calls ``pytest_xdist_auto_num_workers`` before ``pytest_configure``,
so they must be module-level hooks of the plugin). The controller picks ``loadgroup`` scheduling
and names a scratch file; each worker writes the group of every llem case into it; the
controller's scheduler (``load_group_scheduler``, which imports xdist) reads it. Nothing here
imports xdist, so the plugin loads without it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from pytest_llem.collection import mark_load_groups
from pytest_llem.exceptions import ConfigurationError
from pytest_llem.session import LlemSession
from pytest_llem.workers import WorkerInfo, pin_worker, worker_info

__all__ = [
    "GROUPS_FILE",
    "auto_num_workers",
    "configure_node",
    "dist_given",
    "make_scheduler",
    "remove_groups_file",
    "scale_out",
    "share_load_groups",
    "write_groups",
]

logger = logging.getLogger("pytest_llem")

#: The controller's scratch file of ``node id -> load group`` (set only when it chose loadgroup).
GROUPS_FILE = pytest.StashKey[Path]()


def dist_given(config: pytest.Config) -> bool:
    """Whether the command line chose an xdist distribution mode (``--dist``, ``-d``)."""
    args = [str(a) for a in config.invocation_params.args]
    return any(a == "--dist" or a.startswith(("--dist=", "-d")) for a in args)


def scale_out(config: pytest.Config, groups: tuple[tuple[int, ...], ...] | None) -> None:
    """Pin this process to its GPU group, and keep model-load groups on one xdist worker.

    Raises:
        ConfigurationError: more xdist workers than GPU groups, or a group beyond the GPUs the
            controller sees.
    """
    workerinput = getattr(config, "workerinput", None)
    worker = worker_info(workerinput)
    if workerinput and workerinput.get("llem_loadgroup"):
        config.option.loadgroup = True  # a worker parses the command line, not our choice
    workers = getattr(config.option, "numprocesses", None)
    controller = worker.id is None and bool(workers)
    if controller and getattr(config.option, "dist", "no") == "load" and not dist_given(config):
        # Each load group goes to one worker, which loads its model once.
        config.option.dist = "loadgroup"
        folder = Path(tempfile.mkdtemp(prefix="llem-xdist-"))
        config.stash[GROUPS_FILE] = folder / "groups.json"
    if groups is None:
        return
    if controller:
        if isinstance(workers, int) and workers > len(groups):
            raise ConfigurationError(
                f"--llem-gpus gives {len(groups)} GPU group(s) for {workers} xdist workers"
            )
        return
    _pin(groups, worker)


def _pin(groups: tuple[tuple[int, ...], ...], worker: WorkerInfo) -> None:
    if worker.id is None and len(groups) > 1:
        logger.warning("--llem-gpus: without xdist (-n) only the first group is used")
    pinned = pin_worker(groups, worker)
    logger.info("llem: %s pinned to CUDA_VISIBLE_DEVICES=%s", worker.id or "this process", pinned)


def configure_node(node: Any) -> None:
    """Tell an xdist worker whether, and through which file, load groups are scheduled."""
    node.workerinput["llem_loadgroup"] = node.config.option.dist == "loadgroup"
    groups_file = node.config.stash.get(GROUPS_FILE, None)
    if groups_file is not None:
        node.workerinput["llem_groups_file"] = str(groups_file)


def make_scheduler(config: pytest.Config, log: Any) -> Any:
    """The controller's scheduler when pytest-llem chose loadgroup, else None (xdist's own)."""
    groups_file = config.stash.get(GROUPS_FILE, None)
    if groups_file is None:
        return None
    from pytest_llem.load_group_scheduler import ModelGroupScheduling

    return ModelGroupScheduling(config, log, groups_file)


def auto_num_workers(config: pytest.Config) -> int | None:
    """``-n auto`` with ``--llem-gpus``: one worker per GPU group (None: xdist decides)."""
    from pytest_llem.options import OptionValues, option

    try:
        groups = OptionValues.from_config(config).get(option("gpus"))
    except ConfigurationError:
        return None  # reported as a usage error in pytest_configure
    return len(groups) if groups else None


def share_load_groups(
    config: pytest.Config, items: list[pytest.Item], session: LlemSession
) -> None:
    """Under loadgroup scheduling, mark each item with its load group and, on a worker, write
    the groups where the controller's scheduler reads them."""
    # xdist resets a worker's ``dist`` to "no" and keeps the choice in ``loadgroup``.
    if not getattr(config.option, "loadgroup", False):
        return
    groups = mark_load_groups(items, session)
    groups_file = getattr(config, "workerinput", {}).get("llem_groups_file")
    if groups_file:
        write_groups(Path(groups_file), groups)


def write_groups(path: Path, groups: Mapping[str, str]) -> None:
    """Write ``node id -> group`` atomically (every worker writes the same map)."""
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(dict(groups)), encoding="utf-8")
    os.replace(temporary, path)


def remove_groups_file(config: pytest.Config) -> None:
    """Remove the controller's scratch folder of load groups, if it made one."""
    groups_file = config.stash.get(GROUPS_FILE, None)
    if groups_file is not None:
        shutil.rmtree(groups_file.parent, ignore_errors=True)

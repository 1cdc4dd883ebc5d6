"""``--llem-shard=K/N`` at collection: group the llem items by model load, cost the groups,
assign them (``sharding``), deselect what another shard runs, and keep this shard's manifest.

Called from ``plugin.pytest_collection_modifyitems`` on every process that collects (the only
process without xdist, each xdist worker with it); xdist's controller, which collects nothing,
gets the manifest from a worker's ``workeroutput`` (``take_worker_manifest``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from pytest_llem.collection import item_load_key, resolve_for, sweep_case_of
from pytest_llem.config.models import CaseConfig
from pytest_llem.exceptions import LlemError, ResultStoreError
from pytest_llem.results.models import CaseRecord, ShardManifest
from pytest_llem.session import LlemSession
from pytest_llem.sharding import (
    LOAD_ESTIMATE,
    Group,
    ShardSpec,
    assign_groups,
    assignment_digest,
    calibration,
    collection_digest,
    estimate_case_cost,
    shard_of,
)

__all__ = [
    "MAX_HISTORY",
    "WORKER_OUTPUT_KEY",
    "nothing_assigned",
    "shard_items",
    "take_worker_manifest",
]

logger = logging.getLogger("pytest_llem")

#: Where an xdist worker hands its manifest to the controller.
WORKER_OUTPUT_KEY = "llem_shard"
#: Saved runs read at most, newest first, for the cases' past durations.
MAX_HISTORY = 20


def _is_llem(item: pytest.Item) -> bool:
    return "llem" in getattr(item, "fixturenames", ())


def _estimate(item: pytest.Item, session: LlemSession) -> float:
    try:
        case = resolve_for(item, session, {}, sweep_case_of(item))
    except LlemError:
        case = CaseConfig()
    return estimate_case_cost(
        requests=case.traffic.num_requests or case.num_prompts,
        max_new_tokens=case.max_new_tokens,
        repeat=case.planned_repeat,
        warmup=case.warmup,
        duration_s=case.traffic.duration_s,
    )


def _base_id(case_id: str) -> str:
    """A case id without the ``#N`` of a second ``llem.run`` in one test."""
    head, mark, tail = case_id.rpartition("#")
    return head if mark and tail.isdigit() else case_id


def _case_seconds(case: CaseRecord) -> tuple[float, float] | None:
    """A recorded case's windows (warmup included) and model-load seconds, or None."""
    reps = case.repetitions
    if not reps:
        return None
    windows = sum(r.duration_s for r in reps) * (len(reps) + case.warmup) / len(reps)
    load = case.load.seconds if case.load is not None and not case.load.reused else 0.0
    return windows, load


def _history(
    storage: Path, ids: set[str], digest: str, commit: str | None
) -> tuple[dict[str, float], dict[str, float], list[str]]:
    """Past seconds per case (windows) and per case that loaded its model, from the newest
    saved runs of any machine; a shard of this very session (same collection and commit) is
    left out, so shards that finish early do not change what later ones compute."""
    from pytest_llem.results.storage import saved_runs_newest_first
    from pytest_llem.results.store import read_run_record

    windows: dict[str, float] = {}
    loads: dict[str, float] = {}
    used: list[str] = []
    for saved in saved_runs_newest_first(storage)[:MAX_HISTORY]:
        try:
            record = read_run_record(saved.path)
        except (ResultStoreError, OSError):
            continue
        shard = record.shard
        if shard is not None and (shard.collection_digest, shard.commit) == (digest, commit):
            continue
        found: dict[str, tuple[float, float]] = {}
        for case in record.cases:
            case_id, seconds = _base_id(case.id), _case_seconds(case)
            if case_id in ids and case_id not in windows and seconds is not None:
                old = found.get(case_id, (0.0, 0.0))
                found[case_id] = (old[0] + seconds[0], old[1] + seconds[1])
        for case_id, (window, load) in sorted(found.items()):
            windows[case_id] = window
            if load > 0:
                loads[case_id] = load
        if found:
            used.append(f"{saved.machine}/{saved.path.name}")
        if len(windows) == len(ids):
            break
    return windows, loads, used


def _groups(
    llem: Sequence[pytest.Item], session: LlemSession, digest: str, commit: str | None
) -> tuple[list[Group], str]:
    """The load groups with their costs, and what the costs came from."""
    by_key: dict[str, list[str]] = {}
    estimates: dict[str, float] = {}
    for item in llem:
        by_key.setdefault(repr(item_load_key(item, session)), []).append(item.nodeid)
        estimates[item.nodeid] = _estimate(item, session)
    storage = session.options.store.storage if session.options.store is not None else None
    windows: dict[str, float] = {}
    loads: dict[str, float] = {}
    used: list[str] = []
    if storage is not None:
        windows, loads, used = _history(storage, set(estimates), digest, commit)
    factor = calibration(estimates, windows)
    groups = []
    for key, ids in sorted(by_key.items()):
        cost = sum(windows.get(case, estimates[case] * factor) for case in ids)
        measured_loads = [loads[case] for case in ids if case in loads]
        cost += max(measured_loads) if measured_loads else LOAD_ESTIMATE * factor
        groups.append(Group(key, tuple(sorted(ids)), cost))
    return groups, ", ".join(used) if used else "estimate"


def shard_items(config: pytest.Config, items: list[pytest.Item], session: LlemSession) -> None:
    """Keep only this shard's items (the others are deselected, as pytest's ``-k`` does) and
    keep the shard's manifest in the session (and, on an xdist worker, its output).

    llem cases go by whole model-load group, balanced by cost; other tests are dealt out in
    turn by sorted node id.
    """
    spec: ShardSpec | None = session.options.shard
    if spec is None:
        return
    from pytest_llem.machine import this_machine
    from pytest_llem.results.storage import machine_id

    machine = this_machine(config.rootpath)
    llem = [item for item in items if _is_llem(item)]
    digest = collection_digest(item.nodeid for item in llem)
    groups, costs = _groups(llem, session, digest, machine.git_commit)
    shards = assign_groups(groups, spec.count)
    owner = shard_of(shards)
    others = sorted(item.nodeid for item in items if not _is_llem(item))
    owner.update({nodeid: i % spec.count + 1 for i, nodeid in enumerate(others)})
    keep = [item for item in items if owner[item.nodeid] == spec.index]
    dropped = [item for item in items if owner[item.nodeid] != spec.index]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
    mine = shards[spec.index - 1]
    session.shard = ShardManifest(
        index=spec.index,
        count=spec.count,
        assignment_digest=assignment_digest(shards),
        collection_digest=digest,
        collection_size=len(llem),
        ids=sorted(case for group in mine for case in group.ids),
        groups=len(mine),
        commit=machine.git_commit,
        machine=machine_id(machine),
        costs=costs,
    )
    output = getattr(config, "workeroutput", None)
    if output is not None:
        output[WORKER_OUTPUT_KEY] = session.shard.model_dump_json()


def take_worker_manifest(node: Any, session: LlemSession | None) -> None:
    """On xdist's controller: the shard manifest a finished worker computed (every worker
    computes the same one; the first to finish is kept)."""
    if session is None or session.shard is not None:
        return
    text = getattr(node, "workeroutput", {}).get(WORKER_OUTPUT_KEY)
    if text:
        session.shard = ShardManifest.model_validate_json(text)


def nothing_assigned(manifest: ShardManifest | None) -> bool:
    """Whether this is a shard of a session with llem cases that got none of them (more shards
    than model-load groups): an empty share of the work, which is not a failure, unlike an
    empty selection."""
    return manifest is not None and manifest.collection_size > 0 and not manifest.ids

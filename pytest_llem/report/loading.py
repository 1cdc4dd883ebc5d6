"""Reading run records for analysis and merging records from several machines into one.

``load_run(path)`` gives a :class:`Run`: the run record with ``to_dataframe()``, the same table
as ``llem export --csv`` (pandas is an optional extra). ``merge_runs`` combines the records of a
fleet of CI runners into one record whose cases each keep their machine, so one report covers
them all.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_llem.exceptions import ResultStoreError
from pytest_llem.report.tables import case_machine, case_rows, table_columns
from pytest_llem.results.models import CaseRecord, MachineInfo, RunRecord
from pytest_llem.results.shards import check_shards
from pytest_llem.results.store import read_run_record

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["PANDAS_HINT", "Run", "load_run", "merge_runs"]

PANDAS_HINT = "pip install 'pytest-llem[pandas]'"


class Run(RunRecord):
    """A run record loaded for analysis: every field of :class:`RunRecord`, and a DataFrame."""

    @classmethod
    def from_record(cls, record: RunRecord) -> Run:
        """The same record as a :class:`Run` (validated again, so it is a copy)."""
        return cls.model_validate(record.model_dump())

    def to_dataframe(self) -> pd.DataFrame:
        """One row per case with the columns of ``llem export --csv``.

        Raises:
            ImportError: pandas is not installed (``pip install 'pytest-llem[pandas]'``).
        """
        try:
            import pandas as pd
        except ImportError as e:
            raise ImportError(
                f"Run.to_dataframe() needs pandas, which is not installed: {PANDAS_HINT}"
            ) from e
        return pd.DataFrame(case_rows(self), columns=table_columns(self))


def load_run(path: str | os.PathLike[str]) -> Run:
    """Read a run record (``llem-report.json`` or a merged one) for analysis.

    Args:
        path: The record's file.

    Returns:
        The record as a :class:`Run`.

    Raises:
        ResultStoreError: the file is missing, not JSON, or not a run record.
    """
    return Run.from_record(read_run_record(Path(path)))


def _machine_labels(records: Sequence[RunRecord]) -> list[str]:
    """A label per record for ids that collide: its hostname, numbered when hosts repeat."""
    hosts = [record.machine.hostname for record in records]
    labels = []
    for i, host in enumerate(hosts):
        if hosts.count(host) > 1:
            labels.append(f"{host}#{hosts[: i + 1].count(host)}")
        else:
            labels.append(host)
    return labels


def _merged_id(records: Sequence[RunRecord]) -> str:
    digest = hashlib.sha256("\n".join(r.run_id for r in records).encode()).hexdigest()
    return f"merged-{digest[:24]}"


def _unique_machines(machines: Sequence[MachineInfo]) -> list[MachineInfo]:
    unique: list[MachineInfo] = []
    for machine in machines:
        if machine not in unique:
            unique.append(machine)
    return unique


def _source(record: RunRecord) -> dict[str, Any]:
    """What a merged record keeps of one source run under ``options["merged"]``."""
    return {
        "run_id": record.run_id,
        "machine": record.machine.hostname,
        "created_at": record.created_at.isoformat(),
        "finished_at": record.finished_at.isoformat() if record.finished_at else None,
        "options": record.options,
        "manifest": record.manifest.model_dump(mode="json") if record.manifest else None,
    }


def _merged_cases(records: Sequence[RunRecord]) -> list[CaseRecord]:
    """Every case with its machine; an id that several records hold gets ``@machine``."""
    owners: dict[str, int] = {}
    for record in records:
        for case_id in {case.id for case in record.cases}:
            owners[case_id] = owners.get(case_id, 0) + 1
    cases: list[CaseRecord] = []
    for record, label in zip(records, _machine_labels(records), strict=True):
        for case in record.cases:
            update: dict[str, Any] = {"machine": case_machine(record, case)}
            if owners[case.id] > 1:
                update |= {"id": f"{case.id}@{label}", "name": f"{case.name}@{label}"}
            cases.append(case.model_copy(update=update, deep=True))
    return cases


def merge_runs(
    records: Sequence[RunRecord],
    *,
    labels: Sequence[str] | None = None,
    allow_partial: bool = False,
) -> Run:
    """Merge the run records of several machines (or several runs) into one.

    Shards of one session (``--llem-shard``) are checked first (``results.shards``): every
    shard once, one collection and commit, no case twice; the merged record lists them in
    ``shards`` and, with ``allow_partial``, says what is missing in ``partial``.

    Every case keeps the machine it ran on (``CaseRecord.machine``); the merged record lists
    every machine in ``machines`` and, under ``options["merged"]``, each source run's id,
    machine, times, options and reproducibility manifest (the merged record's ``manifest`` is
    the sources' when they all have the same, else None). A case id (and name) that more than one record holds gets its
    machine appended, ``test_x[bs8]@node1``, numbered when the same host appears twice
    (``@node1#2``). Merging is deterministic: the merged run id derives from the sources' ids.

    Args:
        records: The records, in the order their cases should appear; merged records are fine.
        labels: How error messages name each record (default: its run id).
        allow_partial: Merge shards of a session with shards missing, marked partial.

    Returns:
        The merged record; its ``machine`` is the first record's.

    Raises:
        ResultStoreError: no records, records of different schema versions, or shards that
            do not make one whole session (``shard 2/3 missing``).
    """
    if not records:
        raise ResultStoreError("nothing to merge: no run records given")
    versions = sorted({record.schema_version for record in records})
    if len(versions) > 1:
        raise ResultStoreError(
            f"cannot merge run records of different schema versions: {', '.join(versions)}"
        )
    names = list(labels) if labels is not None else [r.run_id for r in records]
    checked = check_shards(records, names, allow_partial=allow_partial)
    cases = _merged_cases(records)
    machines = [m for record in records for m in record.machines or [record.machine]]
    finished = [r.finished_at for r in records if r.finished_at is not None]
    merged = RunRecord(
        run_id=_merged_id(records),
        created_at=min(r.created_at for r in records),
        finished_at=max(finished) if len(finished) == len(records) else None,
        machine=records[0].machine,
        machines=_unique_machines([*machines, *(c.machine for c in cases if c.machine)]),
        options={"merged": [_source(record) for record in records]},
        cases=cases,
        # One manifest stands for the merged run only where every source had the same.
        manifest=records[0].manifest
        if all(record.manifest == records[0].manifest for record in records)
        else None,
        shards=checked.shards if checked else [s for r in records for s in r.shards],
        partial=checked.partial
        if checked
        else next((r.partial for r in records if r.partial), None),
    )
    return Run.from_record(merged)

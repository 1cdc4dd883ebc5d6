"""The per-case journal: every finished case appended to a JSON-lines file, flushed and synced
before the next case starts, so a run killed outright still leaves what it measured.

The first line describes the run (id, start, options); each further line is one case record.
``read_journal`` turns a journal back into a run record, skipping a damaged line (the last one,
typically, when the process died while writing it) with a warning.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from pydantic import ValidationError

from pytest_llem.exceptions import ResultStoreError
from pytest_llem.results.models import (
    SCHEMA_VERSION,
    CaseRecord,
    MachineInfo,
    ProfileRecord,
    RunRecord,
    unsupported_schema_version,
)

__all__ = ["Journal", "JournalContents", "journal_path", "read_journal"]


def journal_path(report_dir: Path, created_at: datetime, run_id: str) -> Path:
    """Where a run's journal goes: beside the run's timestamped record copy."""
    stamp = created_at.strftime("%Y%m%dT%H%M%SZ")
    return report_dir / "runs" / f"llem-journal-{stamp}-{run_id[:8]}.jsonl"


class Journal:
    """Appends case records to a journal file, durably, one line each."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle: IO[str] | None = None

    def _write(self, entry: dict[str, Any]) -> None:
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = self.path.open("a", encoding="utf-8")
        self._handle.write(json.dumps(entry, separators=(",", ":")) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def start(
        self,
        *,
        run_id: str,
        created_at: datetime,
        options: dict[str, Any],
        profile: ProfileRecord | None = None,
    ) -> None:
        """Write the run's header line (with the workload profile, when there is one)."""
        header: dict[str, Any] = {
            "type": "run",
            "schema_version": SCHEMA_VERSION,
            "run_id": run_id,
            "created_at": created_at.isoformat(),
            "options": options,
        }
        if profile is not None:
            header["profile"] = profile.model_dump(mode="json")
        self._write(header)

    def append(self, case: CaseRecord) -> None:
        """Write one finished case."""
        self._write({"type": "case", "case": case.model_dump(mode="json")})

    def close(self) -> None:
        """Close the file (every line is already on disk)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None


@dataclass
class JournalContents:
    """What a journal held: the rebuilt record and the lines that could not be read."""

    record: RunRecord
    warnings: list[str] = field(default_factory=list)


def _header_fields(header: dict[str, Any], path: Path) -> tuple[str, datetime, dict[str, Any]]:
    """The run id, start time and options of a journal's header line.

    A header without ``schema_version`` was written before journals carried one: its cases are
    records of schema 1.0.
    """
    problem = unsupported_schema_version(header.get("schema_version", "1.0"))
    if problem is not None:
        raise ResultStoreError(f"{path}: {problem}")
    run_id, created_at, options = (
        header.get("run_id"),
        header.get("created_at"),
        header.get("options"),
    )
    if not isinstance(run_id, str) or not run_id:
        raise ResultStoreError(f"{path}: the run header line has no run_id")
    try:
        started = datetime.fromisoformat(str(created_at))
    except ValueError as e:
        raise ResultStoreError(
            f"{path}: the run header line's created_at is not a time: {created_at!r}"
        ) from e
    if options is not None and not isinstance(options, dict):
        raise ResultStoreError(f"{path}: the run header line's options are not an object")
    return run_id, started, dict(options or {})


def _entries(path: Path) -> list[tuple[int, str | None]]:
    """The journal's non-empty lines, numbered; None for a line that is not UTF-8 (a crash
    mid-write can leave any bytes), so one bad line does not hide the others."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ResultStoreError(f"cannot read journal {path}: {e}") from e
    entries: list[tuple[int, str | None]] = []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entries.append((number, line.decode("utf-8")))
        except UnicodeDecodeError:
            entries.append((number, None))
    return entries


def read_journal(path: Path, *, machine: MachineInfo) -> JournalContents:
    """Rebuild a run record from a journal; ``machine`` describes where it is rebuilt when the
    journal does not say (a journal records cases, not the machine).

    Raises:
        ResultStoreError: the file is missing, holds no readable run header, or its header is
            of an unsupported schema version.
    """
    header: dict[str, Any] | None = None
    cases: list[CaseRecord] = []
    warnings: list[str] = []
    for number, line in _entries(path):
        try:
            if line is None:
                raise ValueError("not UTF-8")
            entry = json.loads(line)
            if entry.get("type") == "run" and header is None:
                header = entry
            elif entry.get("type") == "case":
                cases.append(CaseRecord.model_validate(entry["case"]))
            else:
                raise ValueError(f"unexpected entry type {entry.get('type')!r}")
        except (ValueError, KeyError, AttributeError, ValidationError) as e:
            warnings.append(f"{path}:{number}: damaged journal line skipped ({type(e).__name__})")
    if header is None:
        raise ResultStoreError(f"{path} has no run header line: not a pytest-llem journal")
    run_id, created_at, options = _header_fields(header, path)
    record = RunRecord(
        run_id=run_id,
        created_at=created_at,
        machine=machine,
        options={**options, "rebuilt_from_journal": str(path)},
        profile=_profile(header, path, warnings),
        cases=cases,
    )
    return JournalContents(record, warnings)


def _profile(header: dict[str, Any], path: Path, warnings: list[str]) -> ProfileRecord | None:
    """The header's workload profile (None: a journal written before it was kept)."""
    raw = header.get("profile")
    if raw is None:
        return None
    try:
        return ProfileRecord.model_validate(raw)
    except ValidationError:
        warnings.append(f"{path}: the run header line's profile is not readable; left out")
        return None

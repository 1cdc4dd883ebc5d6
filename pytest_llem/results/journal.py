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
from pytest_llem.results.models import CaseRecord, MachineInfo, RunRecord

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

    def start(self, *, run_id: str, created_at: datetime, options: dict[str, Any]) -> None:
        """Write the run's header line."""
        self._write(
            {
                "type": "run",
                "run_id": run_id,
                "created_at": created_at.isoformat(),
                "options": options,
            }
        )

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


def read_journal(path: Path, *, machine: MachineInfo) -> JournalContents:
    """Rebuild a run record from a journal; ``machine`` describes where it is rebuilt when the
    journal does not say (a journal records cases, not the machine).

    Raises:
        ResultStoreError: the file is missing, or holds no readable run header.
    """
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ResultStoreError(f"cannot read journal {path}: {e}") from e
    header: dict[str, Any] | None = None
    cases: list[CaseRecord] = []
    warnings: list[str] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
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
    record = RunRecord(
        run_id=str(header["run_id"]),
        created_at=datetime.fromisoformat(str(header["created_at"])),
        machine=machine,
        options={**dict(header.get("options") or {}), "rebuilt_from_journal": str(path)},
        cases=cases,
    )
    return JournalContents(record, warnings)

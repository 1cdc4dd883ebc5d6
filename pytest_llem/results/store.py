"""Writing and reading run records: one JSON document per run, written atomically.

``<report-dir>/llem-report.json`` always holds the latest run; a copy named after its time and
run id is kept under ``<report-dir>/runs/`` so earlier runs are never overwritten.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from pytest_llem.exceptions import ResultStoreError
from pytest_llem.results.models import RunRecord

__all__ = [
    "REPORT_FILENAME",
    "RUNS_DIRNAME",
    "atomic_write_text",
    "read_run_record",
    "run_record_schema",
    "write_run_record",
]

REPORT_FILENAME = "llem-report.json"
RUNS_DIRNAME = "runs"


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename, so a
    reader never sees half a file and a crash never destroys the previous one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_run_record(record: RunRecord, report_dir: Path) -> tuple[Path, Path]:
    """Write ``record`` as the latest report and as a timestamped copy.

    Returns:
        The latest report's path and the copy's path.

    Raises:
        ResultStoreError: the folder or a file could not be written.
    """
    text = record.model_dump_json(indent=2) + "\n"
    stamp = record.created_at.strftime("%Y%m%dT%H%M%SZ")
    latest = report_dir / REPORT_FILENAME
    copy = report_dir / RUNS_DIRNAME / f"llem-report-{stamp}-{record.run_id[:8]}.json"
    try:
        atomic_write_text(copy, text)
        atomic_write_text(latest, text)
    except OSError as e:
        raise ResultStoreError(f"cannot write the run record under {report_dir}: {e}") from e
    return latest, copy


def read_run_record(path: Path) -> RunRecord:
    """Read and validate a run record.

    Raises:
        ResultStoreError: the file is missing, not JSON, or not a run record.
    """
    try:
        data: Any = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ResultStoreError(f"cannot read run record {path}: {e}") from e
    try:
        return RunRecord.model_validate(data)
    except ValidationError as e:
        raise ResultStoreError(f"{path} is not a valid run record: {e}") from e


def run_record_schema() -> dict[str, Any]:
    """The JSON Schema of the run record, generated from the model."""
    schema = RunRecord.model_json_schema(mode="serialization")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "pytest-llem run record"
    return schema

"""Writing and reading run records: one JSON document per run, written atomically.

``<report-dir>/llem-report.json`` always holds the latest run; a copy named after its time and
run id is kept under ``<report-dir>/runs/`` so earlier runs are never overwritten. Every file
pytest-llem writes goes through :func:`atomic_write_text` or :func:`create_text_exclusively`,
which give it the permissions an ordinary ``open()`` would (``0o666`` less the umask).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from pytest_llem.exceptions import ResultStoreError
from pytest_llem.results.catalogue import CATALOGUE
from pytest_llem.results.models import RunRecord, unsupported_schema_version

__all__ = [
    "REPORT_FILENAME",
    "RUNS_DIRNAME",
    "atomic_write_text",
    "check_writable",
    "create_text_exclusively",
    "read_run_record",
    "refuse_overwriting",
    "run_record_schema",
    "same_file",
    "write_run_record",
]

REPORT_FILENAME = "llem-report.json"
RUNS_DIRNAME = "runs"


def _temporary_beside(path: Path, text: str) -> Path:
    """Write ``text`` to a new temporary file in ``path``'s folder, synced to disk.

    The file is created by ``os.open`` with mode ``0o666`` so the kernel applies the umask, as
    for any ordinary file; ``mkstemp`` would make it ``0o600`` and the renamed report
    unreadable to, say, a CI job's web server.
    """
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp
    raise FileExistsError(errno.EEXIST, "no free temporary file name", str(path.parent))


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename, so a
    reader never sees half a file and a crash never destroys the previous one.

    Raises:
        OSError: the folder or the file could not be written (``path`` is a folder, say).
    """
    tmp = _temporary_beside(path, text)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def create_text_exclusively(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` only if no such file exists, atomically, as
    :func:`atomic_write_text` does; two writers racing for one name never overwrite each other.

    Raises:
        FileExistsError: ``path`` exists (nothing was written).
        OSError: the folder or the file could not be written.
    """
    tmp = _temporary_beside(path, text)
    try:
        try:
            os.link(tmp, path)  # fails if the name is taken: an exclusive, atomic publish
        except FileExistsError:
            raise
        except OSError:
            # A file system without hard links: claim the name, then fill it by a rename.
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def check_writable(folder: Path) -> None:
    """Check that files can be created in ``folder`` by creating and removing one.

    Missing folders are created for the check and removed again, so a run that writes nothing
    leaves nothing behind. ``os.access`` alone is not enough: it says yes to root whatever the
    mode bits, and knows nothing of read-only mounts.

    Raises:
        ResultStoreError: the folder (or a missing parent) cannot be created, or a file in it
            cannot be.
    """
    if folder.exists() and not folder.is_dir():
        raise ResultStoreError(f"cannot write in {folder}: it is a file, not a folder")
    created: list[Path] = []
    missing = folder
    while not missing.exists() and missing.parent != missing:
        created.append(missing)
        missing = missing.parent
    probe = folder / f".llem-write-check-{secrets.token_hex(6)}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        probe.unlink()
    except OSError as e:
        raise ResultStoreError(f"cannot write in {folder}: {e.strerror or e}") from e
    finally:
        for path in created:  # deepest first
            with contextlib.suppress(OSError):
                path.rmdir()


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

    A record of an older ``schema_version`` that this code still supports loads as it is; any
    other version is refused before validation, so the message names the version rather than
    the fields it does not know.

    Raises:
        ResultStoreError: the file is missing, not UTF-8 JSON, of an unsupported schema
            version, or not a run record.
    """
    try:
        data: Any = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ResultStoreError(f"cannot read run record {path}: {e}") from e
    if isinstance(data, dict) and "schema_version" in data:
        problem = unsupported_schema_version(data["schema_version"])
        if problem is not None:
            raise ResultStoreError(f"{path}: {problem}")
    try:
        return RunRecord.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in item['loc']) or 'record'}: {item['msg']}"
            for item in e.errors(include_url=False)[:3]
        )
        more = f" (and {e.error_count() - 3} more)" if e.error_count() > 3 else ""
        raise ResultStoreError(f"{path} is not a valid run record: {problems}{more}") from e


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: the same file on disk, or the same resolved path for a
    file not written yet."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist yet
        return a.resolve() == b.resolve()


def refuse_overwriting(output: Path, inputs: Iterable[Path], *, what: str = "output") -> None:
    """Refuse to write ``output`` where it would replace one of ``inputs``.

    Args:
        output: The file about to be written.
        inputs: The files the output is made from.
        what: How messages name the output (``--csv``, ``the merged record``).

    Raises:
        ResultStoreError: ``output`` is one of ``inputs`` (by path or by link).
    """
    for source in inputs:
        if same_file(Path(output), Path(source)):
            raise ResultStoreError(
                f"{what} {output} is the input {source}: refusing to overwrite it; "
                "give another output path"
            )


def run_record_schema() -> dict[str, Any]:
    """The JSON Schema of the run record, generated from the model.

    ``x-llem-metrics`` (an annotation, not a constraint) gives every metric name a case's
    ``metrics`` and a repetition's ``values`` can hold, from the metric catalogue: unit, which
    way is better, kind, whether a gate may name it and whether it needs the idle baseline.
    """
    schema = RunRecord.model_json_schema(mode="serialization")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "pytest-llem run record"
    schema["x-llem-metrics"] = {
        name: {
            "unit": m.unit,
            "better": m.better,
            "kind": m.kind,
            "gated": m.gated,
            "needs_baseline": m.needs_baseline,
            "description": m.description,
        }
        for name, m in CATALOGUE.items()
    }
    return schema

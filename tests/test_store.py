"""Writing and reading run records."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest

from pytest_llem.exceptions import ResultStoreError
from pytest_llem.report.terminal import summary_lines
from pytest_llem.results import models
from pytest_llem.results.models import (
    SCHEMA_VERSION,
    SUPPORTED_SCHEMA_VERSIONS,
    CaseError,
    CaseRecord,
    MachineInfo,
    MeterRecord,
    MetricSummary,
    RunRecord,
)
from pytest_llem.results.store import (
    atomic_write_text,
    check_writable,
    create_text_exclusively,
    read_run_record,
    refuse_overwriting,
    write_run_record,
)


def _record(run_id: str = "0123456789abcdef") -> RunRecord:
    meter = MeterRecord(name="nvml", domains=["gpu"], sources={"gpu": "measured"})
    passed = CaseRecord(
        id="t.py::test_a[4]",
        name="test_a[4]",
        backend="transformers",
        meters=[meter],
        metrics={
            "energy_per_output_token_j": MetricSummary(n=3, median=0.25, unit="J/token"),
            "output_tokens_per_s": MetricSummary(n=3, median=1234.5, unit="tokens/s"),
            "ttft_ms.p50": MetricSummary(n=3, median=12.345, unit="ms"),
            "tpot_ms.p50": MetricSummary(n=3, median=None, unit="ms", note="one token"),
        },
    )
    failed = CaseRecord(
        id="t.py::test_b",
        name="test_b",
        backend="transformers",
        outcome="failed",
        error=CaseError(type="ModelLoadError", message="no such model"),
    )
    return RunRecord(
        run_id=run_id,
        created_at=datetime(2026, 11, 26, 10, 0, 0, tzinfo=timezone.utc),
        machine=MachineInfo(hostname="h", platform="p", python="3.11"),
        cases=[passed, failed],
    )


def test_write_then_read_round_trips(tmp_path: Path):
    latest, copy = write_run_record(_record(), tmp_path / "reports")
    assert latest == tmp_path / "reports" / "llem-report.json"
    assert copy.parent == tmp_path / "reports" / "runs"
    assert copy.name == "llem-report-20261126T100000Z-01234567.json"
    assert read_run_record(latest) == read_run_record(copy) == _record()
    assert not list((tmp_path / "reports").glob(".*.tmp"))


def test_a_second_run_keeps_the_first_copy(tmp_path: Path):
    write_run_record(_record("aaaaaaaa11111111"), tmp_path)
    write_run_record(_record("bbbbbbbb22222222"), tmp_path)
    assert len(list((tmp_path / "runs").iterdir())) == 2
    assert json.loads((tmp_path / "llem-report.json").read_text())["run_id"].startswith("bbbb")


def test_unwritable_folder_is_a_store_error(tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ResultStoreError, match="cannot write"):
        write_run_record(_record(), blocker)


def test_reading_garbage_is_a_store_error(tmp_path: Path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ResultStoreError, match="cannot read"):
        read_run_record(bad)
    bad.write_text('{"run_id": 1}')
    with pytest.raises(ResultStoreError, match="not a valid run record"):
        read_run_record(bad)
    with pytest.raises(ResultStoreError):
        read_run_record(tmp_path / "missing.json")


def test_terminal_table_rows_from_the_record():
    lines = summary_lines(_record())
    assert lines[0].split() == [
        "case", "backend", "meter", "J/out", "tok", "out", "tok/s", "TTFT", "p50", "ms",
        "TPOT", "p50", "ms",
    ]  # fmt: skip
    row_a = lines[2].split()
    assert row_a[:3] == ["test_a[4]", "transformers", "nvml"]
    assert row_a[3:] == ["0.25", "1,234", "12.35", "n/a"]
    assert lines[3].split() == ["test_b", "transformers", "-", "ModelLoadError"]


def test_estimated_energy_is_marked_in_the_table():
    record = _record()
    summary = record.cases[0].metrics["energy_per_output_token_j"]
    summary.source = "estimated"
    assert "0.25 (est.)" in summary_lines(record)[2]


@pytest.fixture
def umask() -> Iterator[Callable[[int], None]]:
    old = os.umask(0o022)
    try:
        yield os.umask
    finally:
        os.umask(old)


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_get_the_mode_an_ordinary_open_gives(
    tmp_path: Path, umask: Callable[[int], None], mask: int, mode: int
):
    umask(mask)
    latest, copy = write_run_record(_record(), tmp_path / "reports")
    atomic_write_text(tmp_path / "page.html", "<html></html>")
    create_text_exclusively(tmp_path / "saved.json", "{}")
    for path in (latest, copy, tmp_path / "page.html", tmp_path / "saved.json"):
        assert stat.S_IMODE(path.stat().st_mode) == mode, path


def test_writing_onto_a_folder_fails_and_keeps_the_folder(tmp_path: Path):
    folder = tmp_path / "out.json"
    (folder / "inside").mkdir(parents=True)
    with pytest.raises(IsADirectoryError):
        atomic_write_text(folder, "{}")
    assert (folder / "inside").is_dir()
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temporary file left


def test_exclusive_creation_never_replaces_a_file(tmp_path: Path):
    path = tmp_path / "a.json"
    create_text_exclusively(path, "first")
    with pytest.raises(FileExistsError):
        create_text_exclusively(path, "second")
    assert path.read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_an_unsupported_schema_version_is_refused_naming_both(tmp_path: Path):
    data = json.loads(_record().model_dump_json())
    data["schema_version"] = "2.0"
    data["field_of_2_0"] = {}
    path = tmp_path / "future.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ResultStoreError) as error:
        read_run_record(path)
    assert str(error.value) == (
        f"{path}: unsupported schema_version '2.0'; this pytest-llem reads "
        f"{', '.join(SUPPORTED_SCHEMA_VERSIONS)}"
    )


def test_an_older_supported_schema_version_loads(tmp_path: Path, monkeypatch):
    # Only 1.0 exists yet: pretend 0.9 records (same fields) are still supported.
    monkeypatch.setattr(models, "SUPPORTED_SCHEMA_VERSIONS", ("0.9", SCHEMA_VERSION))
    data = json.loads(_record().model_dump_json())
    data["schema_version"] = "0.9"
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data))
    assert read_run_record(path).schema_version == "0.9"
    monkeypatch.setattr(models, "SUPPORTED_SCHEMA_VERSIONS", (SCHEMA_VERSION,))
    with pytest.raises(ResultStoreError, match=r"unsupported schema_version '0\.9'"):
        read_run_record(path)


def test_a_validation_error_is_one_line(tmp_path: Path):
    path = tmp_path / "bad.json"
    path.write_text('{"run_id": 1, "cases": 2}')
    with pytest.raises(ResultStoreError) as error:
        read_run_record(path)
    assert "\n" not in str(error.value)
    assert "run_id" in str(error.value)


def test_check_writable_creates_nothing_it_leaves(tmp_path: Path):
    check_writable(tmp_path / "a" / "b" / "c")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "kept").mkdir()
    check_writable(tmp_path / "kept")
    assert [p.name for p in tmp_path.iterdir()] == ["kept"]
    assert list((tmp_path / "kept").iterdir()) == []


def test_check_writable_fails_under_a_file_even_for_root(tmp_path: Path):
    # A parent that is a regular file stops root too (root ignores mode bits).
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ResultStoreError, match=r"cannot write in .*file/reports: Not a directory"):
        check_writable(blocker / "reports")
    with pytest.raises(ResultStoreError, match="it is a file, not a folder"):
        check_writable(blocker)
    assert blocker.read_text() == "x"


def test_refuse_overwriting_by_path_and_by_link(tmp_path: Path):
    source = tmp_path / "run.json"
    source.write_text("{}")
    link = tmp_path / "link.json"
    link.symlink_to(source)
    for output in (source, link, tmp_path / "." / "run.json"):
        with pytest.raises(ResultStoreError, match="refusing to overwrite"):
            refuse_overwriting(output, [tmp_path / "other.json", source], what="-o")
    refuse_overwriting(tmp_path / "new.json", [source])

"""Writing and reading run records."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest

from pytest_llem.exceptions import ResultStoreError
from pytest_llem.report.terminal import summary_lines
from pytest_llem.results.models import (
    CaseError,
    CaseRecord,
    MachineInfo,
    MeterRecord,
    MetricSummary,
    RunRecord,
)
from pytest_llem.results.store import read_run_record, write_run_record


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

"""The flat table (CSV and DataFrame), loading a run for analysis, and merging machines."""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest

from pytest_llem.exceptions import ResultStoreError
from pytest_llem.report.html import render_html
from pytest_llem.report.loading import Run, load_run, merge_runs
from pytest_llem.report.tables import (
    CASE_COLUMNS,
    METRIC_FIELDS,
    case_rows,
    csv_text,
    table_columns,
    write_csv,
)
from pytest_llem.results.models import MetricSummary
from pytest_llem.results.store import read_run_record, write_run_record
from tests.test_report_html import make_case, make_record


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def test_columns_identity_then_params_then_metrics() -> None:
    record = make_record()
    columns = table_columns(record)
    assert columns[: len(CASE_COLUMNS)] == list(CASE_COLUMNS)
    params = [c for c in columns if c.startswith("param.")]
    assert params[:3] == ["param.model", "param.backend", "param.device"]
    assert "param.sampling.temperature" in params
    assert "param.traffic.rate" in params
    energy = [c for c in columns if c.startswith("energy_per_output_token_j.")]
    assert energy == [f"energy_per_output_token_j.{field}" for field in METRIC_FIELDS]
    assert "ttft_ms.p50.median" in columns
    assert "ttft_ms.p50.ci95_high" in columns
    assert "output_tokens_per_s.unit" in columns
    assert len(columns) == len(set(columns))


def test_rows_hold_the_record_values() -> None:
    record = make_record()
    rows = case_rows(record)
    assert len(rows) == len(record.cases)
    row, case = rows[1], record.cases[1]
    assert row["id"] == case.id
    assert row["name"] == case.name
    assert row["outcome"] == "passed"
    assert row["machine"] == "node1"
    assert row["swept"] == "batch_size,dtype"
    assert row["param.batch_size"] == 4
    assert row["param.sampling.temperature"] == 1.0
    assert row["param.traffic.num_requests"] is None
    assert row["param.stop"] == json.dumps(["</s>", "\n\n"])
    summary = case.metrics["energy_per_output_token_j"]
    for field in METRIC_FIELDS:
        assert row[f"energy_per_output_token_j.{field}"] == getattr(summary, field)
    assert rows[-1]["swept"] is None


def test_csv_has_one_row_per_case_and_round_trips_values(tmp_path: Path) -> None:
    record = make_record()
    path = write_csv(record, tmp_path / "out" / "run.csv")
    assert path == tmp_path / "out" / "run.csv"
    assert not list(path.parent.glob(".*.tmp"))
    read = _read_csv(path)
    assert list(read[0]) == table_columns(record)
    assert len(read) == len(record.cases)
    for got, want in zip(read, case_rows(record), strict=True):
        for column, value in want.items():
            if value is None:
                assert got[column] == "", column
            elif isinstance(value, float):
                assert float(got[column]) == value, column
            else:
                assert got[column] == str(value), column
    assert path.read_text(encoding="utf-8") == csv_text(record)


def test_csv_neutralises_cells_a_spreadsheet_would_run(tmp_path: Path) -> None:
    # OWASP CSV injection: text from the record (a test id, an error, a model name, a swept
    # parameter) must not become a formula when the CSV is opened in a spreadsheet.
    from pytest_llem.results.models import CaseError

    case = make_case(0).model_copy(
        update={
            "name": '=HYPERLINK("http://evil","x")',
            "model": "@SUM(A1:A9)",
            "error": CaseError(type="+cmd", message="|calc"),
            "params": {"prompt": "-2+3", "stop": "\tx", "note": "\rx", "batch_size": -4},
        }
    )
    case.metrics["dynamic_energy_j"] = MetricSummary(n=3, median=-0.5, unit="J")
    path = write_csv(make_record([case]), tmp_path / "run.csv")
    (row,) = _read_csv(path)
    assert row["name"] == '\'=HYPERLINK("http://evil","x")'
    assert row["model"] == "'@SUM(A1:A9)"
    assert row["error"] == "'+cmd: |calc"
    assert row["param.prompt"] == "'-2+3"
    assert row["param.stop"] == "'\tx"
    assert row["param.note"] == "'\rx"
    assert row["param.batch_size"] == "-4"  # numbers stay numbers
    assert row["dynamic_energy_j.median"] == "-0.5"
    assert case_rows(make_record([case]))[0]["name"].startswith("=")  # the DataFrame is data


def test_a_metric_missing_from_one_case_is_an_empty_cell() -> None:
    cases = [make_case(0), make_case(1, server=True)]
    cases[0].metrics["energy_j"] = MetricSummary(n=0, unit="J", note="no energy meter")
    record = make_record(cases)
    read = list(csv.DictReader(io.StringIO(csv_text(record))))
    assert read[0]["goodput_rps.median"] == ""
    assert float(read[1]["goodput_rps.median"]) > 0
    assert read[0]["energy_j.median"] == ""
    assert read[0]["energy_j.n"] == "0"
    assert read[0]["energy_j.unit"] == "J"


def test_load_run_gives_the_record_with_a_dataframe(tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    record = make_record()
    latest, _ = write_run_record(record, tmp_path)
    run = load_run(latest)
    assert isinstance(run, Run)
    assert [c.id for c in run.cases] == [c.id for c in record.cases]
    frame = run.to_dataframe()
    assert list(frame.columns) == table_columns(record)
    assert len(frame) == len(record.cases)
    from_csv = pd.read_csv(write_csv(record, tmp_path / "run.csv"), keep_default_na=False)
    for (_, got), want in zip(frame.iterrows(), _read_csv(tmp_path / "run.csv"), strict=True):
        for column in frame.columns:
            assert _same(got[column], want[column]), column
    assert list(from_csv.columns) == list(frame.columns)
    assert frame.loc[1, "energy_per_output_token_j.median"] == pytest.approx(
        record.cases[1].metrics["energy_per_output_token_j"].median
    )


def _same(value: Any, text: str) -> bool:
    """A DataFrame cell against the CSV's text of it."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return text == ""
    if isinstance(value, bool):
        return text == str(value)
    if isinstance(value, int | float) or hasattr(value, "dtype"):
        return float(text) == float(value)
    return str(value) == text


def test_dataframe_without_pandas_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    latest, _ = write_run_record(make_record(), tmp_path)
    run = load_run(latest)
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match=r"pip install 'pytest-llem\[pandas\]'"):
        run.to_dataframe()


def test_load_run_of_a_missing_file_is_a_store_error(tmp_path: Path) -> None:
    with pytest.raises(ResultStoreError, match="cannot read"):
        load_run(tmp_path / "nope.json")


def _fleet() -> tuple[Any, Any]:
    shared = [make_case(i, sweep={"batch_size": b}) for i, b in enumerate((1, 8))]
    first = make_record([*shared, make_case(2, test="test_only_here")], host="node1")
    second = make_record(
        [make_case(i, sweep={"batch_size": b}) for i, b in enumerate((1, 8))],
        host="node2",
        run_id="run-0002",
    )
    return first, second


def test_merge_keeps_each_case_machine_and_disambiguates_ids() -> None:
    first, second = _fleet()
    merged = merge_runs([first, second])
    ids = [case.id for case in merged.cases]
    assert ids == [
        "suites/test_x.py::test_chat[batch_size1]@node1",
        "suites/test_x.py::test_chat[batch_size8]@node1",
        "suites/test_x.py::test_only_here_2",
        "suites/test_x.py::test_chat[batch_size1]@node2",
        "suites/test_x.py::test_chat[batch_size8]@node2",
    ]
    assert merged.cases[0].name == "test_chat[batch_size1]@node1"
    hosts = [case.machine.hostname for case in merged.cases if case.machine]
    assert hosts == ["node1", "node1", "node1", "node2", "node2"]
    assert [m.hostname for m in merged.machines] == ["node1", "node2"]
    assert merged.machine.hostname == "node1"
    sources = merged.options["merged"]
    assert [s["run_id"] for s in sources] == ["run-0001", "run-0002"]
    assert [s["machine"] for s in sources] == ["node1", "node2"]
    assert [row["machine"] for row in case_rows(merged)] == hosts


def test_merge_is_deterministic_and_round_trips(tmp_path: Path) -> None:
    first, second = _fleet()
    merged = merge_runs([first, second])
    assert merge_runs([first, second]) == merged
    assert merged.run_id.startswith("merged-")
    latest, _ = write_run_record(merged, tmp_path)
    assert read_run_record(latest).model_dump() == merged.model_dump()
    # A merged record merges again, and its cases keep their machines.
    third = make_record([make_case(9, test="test_more")], host="node3", run_id="run-0003")
    again = merge_runs([read_run_record(latest), third])
    assert [m.hostname for m in again.machines] == ["node1", "node2", "node3"]
    assert again.cases[-1].machine is not None
    assert again.cases[-1].machine.hostname == "node3"


def test_merge_of_one_host_twice_numbers_the_runs() -> None:
    first = make_record([make_case(0)], host="ci")
    second = make_record([make_case(0)], host="ci", run_id="run-0002")
    merged = merge_runs([first, second])
    assert [c.id for c in merged.cases] == [
        "suites/test_x.py::test_chat_0@ci#1",
        "suites/test_x.py::test_chat_0@ci#2",
    ]


def test_merge_refuses_nothing_and_mixed_schemas() -> None:
    with pytest.raises(ResultStoreError, match="nothing to merge"):
        merge_runs([])
    first, second = _fleet()
    with pytest.raises(ResultStoreError, match="schema versions"):
        merge_runs([first, second.model_copy(update={"schema_version": "0.9"})])


def test_merged_report_shows_every_machine() -> None:
    page = render_html(merge_runs(list(_fleet())))
    assert "Machine <code>node1</code>" in page
    assert "Machine <code>node2</code>" in page
    assert "test_chat[batch_size1]@node2" in page
    # Sweep series are split by machine when a swept test ran on several.
    assert "@node1" in page.split('id="sweeps"')[1]

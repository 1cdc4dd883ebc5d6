"""The ``llem`` command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_llem import __version__
from pytest_llem.cli import main


def test_schema_is_json_schema_of_the_run_record(capsys: pytest.CaptureFixture[str]):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["title"] == "pytest-llem run record"
    assert {"schema_version", "run_id", "created_at", "machine", "cases"} <= set(
        schema["properties"]
    )
    assert "MetricSummary" in schema["$defs"]


def test_schema_names_every_catalogue_metric_with_its_unit(capsys: pytest.CaptureFixture[str]):
    from pytest_llem.results.catalogue import CATALOGUE

    assert main(["schema"]) == 0
    metrics = json.loads(capsys.readouterr().out)["x-llem-metrics"]
    assert set(metrics) == set(CATALOGUE)
    assert metrics["energy_per_output_token_j"]["unit"] == "J/token"
    assert metrics["goodput_rps"]["better"] == "higher"


def test_tiny_model_path_builds_and_prints_the_folder(llem_cache: Path):
    run = subprocess.run(
        [sys.executable, "-m", "pytest_llem.cli", "tiny-model", "--path"],
        capture_output=True,
        text=True,
        check=True,
    )
    folder = Path(run.stdout.strip())
    assert folder.is_dir()
    assert folder.is_relative_to(llem_cache)
    assert (folder / "config.json").exists()
    assert run.stdout.count("\n") == 1  # only the path, so $(llem tiny-model --path) works


def test_tiny_model_without_path_lists_files(tiny_model: Path, capsys):
    assert main(["tiny-model"]) == 0
    out = capsys.readouterr().out
    assert str(tiny_model) in out
    assert "config.json" in out


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_no_command_is_a_usage_error_with_the_help(capsys):
    assert main([]) == 4
    assert "schema" in capsys.readouterr().err


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "llem"
    if not script.exists():
        pytest.skip(f"no llem console script beside {sys.executable} (package not installed)")
    run = subprocess.run([str(script), "--version"], capture_output=True, text=True, check=True)
    assert __version__ in run.stdout


def test_params_json_lists_every_parameter_with_sweep_values(capsys):
    from pytest_llem.config.introspection import parameters

    assert main(["params", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    by_path = {p["path"]: p for p in data["parameters"]}
    assert set(by_path) == {p.path for p in parameters()}
    assert by_path["batch_size"]["sweep_values"] == [1, 4, 16, 64]
    assert by_path["transformers.attn_implementation"]["backends"] == ["transformers"]
    assert by_path["dtype"]["reload"] is True
    assert any(c["name"] == "min-within-max" for c in data["constraints"])


def test_params_table_and_backend_filter(capsys):
    assert main(["params", "--backend", "endpoint"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["parameter", "type", "default"]
    assert "batch_size" in out
    assert "transformers.attn_implementation" not in out


def test_committed_parameter_reference_is_up_to_date(capsys):
    assert main(["params", "--format", "markdown"]) == 0
    generated = capsys.readouterr().out
    committed = (Path(__file__).resolve().parent.parent / "docs" / "parameters.md").read_text()
    assert committed == generated, (
        "docs/parameters.md is out of date: run `llem params --format markdown > "
        "docs/parameters.md`"
    )


def _write_record(path: Path, host: str) -> Path:
    from datetime import datetime, timezone

    from pytest_llem.results.models import CaseRecord, MachineInfo, MetricSummary, RunRecord

    record = RunRecord(
        run_id=f"run-{host}",
        created_at=datetime(2026, 11, 26, tzinfo=timezone.utc),
        machine=MachineInfo(hostname=host, platform="linux", python="3.11"),
        cases=[
            CaseRecord(
                id="t.py::test_a",
                name="test_a",
                backend="transformers",
                metrics={"output_tokens_per_s": MetricSummary(n=3, median=100.0, unit="tokens/s")},
            )
        ],
    )
    path.write_text(record.model_dump_json())
    return path


def test_report_export_and_merge_commands(tmp_path: Path, capsys):
    a = _write_record(tmp_path / "a.json", "node1")
    b = _write_record(tmp_path / "b.json", "node2")
    assert main(["report", str(a), "--html", str(tmp_path / "a.html")]) == 0
    assert "<html" in (tmp_path / "a.html").read_text()
    assert main(["export", str(a), "--csv", str(tmp_path / "a.csv")]) == 0
    lines = (tmp_path / "a.csv").read_text().splitlines()
    assert len(lines) == 2
    assert "output_tokens_per_s.median" in lines[0]
    assert main(["merge", str(a), str(b), "-o", str(tmp_path / "m.json")]) == 0
    merged = json.loads((tmp_path / "m.json").read_text())
    assert len(merged["cases"]) == 2
    assert {c["machine"]["hostname"] for c in merged["cases"]} == {"node1", "node2"}
    assert main(["report", str(tmp_path / "m.json")]) == 0
    assert (tmp_path / "m.html").exists()
    capsys.readouterr()


def test_missing_record_is_a_clear_error(tmp_path: Path, capsys):
    assert main(["report", str(tmp_path / "nope.json")]) == 2
    assert "cannot read run record" in capsys.readouterr().err


def _one_line_error(capsys: pytest.CaptureFixture[str], *fragments: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err
    return err


@pytest.mark.parametrize(
    "argv",
    [
        ["nosuch"],
        ["compare", "only-one.json"],
        ["export"],
        ["params", "--format", "yaml"],
        ["merge", "a.json"],
    ],
)
def test_argparse_errors_are_usage_errors(argv: list[str], capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 4
    assert "error:" in capsys.readouterr().err


def test_params_of_an_unknown_backend_lists_the_backends(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["params", "--backend", "nosuch"])
    assert exit_info.value.code == 4
    err = capsys.readouterr().err
    assert "'nosuch'" in err
    assert "transformers" in err
    assert "vllm" in err


def test_report_needs_exactly_one_source(tmp_path: Path, capsys):
    assert main(["report"]) == 4
    _one_line_error(capsys, "give RUN.json or --from-journal PATH")
    a = _write_record(tmp_path / "a.json", "node1")
    assert main(["report", str(a), "--from-journal", str(a)]) == 4
    _one_line_error(capsys, "give RUN.json or --from-journal PATH")


@pytest.mark.parametrize(
    ("command", "output"),
    [
        (["export", "{a}", "--csv", "{a}"], "{a}"),
        (["report", "{a}", "--html", "{a}"], "{a}"),
        (["merge", "{a}", "{b}", "-o", "{a}"], "{a}"),
        (["merge", "{a}", "{b}", "-o", "{link}"], "{link}"),
        (["report", "--from-journal", "{a}"], "{a}"),
    ],
)
def test_no_command_overwrites_its_input(tmp_path: Path, capsys, command: list[str], output: str):
    a = _write_record(tmp_path / "a.json", "node1")
    b = _write_record(tmp_path / "b.json", "node2")
    link = tmp_path / "link.json"
    link.symlink_to(a)
    before = a.read_bytes()
    names = {"a": str(a), "b": str(b), "link": str(link)}
    argv = [part.format(**names) for part in command]
    assert main(argv) == 2
    _one_line_error(capsys, "refusing to overwrite", output.format(**names))
    assert a.read_bytes() == before


def test_unsupported_schema_version_is_refused_by_every_reader(tmp_path: Path, capsys):
    a = _write_record(tmp_path / "a.json", "node1")
    data = json.loads(a.read_text())
    data["schema_version"] = "9.0"
    data["a_field_from_the_future"] = 1
    a.write_text(json.dumps(data))
    for argv in (
        ["report", str(a)],
        ["export", str(a)],
        ["merge", str(a), "-o", str(tmp_path / "m.json")],
        ["compare", str(a), str(a)],
    ):
        assert main(argv) == 2, argv
        _one_line_error(capsys, "unsupported schema_version '9.0'", "reads 1.0")


def test_io_and_decoding_errors_are_one_line(tmp_path: Path, capsys):
    a = _write_record(tmp_path / "a.json", "node1")
    folder = tmp_path / "folder.csv"
    folder.mkdir()
    assert main(["export", str(a), "--csv", str(folder)]) == 2
    _one_line_error(capsys, str(folder), "Is a directory")
    assert folder.is_dir()

    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    assert main(["export", str(binary)]) == 2
    _one_line_error(capsys, "cannot read run record", str(binary))

    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"run_id": 1, "cases": "none"}')
    assert main(["report", str(wrong)]) == 2
    _one_line_error(capsys, "is not a valid run record")


def test_journal_problems_are_one_line(tmp_path: Path, capsys):
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\xff\xfe\x00\x01 not text at all\n")
    assert main(["report", "--from-journal", str(binary)]) == 2
    _one_line_error(capsys, "no run header line")

    headless = tmp_path / "headless.jsonl"
    headless.write_text('{"type": "run", "created_at": "2026-11-26T10:00:00+00:00"}\n')
    assert main(["report", "--from-journal", str(headless)]) == 2
    _one_line_error(capsys, "has no run_id")
    assert not headless.with_suffix(".json").exists()

    future = tmp_path / "future.jsonl"
    future.write_text(
        '{"type": "run", "schema_version": "9.0", "run_id": "r", '
        '"created_at": "2026-11-26T10:00:00+00:00"}\n'
    )
    assert main(["report", "--from-journal", str(future)]) == 2
    _one_line_error(capsys, "unsupported schema_version '9.0'")


def test_a_journal_line_that_is_not_utf8_is_skipped_with_a_warning(tmp_path: Path, capsys):
    journal = tmp_path / "run.jsonl"
    journal.write_bytes(
        b'{"type": "run", "run_id": "r1", "created_at": "2026-11-26T10:00:00+00:00"}\n'
        b'{"type": "case", "case": {"id": "t.py::test_a", "name": "test_a"}}\n'
        b"\xff\xfe half a line from a crash\n"
    )
    assert main(["report", "--from-journal", str(journal)]) == 0
    err = capsys.readouterr().err
    assert "run.jsonl:3: damaged journal line skipped" in err
    record = json.loads(journal.with_suffix(".json").read_text())
    assert [case["id"] for case in record["cases"]] == ["t.py::test_a"]


def test_committed_metric_tables_are_up_to_date(capsys):
    page = Path(__file__).resolve().parent.parent / "docs" / "metrics.md"
    assert main(["metrics", "--doc", str(page)]) == 0
    generated = capsys.readouterr().out
    assert page.read_text() == generated, (
        "docs/metrics.md's metric tables are out of date: run "
        "`llem metrics --doc docs/metrics.md --write`"
    )
    assert generated.count("<!-- llem metrics: ") == 13


def test_metrics_lists_every_catalogue_name_with_unit_and_direction(capsys):
    from pytest_llem.results.catalogue import CATALOGUE

    assert main(["metrics", "--format", "json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert set(listed) == set(CATALOGUE)
    assert listed["ttft_ms.p99"]["unit"] == "ms"
    assert listed["output_tokens_per_s"]["better"] == "higher"
    assert listed["dynamic_energy_j"]["needs_baseline"] is True
    assert main(["metrics"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["metric", "unit", "better", "kind", "gated", "baseline"]
    assert len(table) == 2 + len(CATALOGUE)

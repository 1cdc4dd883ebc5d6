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


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "schema" in capsys.readouterr().out


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
    assert main(["params", "--backend", "other"]) == 0
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
    assert main(["report", str(tmp_path / "nope.json")]) == 1
    assert "cannot read run record" in capsys.readouterr().err

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

"""Saving, comparing and gating through pytest and through `llem compare`.

The engine is a FakeBackend on the wall clock whose pace each run sets (``LLEM_TEST_STEP_S``,
seconds per token): a tenfold slower engine is a tenfold lower throughput whatever else the
machine is doing, so the verdicts here never depend on a quiet machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = """
import os

from pytest_llem.exceptions import BackendNotAvailableError
from tests.fakes.fake_backend import FakeBackend, WallClock


def pytest_llem_backend_names():
    return ["paced"]


def pytest_llem_make_backend(name, case, progress):
    if name != "paced":
        return None
    step_s = os.environ.get("LLEM_TEST_STEP_S")
    if not step_s:  # like an engine that is not installed: the case is skipped
        raise BackendNotAvailableError("paced", "set LLEM_TEST_STEP_S")
    return FakeBackend(WallClock(), prefill_s=float(step_s), step_s=float(step_s))
"""

CASE = """
import pytest

@pytest.mark.llem(num_prompts=4, batch_size=4, max_new_tokens=4, min_new_tokens=4, warmup=0)
def test_throughput(llem):
    llem.run()
"""

#: The paced engine sleeps on the wall clock, so other processes on a shared machine cannot slow
#: it: drift is judged in test_drift.py, not here, where it would turn these verdicts
#: inconclusive whenever a neighbour's load changes between two runs.
QUICK = [
    "--llem-backend=paced",
    "--llem-meter=none",
    "-p",
    "no:cacheprovider",
    "--llem-drift-margin=off",
]
#: Seconds per token: a window of the fast engine lasts 4 steps (20 ms), the slow one 200 ms.
FAST, SLOW = "0.005", "0.05"
GATE = "--llem-fail-on=output_tokens_per_s:-5%"


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(CASE)
    return pytester


def _run(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, step_s: str | None, *args: str
) -> pytest.RunResult:
    if step_s is None:
        monkeypatch.delenv("LLEM_TEST_STEP_S", raising=False)
    else:
        monkeypatch.setenv("LLEM_TEST_STEP_S", step_s)
    return pytester.runpytest(*QUICK, *args)


def _saved(pytester: pytest.Pytester) -> list[Path]:
    return sorted((pytester.path / ".llem").glob("*/*.json"))


def _llem_compare(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest_llem.cli", "compare", *args],
        capture_output=True,
        text=True,
        check=False,
    )


def test_save_names_the_file_and_compare_finds_a_regression(
    project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    saved = _run(project, monkeypatch, FAST, "--llem-repeat=3", "--llem-save=fast")
    saved.assert_outcomes(passed=1)
    (path,) = _saved(project)
    assert path.name.startswith("0001_fast_")
    assert path.name.endswith("Z.json")
    saved.stdout.fnmatch_lines(["llem saved: *0001_fast_*"])

    result = _run(project, monkeypatch, SLOW, "--llem-repeat=3", "--llem-compare=fast", GATE)
    assert result.ret == 1
    result.stdout.fnmatch_lines(
        ["*llem gate failed*", "*test_throughput*output_tokens_per_s regressed (limit -5%)*"]
    )
    result.stdout.no_fnmatch_line("*Traceback*")
    record = json.loads((project.path / "reports" / "llem-report.json").read_text())
    (row,) = record["comparison"]["rows"]
    assert (row["verdict"], row["gated"]) == ("regressed", True)
    assert row["high"] < 0.95  # ten times slower: the whole interval is beyond the threshold

    # the same verdict outside pytest
    cli = _llem_compare(
        str(path),
        str(project.path / "reports" / "llem-report.json"),
        "--fail-on=output_tokens_per_s:-5%",
        "--format=json",
        "--drift-margin=off",  # as QUICK
    )
    assert cli.returncode == 1, cli.stderr
    verdicts = {m["metric"]: m["verdict"] for m in json.loads(cli.stdout)["metrics"]}
    assert verdicts["output_tokens_per_s"] == "regressed"


def test_same_configuration_passes_the_gate(
    project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    _run(project, monkeypatch, SLOW, "--llem-repeat=3", "--llem-save").assert_outcomes(passed=1)
    result = _run(
        project,
        monkeypatch,
        SLOW,
        "--llem-repeat=3",
        "--llem-compare",
        "--llem-fail-on=output_tokens_per_s:-50%",
    )
    assert result.ret == 0
    result.stdout.fnmatch_lines(["*llem comparison*", "*output_tokens_per_s*unchanged*"])


def test_one_window_per_side_fails_the_gate_naming_why(
    project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    _run(project, monkeypatch, FAST, "--llem-repeat=1", "--llem-save=one").assert_outcomes(passed=1)
    result = _run(
        project,
        monkeypatch,
        SLOW,
        "--llem-repeat=1",
        "--llem-compare=one",
        "--llem-fail-on=output_tokens_per_s:-0.001%",
        "--llem-fail-inconclusive",
    )
    result.assert_outcomes(passed=1)
    assert result.ret == 1
    result.stdout.fnmatch_lines(
        [
            "*test_throughput: output_tokens_per_s could not be judged (limit -0.001%): baseline "
            "has 1 window; current has 1 window: at least 3 windows per side are needed"
        ]
    )


def test_a_case_gone_from_the_current_run_fails_the_gate(
    project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    _run(project, monkeypatch, FAST, "--llem-repeat=3", "--llem-save=base").assert_outcomes(
        passed=1
    )
    project.makepyfile(test_other="def test_plain():\n    pass\n")
    result = _run(project, monkeypatch, FAST, "test_other.py", "--llem-compare=base", GATE)
    result.assert_outcomes(passed=1)
    assert result.ret == 1
    result.stdout.fnmatch_lines(
        [
            "*the current run has no case: nothing to judge",
            "*test_throughput: output_tokens_per_s could not be judged (limit -5%): not in the "
            "current run",
        ]
    )


def test_unloadable_baseline_is_a_usage_error_before_any_case_runs(
    project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = _run(project, monkeypatch, FAST, "--llem-compare=nosuchname")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    storage = project.path / ".llem"
    result.stderr.fnmatch_lines(
        [
            "*--llem-compare=nosuchname: no saved run named 'nosuchname' for machine *; saved "
            f"runs of * in {storage}: none"
        ]
    )
    assert not (project.path / "reports").exists()  # no case ran, nothing was written

    (project.path / "broken.json").write_text("{not json", encoding="utf-8")
    (project.path / "other.json").write_text('{"cases": []}', encoding="utf-8")
    (project.path / "future.json").write_text('{"schema_version": "9.0"}', encoding="utf-8")
    for spec, message in (
        ("broken.json", "cannot read run record broken.json: *"),
        ("future.json", "*unsupported schema_version '9.0'; this pytest-llem reads 1.0*"),
        ("other.json", "other.json is not a valid run record: *"),
        ("missing.json", f"no such run record: missing.json; saved runs of * in {storage}: *"),
    ):
        result = _run(project, monkeypatch, FAST, f"--llem-compare={spec}", GATE)
        assert result.ret == pytest.ExitCode.USAGE_ERROR, spec
        result.stderr.fnmatch_lines([f"*--llem-compare={spec}: {message}"])
        assert len([line for line in result.stderr.lines if line.strip()]) == 1  # one line
    assert not (project.path / "reports").exists()


def test_baseline_whose_cases_were_all_skipped_says_so(
    project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    _run(project, monkeypatch, None, "--llem-save=skipped").assert_outcomes(skipped=1)
    problem = "the baseline has no measured case (1 skipped): nothing to compare against"
    reported = _run(project, monkeypatch, FAST, "--llem-repeat=3", "--llem-compare=skipped")
    assert reported.ret == 0
    reported.stdout.fnmatch_lines(
        [
            "*Not measured in the baseline (nothing to compare against):",
            "*test_throughput (skipped: backend 'paced' is not available*",
            f"llem: {problem}",
        ]
    )
    gated = _run(project, monkeypatch, FAST, "--llem-repeat=3", "--llem-compare=skipped", GATE)
    assert gated.ret == 1
    gated.stdout.fnmatch_lines(["*llem gate failed*", problem])


def test_bad_gate_expression_is_a_usage_error(project: pytest.Pytester) -> None:
    result = project.runpytest("--llem-compare", "--llem-fail-on=energy:+5")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--llem-fail-on*energy_per_output_token_j:+5%*"])


def test_gate_without_baseline_option_is_a_usage_error(project: pytest.Pytester) -> None:
    result = project.runpytest("--llem-fail-on=output_tokens_per_s:-5%")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--llem-fail-on needs a baseline*"])


def test_gate_with_no_saved_baseline_is_a_usage_error(
    project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = _run(project, monkeypatch, FAST, "--llem-compare", GATE)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--llem-compare=latest: no saved run for machine *: none"])


def test_budget_breach_fails_only_its_test(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.llem(num_prompts=2, max_new_tokens=2)
        @pytest.mark.llem_budget(output_tokens_per_s_min=1e9)
        def test_impossible(llem):
            llem.run()

        @pytest.mark.llem(num_prompts=2, max_new_tokens=2)
        @pytest.mark.llem_budget(output_tokens_per_s_min=0.001, ttft_ms_p99=1e9)
        def test_easy(llem):
            llem.run()
        """
    )
    result = _run(pytester, monkeypatch, FAST, "--llem-repeat=3", "--llem-warmup=0")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*llem budget exceeded*", "*output_tokens_per_s*1e+09*"])
    record = json.loads((pytester.path / "reports" / "llem-report.json").read_text())
    outcomes = {case["name"]: case["outcome"] for case in record["cases"]}
    assert outcomes == {"test_impossible": "failed", "test_easy": "passed"}


def test_budget_with_unknown_metric_is_a_collection_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.llem_budget(joules_per_token=0.5)
        def test_budget(llem):
            llem.run()
        """
    )
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["*test_budget*joules_per_token*"])


def test_baseline_from_another_engine_version_warns_and_strict_refuses(
    project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    _run(project, monkeypatch, FAST, "--llem-repeat=3", "--llem-save=base").assert_outcomes(
        passed=1
    )
    (path,) = _saved(project)
    record = json.loads(path.read_text())
    record["machine"]["libraries"]["transformers"] = "0.0.1"  # as if saved with another engine
    path.write_text(json.dumps(record))

    warned = _run(project, monkeypatch, FAST, "--llem-repeat=3", "--llem-compare=base")
    assert warned.ret == 0
    warned.stdout.fnmatch_lines(["*baseline ran elsewhere*transformers*"])

    refused = _run(
        project,
        monkeypatch,
        FAST,
        "--llem-repeat=3",
        "--llem-compare=base",
        "--llem-compare-strict",
    )
    assert refused.ret == 1
    refused.stdout.fnmatch_lines(["*refusing to compare*transformers*"])
    assert (project.path / "reports" / "llem-report.json").exists()  # the run is still written

"""Saving, comparing and gating through pytest and through `llem compare`, on the tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

pytest_plugins = ["pytester"]

CASE = """
import pytest

@pytest.mark.llem(num_prompts=8, max_new_tokens=8, min_new_tokens=8, warmup=1)
def test_throughput(llem):
    llem.run()
"""

QUICK = ["--llem-meter=none", "-p", "no:cacheprovider"]


def _saved(pytester: pytest.Pytester) -> list[Path]:
    return sorted((pytester.path / ".llem").glob("*/*.json"))


def test_save_names_the_file_and_compare_finds_a_regression(
    pytester: pytest.Pytester, tiny_model: Path
):
    pytester.makepyfile(CASE)
    # five windows each: with three, one window stalled by a busy machine can make the interval
    # of the ratio straddle the threshold (inconclusive) even for an eight-fold difference
    saved = pytester.runpytest(
        *QUICK, "--llem-repeat=5", "--llem-set", "batch_size=8", "--llem-save=fast"
    )
    saved.assert_outcomes(passed=1)
    (path,) = _saved(pytester)
    assert path.name.startswith("0001_fast_")
    assert path.name.endswith("Z.json")
    saved.stdout.fnmatch_lines(["llem saved: *0001_fast_*"])

    result = pytester.runpytest(
        *QUICK,
        "--llem-repeat=5",
        "--llem-set",
        "batch_size=1",
        "--llem-compare=fast",
        "--llem-fail-on=output_tokens_per_s:-5%",
    )
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*llem regressions*", "*test_throughput*output_tokens_per_s*"])
    result.stdout.no_fnmatch_line("*Traceback*")

    # the same verdict outside pytest
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest_llem.cli",
            "compare",
            str(path),
            str(pytester.path / "reports" / "llem-report.json"),
            "--fail-on=output_tokens_per_s:-5%",
            "--format=json",
        ],
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 1, cli.stderr
    verdicts = {m["metric"]: m["verdict"] for m in json.loads(cli.stdout)["metrics"]}
    assert verdicts["output_tokens_per_s"] == "regressed"


def test_same_configuration_passes_the_gate(pytester: pytest.Pytester, tiny_model: Path):
    pytester.makepyfile(CASE)
    pytester.runpytest(*QUICK, "--llem-repeat=5", "--llem-save").assert_outcomes(passed=1)
    result = pytester.runpytest(
        *QUICK,
        "--llem-repeat=5",
        "--llem-compare",
        "--llem-fail-on=output_tokens_per_s:-50%",
    )
    assert result.ret == 0
    result.stdout.fnmatch_lines(["*llem comparison*", "*output_tokens_per_s*"])


def test_bad_gate_expression_is_a_usage_error(pytester: pytest.Pytester):
    pytester.makepyfile(CASE)
    result = pytester.runpytest("--llem-compare", "--llem-fail-on=energy:+5")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--llem-fail-on*energy_per_output_token_j:+5%*"])


def test_gate_without_baseline_option_is_a_usage_error(pytester: pytest.Pytester):
    pytester.makepyfile(CASE)
    result = pytester.runpytest("--llem-fail-on=output_tokens_per_s:-5%")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--llem-fail-on needs a baseline*"])


def test_gate_with_no_saved_baseline_fails_clearly(pytester: pytest.Pytester, tiny_model: Path):
    pytester.makepyfile(CASE)
    result = pytester.runpytest(
        *QUICK, "--llem-repeat=1", "--llem-compare", "--llem-fail-on=output_tokens_per_s:-5%"
    )
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*cannot compare*gate cannot run without a baseline*"])


def test_budget_breach_fails_only_its_test(pytester: pytest.Pytester, tiny_model: Path):
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
    result = pytester.runpytest(*QUICK, "--llem-repeat=3", "--llem-warmup=0")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*llem budget exceeded*", "*output_tokens_per_s*1e+09*"])
    record = json.loads((pytester.path / "reports" / "llem-report.json").read_text())
    outcomes = {case["name"]: case["outcome"] for case in record["cases"]}
    assert outcomes == {"test_impossible": "failed", "test_easy": "passed"}


def test_budget_with_unknown_metric_is_a_collection_error(pytester: pytest.Pytester):
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
    pytester: pytest.Pytester, tiny_model: Path
):
    pytester.makepyfile(CASE)
    pytester.runpytest(*QUICK, "--llem-repeat=2", "--llem-save=base").assert_outcomes(passed=1)
    (path,) = _saved(pytester)
    record = json.loads(path.read_text())
    record["machine"]["libraries"]["transformers"] = "0.0.1"  # as if saved with another engine
    path.write_text(json.dumps(record))

    warned = pytester.runpytest(*QUICK, "--llem-repeat=2", "--llem-compare=base")
    assert warned.ret == 0
    warned.stdout.fnmatch_lines(["*baseline ran elsewhere*transformers*"])

    refused = pytester.runpytest(
        *QUICK, "--llem-repeat=2", "--llem-compare=base", "--llem-compare-strict"
    )
    assert refused.ret == 1
    refused.stdout.fnmatch_lines(["*refusing to compare*transformers*"])
    assert (pytester.path / "reports" / "llem-report.json").exists()  # the run is still written

"""pytest-benchmark interop: an llem case also appears as a benchmark with its metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("pytest_benchmark", reason="pytest-benchmark is not installed")

pytest_plugins = ["pytester"]


def test_case_appears_in_benchmark_json(pytester: pytest.Pytester, tiny_model: Path):
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.llem(num_prompts=2, max_new_tokens=2)
        def test_case(llem):
            llem.run()
        """
    )
    result = pytester.runpytest(
        "-p",
        "no:cacheprovider",
        "--llem-meter=none",
        "--llem-repeat=3",
        "--llem-warmup=0",
        "--benchmark-json=bench.json",
    )
    result.assert_outcomes(passed=1, warnings=0)
    (bench,) = json.loads((pytester.path / "bench.json").read_text())["benchmarks"]
    assert bench["name"] == "test_case"
    assert bench["stats"]["rounds"] == 3
    record = json.loads((pytester.path / "reports" / "llem-report.json").read_text())
    durations = sorted(rep["duration_s"] for rep in record["cases"][0]["repetitions"])
    assert bench["stats"]["min"] == pytest.approx(durations[0])
    assert bench["extra_info"]["llem.output_tokens_per_s"] > 0
    assert bench["extra_info"]["llem.units"]["output_tokens_per_s"] == "tokens/s"


def test_without_benchmark_json_nothing_changes(pytester: pytest.Pytester, tiny_model: Path):
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.llem(num_prompts=1, max_new_tokens=1)
        def test_case(llem, benchmark):
            llem.run()
            benchmark(lambda: None)  # the test's own use of the fixture is left alone
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider", "--llem-meter=none", "--llem-repeat=1")
    result.assert_outcomes(passed=1)

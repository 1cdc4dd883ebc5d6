"""End to end through pytest: real runs on the built-in tiny model, the run record, the terminal
summary and what happens on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

pytestmark = pytest.mark.slow

pytest_plugins = ["pytester"]

QUICK = ["--llem-warmup=0", "--llem-meter=none", "-p", "no:cacheprovider"]

DONE_WHEN = """
import pytest

@pytest.mark.llem(batch_size=4, max_new_tokens=8, min_new_tokens=8, num_prompts=8)
def test_tiny(llem):
    result = llem.run()
    assert result["output_tokens_per_s"].median > 0
"""


def _record(pytester: pytest.Pytester) -> dict:
    return json.loads((pytester.path / "reports" / "llem-report.json").read_text())


def test_marker_case_records_64_tokens_per_repetition(pytester: pytest.Pytester, tiny_model):
    pytester.makepyfile(DONE_WHEN)
    result = pytester.runpytest(*QUICK, "--llem-repeat=2")
    result.assert_outcomes(passed=1)
    record = _record(pytester)
    (case,) = record["cases"]
    assert case["id"].endswith("::test_tiny")
    assert case["outcome"] == "passed"
    assert case["backend"] == "transformers"
    assert case["model"] == "llem-tiny"
    assert case["params"]["batch_size"] == 4
    assert [rep["output_tokens"] for rep in case["repetitions"]] == [64, 64]
    assert [rep["requests"] for rep in case["repetitions"]] == [8, 8]
    summary = case["metrics"]["output_tokens_per_s"]
    assert summary["n"] == 2
    assert summary["unit"] == "tokens/s"
    assert summary["min"] <= summary["median"] <= summary["max"]
    for name in ("ttft_ms.p50", "tpot_ms.p50", "e2e_ms.p99", "flops_estimate", "peak_memory_mb"):
        assert name in case["metrics"], name


def test_params_hold_the_device_and_dtype_that_ran(pytester: pytest.Pytester, tiny_model):
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.llem(num_prompts=1, max_new_tokens=2)
        def test_auto(llem):
            result = llem.run()
            assert llem.config.device == "auto"  # the config keeps what was asked

        @pytest.mark.llem(num_prompts=1, max_new_tokens=2, device="cpu", dtype="bfloat16")
        def test_asked(llem):
            llem.run()
        """
    )
    pytester.runpytest(*QUICK, "--llem-repeat=1").assert_outcomes(passed=2)
    cases = {case["name"]: case for case in _record(pytester)["cases"]}
    auto = cases["test_auto"]
    assert (auto["params"]["device"], auto["params"]["dtype"]) == ("cpu", "float32")
    assert (auto["backend_info"]["device"], auto["backend_info"]["dtype"]) == ("cpu", "float32")
    assert "asked for device=auto, dtype=auto; ran with device=cpu, dtype=float32" in auto["notes"]
    asked = cases["test_asked"]
    assert (asked["params"]["device"], asked["params"]["dtype"]) == ("cpu", "bfloat16")
    assert not any(note.startswith("asked for") for note in asked["notes"])


def test_record_validates_against_the_published_schema(pytester: pytest.Pytester, tiny_model):
    pytester.makepyfile(DONE_WHEN)
    pytester.runpytest(*QUICK, "--llem-repeat=3").assert_outcomes(passed=1)
    schema = subprocess.run(
        [sys.executable, "-m", "pytest_llem.cli", "schema"],
        capture_output=True,
        text=True,
        check=True,
    )
    record = _record(pytester)
    jsonschema.validate(record, json.loads(schema.stdout))
    assert record["schema_version"]
    assert record["machine"]["python"]
    assert record["machine"]["libraries"]["torch"]
    assert record["options"]["meter"] == "none"
    runs = list((pytester.path / "reports" / "runs").glob("llem-report-*.json"))
    assert len(runs) == 1
    assert json.loads(runs[0].read_text())["run_id"] == record["run_id"]
    (case,) = record["cases"]
    ci = case["metrics"]["output_tokens_per_s"]
    assert ci["ci95_low"] <= ci["median"] <= ci["ci95_high"]


def test_no_meter_reports_no_energy_and_no_zeros(pytester: pytest.Pytester, tiny_model):
    pytester.makepyfile(DONE_WHEN)
    pytester.runpytest(*QUICK, "--llem-repeat=1").assert_outcomes(passed=1)
    (case,) = _record(pytester)["cases"]
    energy = case["metrics"]["energy_per_output_token_j"]
    assert energy["median"] is None
    assert energy["note"]
    assert all(rep["energy_j"] is None for rep in case["repetitions"])
    assert case["meters"][0]["name"] == "none"


def test_terminal_summary_has_a_row_per_case(pytester: pytest.Pytester, tiny_model):
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.llem(max_new_tokens=4, min_new_tokens=4, num_prompts=2)
        @pytest.mark.parametrize("bs", [1, 2])
        def test_bs(llem, bs):
            llem.run(batch_size=bs)
        """
    )
    result = pytester.runpytest(*QUICK, "--llem-repeat=1")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        [
            "*llem benchmark summary*",
            "case*backend*meter*J/out tok*out tok/s*TTFT p50 ms*TPOT p50 ms*",
            "*test_bs?1?*transformers*none*n/a*",
            "*test_bs?2?*transformers*none*n/a*",
            "llem run record: reports*llem-report.json",
        ]
    )


def test_model_is_loaded_once_and_reused(pytester: pytest.Pytester, tiny_model):
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.llem(max_new_tokens=2, num_prompts=2)
        @pytest.mark.parametrize("bs", [1, 2])
        def test_bs(llem, bs):
            llem.run(batch_size=bs)
        """
    )
    pytester.runpytest(*QUICK, "--llem-repeat=1").assert_outcomes(passed=2)
    loads = [case["load"] for case in _record(pytester)["cases"]]
    assert [load["reused"] for load in loads] == [False, True]
    assert loads[0]["seconds"] > 0


def test_missing_model_fails_that_case_and_the_session_goes_on(
    pytester: pytest.Pytester, tiny_model
):
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.llem(model="/no/such/model", num_prompts=1, max_new_tokens=2)
        def test_missing(llem):
            llem.run()

        @pytest.mark.llem(num_prompts=1, max_new_tokens=2)
        def test_fine(llem):
            llem.run()
        """
    )
    result = pytester.runpytest(*QUICK, "--llem-repeat=1")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*ModelLoadError*/no/such/model*"])
    cases = {case["name"]: case for case in _record(pytester)["cases"]}
    assert cases["test_missing"]["outcome"] == "failed"
    assert cases["test_missing"]["error"]["type"] == "ModelLoadError"
    assert cases["test_fine"]["outcome"] == "passed"


def test_nvml_without_gpu_skips_with_the_reason(pytester: pytest.Pytester, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # as on a machine with no NVIDIA driver
    pytester.makepyfile(DONE_WHEN)
    result = pytester.runpytest("--llem-meter=nvml", "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*SKIPPED*nvml*unavailable*"])


def test_failed_assertion_is_recorded_as_failed(pytester: pytest.Pytester, tiny_model):
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.llem(num_prompts=1, max_new_tokens=2)
        def test_budget(llem):
            result = llem.run()
            assert result["output_tokens_per_s"].median < 0
        """
    )
    pytester.runpytest(*QUICK, "--llem-repeat=1").assert_outcomes(failed=1)
    (case,) = _record(pytester)["cases"]
    assert case["outcome"] == "failed"
    assert case["metrics"]["output_tokens_per_s"]["median"] > 0
    assert case["error"]["type"] == "AssertionError"
    median = case["metrics"]["output_tokens_per_s"]["median"]
    assert case["error"]["message"] == f"assert {median!r} < 0"


def test_a_budget_breach_is_recorded_with_its_error(pytester: pytest.Pytester, tiny_model):
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.llem(num_prompts=1, max_new_tokens=2)
        @pytest.mark.llem_budget(output_tokens_per_s_min=1e9)
        def test_budget(llem):
            llem.run()
        """
    )
    pytester.runpytest(*QUICK, "--llem-repeat=1").assert_outcomes(failed=1)
    (case,) = _record(pytester)["cases"]
    assert case["outcome"] == "failed"
    assert case["error"]["type"] == "BudgetExceeded"
    assert case["error"]["message"].startswith("output_tokens_per_s: median ")
    assert "\n" not in case["error"]["message"]


def test_a_later_failure_of_the_test_is_recorded_as_the_case_error(
    pytester: pytest.Pytester, tiny_model
):
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.llem(num_prompts=1, max_new_tokens=2)
        def test_later(llem):
            llem.run()
            raise ValueError("the figures looked wrong\\nsecond line")
        """
    )
    pytester.runpytest(*QUICK, "--llem-repeat=1").assert_outcomes(failed=1)
    (case,) = _record(pytester)["cases"]
    assert case["error"] == {"type": "ValueError", "message": "the figures looked wrong"}


def test_report_dir_option(pytester: pytest.Pytester, tiny_model):
    pytester.makepyfile(DONE_WHEN)
    out = pytester.path / "elsewhere"
    result = pytester.runpytest(*QUICK, "--llem-repeat=1", f"--llem-report-dir={out}")
    result.assert_outcomes(passed=1)
    assert (out / "llem-report.json").exists()
    assert not (pytester.path / "reports").exists()


def test_jsonl_prompts_file(pytester: pytest.Pytester, tiny_model):
    prompts = pytester.path / "mine.jsonl"
    prompts.write_text('{"prompt": "hello there"}\n{"prompt": "general kenobi"}\n')
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.llem(prompts={str(prompts)!r}, num_prompts=4, max_new_tokens=2)
        def test_mine(llem):
            result = llem.run()
            assert result.repetitions[0].requests == 4
        """
    )
    pytester.runpytest(*QUICK, "--llem-repeat=1").assert_outcomes(passed=1)


def test_shipped_suites_run_end_to_end(pytester: pytest.Pytester, tiny_model):
    suites = Path(__file__).resolve().parent.parent / "suites"
    result = pytester.runpytest(str(suites), *QUICK, "--llem-repeat=1", "--llem-profile=smoke")
    result.assert_outcomes(passed=16)
    record = _record(pytester)
    assert len(record["cases"]) == 16
    assert record["profile"] == {"name": "smoke", "reason": "--llem-profile=smoke"}
    grid = {(case["params"]["workload"], case["params"]["scenario"]) for case in record["cases"]}
    assert grid == {
        (shape, scenario)
        for shape in ("chat", "summarisation", "generation", "fixed")
        for scenario in ("offline", "single_stream", "server")
    }
    page = (pytester.path / "reports" / "llem-report.html").read_text()
    assert "test_offline[chat-bs1]" in page


@pytest.mark.parametrize("attempt", [1, 2])
def test_in_process_runs_that_build_and_load_the_model_repeat_safely(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, attempt: int
):
    # Each in-process run builds llem-tiny into a fresh cache and loads it; pytester drops the
    # modules an inner run imported, so this only works because tests/conftest.py preloads the
    # engine.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / f"cache{attempt}"))
    pytester.makepyfile(DONE_WHEN)
    pytester.runpytest(*QUICK, "--llem-repeat=1").assert_outcomes(passed=1)
    assert (tmp_path / f"cache{attempt}" / "pytest-llem" / "models").is_dir()


def test_device_cuda_without_cuda_skips_with_the_reason(pytester: pytest.Pytester, tiny_model):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    pytester.makepyfile(DONE_WHEN)
    result = pytester.runpytest(*QUICK, "--llem-device=cuda", "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*SKIPPED*device=cuda*no CUDA device*"])
    (case,) = _record(pytester)["cases"]
    assert case["outcome"] == "skipped"


def test_hub_model_not_cached_while_offline_fails_clearly(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tiny_model
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pytester.makepyfile(DONE_WHEN)
    result = pytester.runpytest(*QUICK, "--llem-model=someorg/not-a-model")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*ModelLoadError*someorg/not-a-model*HF_HUB_OFFLINE*"])


def test_server_case_records_goodput_latency_and_achieved_rate(
    pytester: pytest.Pytester, tiny_model
):
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.llem(
            scenario="server",
            traffic={"arrival": "poisson", "rate": 8, "num_requests": 32, "seed": 1},
            slo={"ttft_ms": 2000},
            max_new_tokens=4,
        )
        def test_server(llem):
            llem.run()
        """
    )
    pytester.runpytest(*QUICK, "--llem-repeat=1").assert_outcomes(passed=1)
    (case,) = _record(pytester)["cases"]
    metrics = case["metrics"]
    for name in ("goodput_rps", "ttft_ms.p50", "itl_ms.p50", "tpot_ms.p50", "e2e_ms.p99"):
        assert metrics[name]["n"] == 1, name
    assert metrics["goodput_rps"]["unit"] == "requests/s"
    assert case["latency"]["ttft_ms"]["max"] <= case["latency"]["e2e_ms"]["max"]
    (rep,) = case["repetitions"]
    assert rep["requests"] == 32
    assert rep["server"]["target_rate_rps"] == 8
    assert rep["server"]["achieved_rate_rps"] > 0
    assert metrics["achieved_rate_rps"]["median"] == rep["server"]["achieved_rate_rps"]


def test_synthetic_prompts_have_the_exact_length_and_the_record_keeps_lengths(
    pytester: pytest.Pytester, tiny_model
):
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.llem(prompts="synthetic", input_tokens=24, num_prompts=4, max_new_tokens=2)
        def test_synthetic(llem):
            llem.run()
        """
    )
    pytester.runpytest(*QUICK, "--llem-repeat=1").assert_outcomes(passed=1)
    (case,) = _record(pytester)["cases"]
    assert case["repetitions"][0]["input_tokens"] == 4 * 24
    lengths = case["prompts"]["input_tokens"]
    assert (lengths["min"], lengths["max"], lengths["unit"]) == (24, 24, "tokens")
    assert case["prompts"]["source"] == "synthetic"


def test_overlong_prompts_filtered_and_recorded(pytester: pytest.Pytester, tiny_model):
    prompts = pytester.path / "mixed.jsonl"
    long = " ".join(["word"] * 200)
    prompts.write_text(f'{{"prompt": "short one"}}\n{{"prompt": "{long}"}}\n')
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.llem(prompts={str(prompts)!r}, num_prompts=3, max_input_tokens=16,
                          prompt_overflow="filter", max_new_tokens=2)
        def test_filtered(llem):
            llem.run()
        """
    )
    pytester.runpytest(*QUICK, "--llem-repeat=1").assert_outcomes(passed=1)
    (case,) = _record(pytester)["cases"]
    assert case["prompts"]["overflow"] == "filter"
    assert case["prompts"]["filtered"] >= 1
    assert case["prompts"]["input_tokens"]["max"] <= 16

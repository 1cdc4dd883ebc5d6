"""Workload profiles: choosing one, ``by_profile`` marker values, the shipped suites at each
profile (collected, not run), the header line, the estimate and the record's ``profile``."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from pytest_llem.config.models import CaseConfig
from pytest_llem.config.profiles import by_profile, resolve_profile_values
from pytest_llem.data.estimate import case_seconds, window_seconds
from pytest_llem.options.profile import choose_profile

pytest_plugins = ["pytester"]

SUITE = Path(__file__).resolve().parents[1] / "suites" / "test_shapes.py"
SHAPES = {"chat", "summarisation", "generation", "fixed"}
SCENARIOS = {"offline", "single_stream", "server"}

CONFTEST = """
from tests.fakes.fake_backend import FakeBackend, WallClock


def pytest_llem_backend_names():
    return ["paced"]


def pytest_llem_make_backend(name, case, progress):
    return FakeBackend(WallClock(), prefill_s=0.001, step_s=0.001) if name == "paced" else None
"""

QUICK = ["--llem-backend=paced", "--llem-meter=none", "-p", "no:cacheprovider"]


# -- by_profile ----------------------------------------------------------------------------------


def test_a_profile_left_out_takes_the_next_smaller_ones_value() -> None:
    value = by_profile(smoke=1, full=3)
    assert [value.pick(p) for p in ("smoke", "standard", "full")] == [1, 1, 3]
    with pytest.raises(ValueError, match="unknown profile 'huge'"):
        value.pick("huge")


def test_by_profile_values_resolve_inside_dicts_and_lists() -> None:
    marker = {
        "traffic": {"rate": by_profile(smoke=2, standard=8)},
        "batch_size": by_profile(smoke=[1, 4], standard=[by_profile(smoke=16, full=32), 64]),
        "seed": 3,
    }
    assert resolve_profile_values(marker, "standard") == {
        "traffic": {"rate": 8},
        "batch_size": [16, 64],
        "seed": 3,
    }
    assert resolve_profile_values(marker, "full")["batch_size"] == [32, 64]


# -- choosing the profile ------------------------------------------------------------------------


def test_an_explicit_profile_wins_and_says_where_it_came_from(tmp_path: Path) -> None:
    (tmp_path / "nvidia0").touch()
    chosen = choose_profile("full", "--llem-profile", device_files=tmp_path, environ={})
    assert (chosen.name, chosen.reason) == ("full", "--llem-profile=full")


@pytest.mark.parametrize(
    ("files", "environ", "layers", "expected", "why"),
    [
        (["nvidia0", "nvidiactl"], {}, (), "standard", "nvidia0"),
        (["nvidiactl", "null"], {}, (), "smoke", "absent"),
        ([], {}, (), "smoke", "absent"),
        (["nvidia0"], {"CUDA_VISIBLE_DEVICES": ""}, (), "smoke", "hides every GPU"),
        (["nvidia0"], {"CUDA_VISIBLE_DEVICES": "-1"}, (), "smoke", "hides every GPU"),
        (["nvidia0"], {"CUDA_VISIBLE_DEVICES": "1"}, (), "standard", "nvidia0"),
        (["nvidia0"], {}, ({"device": "cpu"},), "smoke", "device=cpu"),
        ([], {}, ({"device": "cuda"},), "standard", "device=cuda"),
        (["nvidia0"], {}, ({}, {"device": "cpu"}), "smoke", "device=cpu"),
        ([], {}, ({"device": "cuda"}, {"device": "cpu"}), "standard", "device=cuda"),
    ],
)
def test_auto_picks_standard_only_where_a_cuda_gpu_will_run(
    tmp_path: Path,
    files: list[str],
    environ: dict[str, str],
    layers: tuple[dict[str, Any], ...],
    expected: str,
    why: str,
) -> None:
    for name in files:
        (tmp_path / name).touch()
    chosen = choose_profile(
        "auto", "the default", layers=layers, device_files=tmp_path, environ=environ
    )
    assert chosen.name == expected
    assert chosen.reason.startswith("auto: ")
    assert why in chosen.reason


def test_a_missing_device_folder_means_no_gpu(tmp_path: Path) -> None:
    chosen = choose_profile(None, "x", device_files=tmp_path / "absent", environ={})
    assert chosen.name == "smoke"


def test_a_bad_profile_is_a_usage_error(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--llem-profile=huge")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--llem-profile*expected one of smoke, standard, full, auto*"])
    pytester.makeini("[pytest]\nllem_profile = tiny\n")
    assert pytester.runpytest().ret == pytest.ExitCode.USAGE_ERROR


# -- the shipped suites, collected at each profile -----------------------------------------------


def _collect(pytester: pytest.Pytester, *args: str) -> dict[str, CaseConfig]:
    """The shipped suite's items at a profile: test id -> resolved case, nothing run."""
    from pytest_llem.collection import resolve_for, sweep_case_of
    from pytest_llem.fixtures import SESSION_KEY

    shutil.copy(SUITE, pytester.path / SUITE.name)
    items, _ = pytester.inline_genitems(*args, "-p", "no:cacheprovider")
    session = items[0].config.stash[SESSION_KEY]
    return {
        item.nodeid.split("::", 1)[1]: resolve_for(item, session, {}, sweep_case_of(item))
        for item in items
    }


def _by_shape_and_scenario(cases: dict[str, CaseConfig]) -> dict[tuple[str, str], list[CaseConfig]]:
    grid: dict[tuple[str, str], list[CaseConfig]] = {}
    for case in cases.values():
        assert case.workload is not None
        grid.setdefault((case.workload, case.scenario), []).append(case)
    return grid


def test_smoke_collects_every_shape_small(pytester: pytest.Pytester) -> None:
    cases = _collect(pytester, "--llem-profile=smoke")
    grid = _by_shape_and_scenario(cases)
    assert set(grid) == {(s, c) for s in SHAPES for c in SCENARIOS}
    assert len(cases) == 16
    assert "TestChat::test_offline[chat-bs1]" in cases
    assert "TestFixed::test_server[fixed-rate4]" in cases
    for case in cases.values():
        assert case.model == "llem-tiny"
        assert case.prompts == "synthetic"
        assert case.max_input_tokens <= 128
        assert case.max_new_tokens <= 16
        assert case.num_prompts <= 4


def test_standard_collects_every_shape_in_every_scenario_with_realistic_lengths(
    pytester: pytest.Pytester,
) -> None:
    cases = _collect(pytester, "--llem-profile=standard")
    grid = _by_shape_and_scenario(cases)
    assert set(grid) == {(s, c) for s in SHAPES for c in SCENARIOS}
    for shape in SHAPES:
        assert sorted(c.batch_size for c in grid[shape, "offline"]) == [16, 64, 128]
        assert sorted(c.traffic.rate for c in grid[shape, "server"]) == [1, 4, 16]
        for case in grid[shape, "server"]:
            assert case.slo.ttft_ms is not None
            assert case.traffic.duration_s == 10
    for case in cases.values():
        assert case.max_input_tokens <= 2048
        assert case.max_new_tokens <= 512
    chat = grid["chat", "offline"][0]
    assert (chat.lengths, chat.max_input_tokens, chat.max_new_tokens) == ("sharegpt", 2048, 512)
    summarisation = grid["summarisation", "offline"][0]
    assert (summarisation.input_tokens, summarisation.min_new_tokens) == (2048, 128)
    generation = grid["generation", "offline"][0]
    assert (generation.input_tokens, generation.min_new_tokens) == (128, 512)
    assert grid["fixed", "offline"][0].num_prompts == 128


def test_a_case_in_two_profiles_keeps_its_id(pytester: pytest.Pytester) -> None:
    smoke = _collect(pytester, "--llem-profile=smoke")
    full = _collect(pytester, "--llem-profile=full")
    assert "TestGeneration::test_offline[generation-bs1]" in smoke
    assert "TestGeneration::test_offline[generation-bs1]" in full
    assert set(smoke) & set(full) >= {f"Test{s.title()}::test_single_stream[{s}]" for s in SHAPES}
    assert len(full) > len(smoke)
    full_grid = _by_shape_and_scenario(full)
    for shape in SHAPES:
        assert len(full_grid[shape, "offline"]) == 7
        assert len(full_grid[shape, "server"]) == 6
    assert {case.repeat for case in full.values()} == {5}


def test_a_long_run_prints_its_estimate_and_the_header_names_the_profile(
    pytester: pytest.Pytester,
) -> None:
    shutil.copy(SUITE, pytester.path / SUITE.name)
    standard = pytester.runpytest(
        "--collect-only", "-p", "no:cacheprovider", "--llem-profile=standard"
    )
    standard.stdout.fnmatch_lines(
        [
            "llem profile: standard (--llem-profile=standard)",
            "llem profile standard: 28 cases, estimated * min for a 7-8B model on one H100*",
        ]
    )
    minutes = re.search(r"estimated (\d+) min", standard.stdout.str())
    assert minutes is not None
    assert 15 <= int(minutes.group(1)) <= 30  # standard's budget, under the documented model
    smoke = pytester.runpytest("--collect-only", "-p", "no:cacheprovider", "--llem-profile=smoke")
    assert "estimated" not in smoke.stdout.str()


# -- the run record ------------------------------------------------------------------------------


def test_the_record_says_which_profile_ran_and_why(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        """
        import pytest
        from pytest_llem import by_profile

        @pytest.mark.llem(num_prompts=by_profile(smoke=2, standard=3), max_new_tokens=2, warmup=0)
        def test_case(llem):
            assert llem.profile == "standard"
            result = llem.run(batch_size=by_profile(smoke=1, standard=3))
            assert result.params["batch_size"] == 3
        """
    )
    pytester.makeini("[pytest]\nllem_profile = standard\n")
    result = pytester.runpytest(*QUICK)
    result.assert_outcomes(passed=1)
    record = json.loads((pytester.path / "reports" / "llem-report.json").read_text())
    assert record["profile"] == {"name": "standard", "reason": "ini option llem_profile=standard"}
    assert record["cases"][0]["params"]["num_prompts"] == 3


def test_a_budget_can_depend_on_the_profile(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        """
        import pytest
        from pytest_llem import by_profile

        @pytest.mark.llem(num_prompts=2, max_new_tokens=2, warmup=0)
        @pytest.mark.llem_budget(output_tokens_per_s_min=by_profile(smoke=0, standard=1e12))
        def test_case(llem):
            llem.run()
        """
    )
    pytester.runpytest(*QUICK, "--llem-profile=smoke").assert_outcomes(passed=1)
    failed = pytester.runpytest(*QUICK, "--llem-profile=standard")
    failed.assert_outcomes(failed=1)
    failed.stdout.fnmatch_lines(["*output_tokens_per_s*"])


# -- the estimate --------------------------------------------------------------------------------


def test_the_estimate_grows_with_the_work_and_covers_the_schedule() -> None:
    small = CaseConfig(num_prompts=8, max_new_tokens=64)
    assert case_seconds(small.model_copy(update={"num_prompts": 64})) > case_seconds(small)
    assert case_seconds(small.model_copy(update={"repeat": 6, "warmup": 0})) == pytest.approx(
        2 * case_seconds(small.model_copy(update={"repeat": 3, "warmup": 0}))
    )
    server = CaseConfig(scenario="server", traffic={"rate": 1, "duration_s": 20})
    assert window_seconds(server) >= 20

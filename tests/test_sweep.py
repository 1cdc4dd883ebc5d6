"""Sweeps through pytest: the llem_sweep marker, --llem-sweep, pruning, model reuse, order."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

pytest_plugins = ["pytester"]

QUICK = ["--llem-warmup=0", "--llem-repeat=1", "--llem-meter=none", "-p", "no:cacheprovider"]

GRID = """
import pytest

@pytest.mark.llem(num_prompts=2, min_new_tokens=2)
@pytest.mark.llem_sweep(batch_size=[1, 2, 4], max_new_tokens=[4, 8])
def test_grid(llem):
    result = llem.run()
    assert result.repetitions[0].output_tokens == 2 * result.params["max_new_tokens"]
"""


def _cases(pytester: pytest.Pytester) -> list[dict]:
    record = json.loads((pytester.path / "reports" / "llem-report.json").read_text())
    return record["cases"]


def test_six_cases_readable_ids_one_load(pytester: pytest.Pytester, tiny_model: Path):
    pytester.makepyfile(GRID)
    result = pytester.runpytest(*QUICK, "-v")
    result.assert_outcomes(passed=6)
    result.stdout.fnmatch_lines(
        [
            "*test_grid?bs1-out4? PASSED*",
            "*test_grid?bs1-out8? PASSED*",
            "*test_grid?bs2-out4? PASSED*",
            "*test_grid?bs4-out8? PASSED*",
        ]
    )
    cases = _cases(pytester)
    assert [c["sweep"] for c in cases][:2] == [
        {"batch_size": 1, "max_new_tokens": 4},
        {"batch_size": 1, "max_new_tokens": 8},
    ]
    assert [c["params"]["batch_size"] for c in cases] == [1, 1, 2, 2, 4, 4]
    assert [c["load"]["reused"] for c in cases] == [False] + [True] * 5


def test_a_combination_a_rule_forbids_is_skipped_naming_it(
    pytester: pytest.Pytester, tiny_model: Path
):
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.llem(num_prompts=1)
        @pytest.mark.llem_sweep(max_new_tokens=[4, 8], min_new_tokens=[8])
        def test_lengths(llem):
            llem.run()
        """
    )
    result = pytester.runpytest(*QUICK, "-rs", "--llem-csv")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED*invalid combination: min_new_tokens must not exceed*"])
    cases = {case["outcome"]: case for case in _cases(pytester)}
    assert sorted(cases) == ["passed", "skipped"]
    assert cases["passed"]["params"]["max_new_tokens"] == 8
    # The skipped combination is in the record too, so every report shows the whole grid.
    skipped = cases["skipped"]
    assert skipped["id"].endswith("test_lengths[out4-min8]")
    assert skipped["sweep"] == {"max_new_tokens": 4, "min_new_tokens": 8}
    assert skipped["params"]["max_new_tokens"] == 4
    assert skipped["params"]["min_new_tokens"] == 8
    assert skipped["params"]["num_prompts"] == 1
    assert skipped["backend"] == "transformers"
    assert skipped["error"] is None
    assert skipped["notes"] == [
        "invalid combination: min_new_tokens must not exceed max_new_tokens "
        "(min_new_tokens=8, max_new_tokens=4)"
    ]
    result.stdout.fnmatch_lines(
        ["*test_lengths?out4-min8?*skipped*", "*skipped test_lengths?out4-min8?: invalid comb*"]
    )
    text = (pytester.path / "reports" / "llem-report.csv").read_text()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert {row["outcome"] for row in rows} == {"passed", "skipped"}
    page = (pytester.path / "reports" / "llem-report.html").read_text()
    assert "test_lengths[out4-min8]" in page


def test_auto_takes_the_introspected_values(pytester: pytest.Pytester, tiny_model: Path):
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.llem(num_prompts=1, max_new_tokens=2)
        @pytest.mark.llem_sweep(sampling="auto")
        def test_presets(llem):
            llem.run()
        """
    )
    result = pytester.runpytest(*QUICK, "-v")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(
        ["*test_presets?deterministic?*", "*test_presets?standard?*", "*test_presets?creative?*"]
    )


def test_a_gpu_only_value_is_skipped_without_a_gpu(
    pytester: pytest.Pytester, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # whatever this machine has, hide it
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.llem(num_prompts=1, max_new_tokens=2)
        @pytest.mark.llem_sweep(dtype=["float32", "float16"])
        def test_dtypes(llem):
            llem.run()
        """
    )
    result = pytester.runpytest(*QUICK, "-rs")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED*dtype=float16 runs only on a GPU*no GPU is visible*"])
    skipped = {case["sweep"]["dtype"]: case for case in _cases(pytester)}["float16"]
    assert skipped["outcome"] == "skipped"
    assert skipped["params"]["dtype"] == "float16"
    assert "no GPU is visible" in skipped["notes"][0]


@pytest.mark.parametrize(
    ("marker", "message"),
    [
        ("batch_sz=[1, 2]", "*test_bad*unknown parameter 'batch_sz'*batch_size*"),
        ("batch_size=[1, 0]", "*test_bad*batch_size=0*greater than or equal to 1*"),
        ("dtype=['float32', 'fp8']", "*test_bad*dtype='fp8'*"),
        ("model='auto'", "*test_bad*model has no automatic sweep values*"),
        ("batch_size=[]", "*test_bad*at least one value*"),
    ],
)
def test_bad_sweeps_are_collection_errors_naming_the_test(
    pytester: pytest.Pytester, marker: str, message: str
):
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.llem_sweep({marker})
        def test_bad(llem):
            llem.run()
        """
    )
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["*ERROR collecting*", message])


def test_command_line_sweep_adds_and_replaces_axes(pytester: pytest.Pytester, tiny_model: Path):
    pytester.makepyfile(GRID)
    result = pytester.runpytest(*QUICK, "-v", "--llem-sweep", "batch_size=3")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*test_grid?bs3-out4?*", "*test_grid?bs3-out8?*"])

    pytester.makepyfile(
        test_plain="""
        import pytest

        @pytest.mark.llem(num_prompts=1, max_new_tokens=2)
        def test_one(llem):
            llem.run()
        """
    )
    result = pytester.runpytest(*QUICK, "-v", "test_plain.py", "--llem-sweep=seed=1,2")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*test_one?seed1?*", "*test_one?seed2?*"])


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("--llem-sweep=batch_sz=1,2", "*--llem-sweep batch_sz=1,2*unknown parameter 'batch_sz'*"),
        ("--llem-sweep=batch_size", "*expected KEY=V1,V2*"),
        ("--llem-sweep=batch_size=1,zero", "*batch_size='zero'*valid integer*"),
        ("--llem-backend=transformers,nope", "*unknown backend 'nope'*"),
        ("--llem-shuffle=x", "*--llem-shuffle*integer*"),
    ],
)
def test_bad_sweep_options_are_usage_errors(pytester: pytest.Pytester, option, message):
    pytester.makepyfile(GRID)
    result = pytester.runpytest(option)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_sweeping_engines_from_the_backend_option(pytester: pytest.Pytester, tiny_model: Path):
    pytester.makeconftest(
        """
        from tests.fakes.fake_backend import FakeBackend, FakeClock

        def pytest_llem_backend_names():
            return ["scripted"]

        def pytest_llem_make_backend(name, case, progress):
            return FakeBackend(FakeClock()) if name == "scripted" else None
        """
    )
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.llem(num_prompts=2, max_new_tokens=2, min_new_tokens=2)
        def test_engines(llem):
            llem.run()
        """
    )
    result = pytester.runpytest(*QUICK, "-v", "--llem-backend=transformers,scripted")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*test_engines?transformers?*", "*test_engines?scripted?*"])
    assert {c["backend"] for c in _cases(pytester)} == {"transformers", "scripted"}


def test_cases_sharing_a_load_run_together(pytester: pytest.Pytester, tiny_model: Path):
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.llem(num_prompts=1, max_new_tokens=2)
        @pytest.mark.llem_sweep(batch_size=[1, 2], dtype=["float32", "bfloat16"])
        def test_interleaved(llem):
            llem.run()
        """
    )
    result = pytester.runpytest(*QUICK)
    result.assert_outcomes(passed=4)
    cases = _cases(pytester)
    assert [c["params"]["dtype"] for c in cases] == ["float32", "float32", "bfloat16", "bfloat16"]
    assert [c["load"]["reused"] for c in cases] == [False, True, False, True]


def test_shuffle_is_seeded_recorded_and_stays_within_load_groups(
    pytester: pytest.Pytester, tiny_model: Path
):
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.llem(num_prompts=1, max_new_tokens=1, repeat=1, warmup=0)
        @pytest.mark.llem_sweep(seed=[0, 1, 2, 3, 4, 5], dtype=["float32", "bfloat16"])
        def test_many(llem):
            pass
        """
    )

    def order(*args: str) -> list[str]:
        result = pytester.runpytest("--collect-only", "-q", *args)
        return [line for line in result.outlines if "::" in line]

    plain = order()
    first, second, other = (
        order("--llem-shuffle=7"),
        order("--llem-shuffle=7"),
        order("--llem-shuffle=8"),
    )
    assert first == second != plain
    assert other != first
    assert sorted(first) == sorted(plain)
    groups = ["bfloat16" in line for line in first]
    assert groups == sorted(groups)  # every float32 case before every bfloat16 one

    pytester.makepyfile(
        test_run="""
        import pytest

        @pytest.mark.llem(num_prompts=1, max_new_tokens=1)
        def test_one(llem):
            llem.run()
    """
    )
    pytester.runpytest(*QUICK, "test_run.py", "--llem-shuffle").assert_outcomes(passed=1)
    record = json.loads((pytester.path / "reports" / "llem-report.json").read_text())
    assert isinstance(record["options"]["shuffle_seed"], int)


RUN_OVERRIDE = """
import pytest

@pytest.mark.llem(num_prompts=2, max_new_tokens=1)
def test_override(llem):
    result = llem.run(batch_size=1)
    assert result.params["batch_size"] == llem.config.batch_size
"""


def test_a_command_line_sweep_beats_run_overrides(pytester: pytest.Pytester, tiny_model: Path):
    pytester.makepyfile(RUN_OVERRIDE)
    result = pytester.runpytest(*QUICK, "-v", "--llem-sweep=batch_size=2")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*test_override?bs2? PASSED*"])
    (case,) = _cases(pytester)
    assert case["params"]["batch_size"] == 2
    assert case["sweep"] == {"batch_size": 2}
    assert any("llem.run(batch_size=1)" in note for note in case["notes"])


def test_an_ini_sweep_beats_run_overrides(pytester: pytest.Pytester, tiny_model: Path):
    pytester.makeini("[pytest]\nllem_sweep =\n    batch_size=2,3\n")
    pytester.makepyfile(RUN_OVERRIDE)
    result = pytester.runpytest(*QUICK, "-v")
    result.assert_outcomes(passed=2)
    assert [c["params"]["batch_size"] for c in _cases(pytester)] == [2, 3]


MARKER_SWEEP = """
import pytest

@pytest.mark.llem(num_prompts=2, max_new_tokens=1)
@pytest.mark.llem_sweep(batch_size=[1, 8], seed=[0, 1])
def test_swept(llem):
    llem.run()
"""


def _collected(pytester: pytest.Pytester, *args: str) -> list[str]:
    result = pytester.runpytest("--collect-only", "-q", "-p", "no:cacheprovider", *args)
    return [line.split("::", 1)[1] for line in result.outlines if "::" in line]


@pytest.mark.parametrize(
    ("ini", "args"),
    [
        ("", ["--llem-set=batch_size=2"]),
        ("llem_set =\n    batch_size=2\n", []),
        ("llem_sweep =\n    batch_size=1,8\n", ["--llem-set=batch_size=2"]),
    ],
    ids=["cli-set-over-marker-sweep", "ini-set-over-marker-sweep", "cli-set-over-ini-sweep"],
)
def test_a_single_value_from_a_higher_source_replaces_the_axis(
    pytester: pytest.Pytester, tiny_model: Path, ini: str, args: list[str]
):
    pytester.makeini(f"[pytest]\n{ini}")
    pytester.makepyfile(MARKER_SWEEP)
    # The ids name the value that runs; the two batch sizes collapse into one.
    assert _collected(pytester, *args) == ["test_swept[bs2-seed0]", "test_swept[bs2-seed1]"]
    pytester.runpytest(*QUICK, *args).assert_outcomes(passed=2)
    cases = _cases(pytester)
    assert [(c["params"]["batch_size"], c["params"]["seed"]) for c in cases] == [(2, 0), (2, 1)]
    assert [c["sweep"] for c in cases] == [
        {"batch_size": 2, "seed": 0},
        {"batch_size": 2, "seed": 1},
    ]


def test_a_run_override_that_contradicts_the_marker_sweep_fails_that_case(
    pytester: pytest.Pytester, tiny_model: Path
):
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.llem(num_prompts=2, max_new_tokens=1)
        @pytest.mark.llem_sweep(batch_size=[1, 8])
        def test_conflict(llem):
            llem.run(batch_size=1)
        """
    )
    result = pytester.runpytest(*QUICK, "-v")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*test_conflict?bs1? PASSED*",
            "*llem.run(batch_size=1) conflicts with the swept value batch_size=8 named in the "
            "test id*",
        ]
    )
    failed = [c for c in _cases(pytester) if c["outcome"] == "failed"]
    assert [c["error"]["type"] for c in failed] == ["ConfigurationError"]
    assert failed[0]["sweep"] == {"batch_size": 8}


@pytest.mark.parametrize(
    ("ini", "args", "message"),
    [
        (
            "",
            ["--llem-set=batch_size=2", "--llem-sweep=batch_size=1,8"],
            "*--llem-set and --llem-sweep both set batch_size*",
        ),
        (
            "llem_set =\n    seed=1\nllem_sweep =\n    seed=1,2\n",
            [],
            "*ini options llem_set and llem_sweep both set seed*",
        ),
    ],
)
def test_a_value_and_a_sweep_of_one_parameter_from_one_source_is_a_usage_error(
    pytester: pytest.Pytester, ini: str, args: list[str], message: str
):
    pytester.makeini(f"[pytest]\n{ini}")
    pytester.makepyfile(MARKER_SWEEP)
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_skipped_combinations_and_test_errors_reach_the_record_from_xdist_workers(
    pytester: pytest.Pytester, tiny_model: Path
):
    pytest.importorskip("xdist", reason="pytest-xdist is not installed")
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.llem(num_prompts=1)
        @pytest.mark.llem_sweep(max_new_tokens=[2, 4], min_new_tokens=[4])
        def test_lengths(llem):
            llem.run()
            assert llem.config.max_new_tokens == 2, "not the one that runs"
        """
    )
    result = pytester.runpytest(*QUICK, "-n", "2")
    result.assert_outcomes(failed=1, skipped=1)
    cases = {case["outcome"]: case for case in _cases(pytester)}
    assert sorted(cases) == ["failed", "skipped"]
    assert cases["skipped"]["sweep"] == {"max_new_tokens": 2, "min_new_tokens": 4}
    assert "invalid combination" in cases["skipped"]["notes"][0]
    assert cases["failed"]["error"]["type"] == "AssertionError"
    assert cases["failed"]["error"]["message"].startswith("not the one that runs")

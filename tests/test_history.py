"""History comparisons: the hierarchical interval, selecting the last K saved runs of a machine
and name, comparing with a history (unit, ``llem compare``, and through pytest)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from pytest_llem.cli import main
from pytest_llem.exceptions import ResultStoreError
from pytest_llem.results.compare import compare_runs, difference_interval, ratio_interval
from pytest_llem.results.gate import parse_fail_on
from pytest_llem.results.history import (
    DEFAULT_HISTORY_RUNS,
    hierarchical_medians,
    history_intervals,
    load_history,
    parse_history,
    select_history,
)
from pytest_llem.results.models import RunRecord
from pytest_llem.results.storage import machine_id, save_run
from tests.test_compare import case, run
from tests.test_gating import FAST, _run
from tests.test_gating import project as project  # the paced fake-backend project

pytest_plugins = ["pytester"]

TPS = "output_tokens_per_s"
GATE = parse_fail_on(f"{TPS}:-5%")
#: Five windows around 1.0 with a 1% spread, the same pattern in every run.
JITTER = (0.99, 1.0, 1.01, 0.995, 1.005)


def windows(level: float) -> list[float]:
    return [level * j for j in JITTER]


# --- the hierarchical bootstrap --------------------------------------------------------------


def test_runs_that_differ_widen_the_interval_beyond_a_single_runs() -> None:
    levels = (1.0, 1.1, 0.9, 1.05, 0.95)
    history = [windows(level) for level in levels]
    current = windows(1.0)
    single = ratio_interval(history[-1], current)
    assert single is not None
    ratio, low, high = history_intervals(history, current)[0] or (0.0, 0.0, 0.0)
    assert high - low > 3 * (single[2] - single[1])
    # the between-run spread of +-10% is inside it, the single run's +-1% is not
    assert low < 0.95
    assert high > 1.05
    assert ratio == pytest.approx(1.0 / 1.0)


def test_runs_that_agree_give_about_a_single_runs_interval() -> None:
    history = [windows(1.0) for _ in range(5)]
    current = windows(1.0)
    single = ratio_interval(history[-1], current)
    got = history_intervals(history, current)[0]
    assert single is not None
    assert got is not None
    assert got[2] - got[1] <= 1.5 * (single[2] - single[1])


def test_one_run_is_exactly_the_single_run_comparison() -> None:
    base, cur = windows(1.0), windows(0.9)
    assert history_intervals([base], cur) == (
        ratio_interval(base, cur),
        difference_interval(base, cur),
    )
    assert history_intervals([[], base], cur)[0] == ratio_interval(base, cur)


def test_hierarchical_medians_are_seeded_and_resample_runs() -> None:
    groups = [[1.0] * 3, [2.0] * 4]
    first = hierarchical_medians(groups)
    assert (first == hierarchical_medians(groups)).all()
    # two picks of the first run give 1; any pick of the second outweighs it (4 windows to 3)
    assert set(first.tolist()) == {1.0, 2.0}
    assert 0.15 < float((first == 1.0).mean()) < 0.35  # a quarter of the resamples


def test_too_few_windows_give_no_interval() -> None:
    assert history_intervals([[1.0], [1.1]], windows(1.0)) == (None, None)


# --- the spec and selecting runs -------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "runs", "name"),
    [
        ("history", DEFAULT_HISTORY_RUNS, None),
        ("history:3", 3, None),
        (" history:1 ", 1, None),
        ("history:4:main", 4, "main"),
    ],
)
def test_history_spec(spec: str, runs: int, name: str | None) -> None:
    parsed = parse_history(spec)
    assert parsed is not None
    assert parsed.runs == runs
    assert parsed.name == name


@pytest.mark.parametrize("spec", ["history:0", "history:x", "history:", "history:3:", "history::a"])
def test_a_bad_history_spec_says_what_is_expected(spec: str) -> None:
    with pytest.raises(ResultStoreError, match=r"history:K\[:NAME\] needs a whole number"):
        parse_history(spec)


def test_other_specs_are_not_histories() -> None:
    assert parse_history("latest") is None
    assert parse_history("historic") is None


def _saved(storage: Path, name: str, level: float, *, hostname: str = "vm", n: int = 0) -> Path:
    record = run(case("t.py::test_a", {TPS: windows(level)}), run_id=f"{name}-{n}")
    when = datetime(2024, 5, 21, 10, 0, tzinfo=timezone.utc) + timedelta(minutes=n)
    info = record.machine.model_copy(update={"hostname": hostname})
    return save_run(record.model_copy(update={"created_at": when, "machine": info}), storage, name)


def test_select_takes_the_last_k_runs_of_the_machine_and_name(tmp_path: Path) -> None:
    for n in range(6):
        _saved(tmp_path, "main", 1.0 + n / 100, n=n)
        _saved(tmp_path, "branch", 2.0, n=n)
    _saved(tmp_path, "main", 3.0, hostname="other", n=9)
    mine = machine_id(run())
    picked = select_history(tmp_path, mine, runs=3, name="main")
    assert [p.name for p in picked] == ["main"] * 3
    assert [p.counter for p in picked] == [7, 9, 11]  # oldest first, the newest three
    # without a name: the newest run's (branch, saved last)
    assert {p.name for p in select_history(tmp_path, mine, runs=10)} == {"branch"}
    assert len(select_history(tmp_path, mine, runs=10)) == 6
    with pytest.raises(ResultStoreError, match="no saved run named 'nope'"):
        select_history(tmp_path, mine, runs=3, name="nope")
    with pytest.raises(ResultStoreError, match="no saved run for machine"):
        select_history(tmp_path, "elsewhere", runs=3)


def test_load_history_reads_the_records_and_notes_a_short_one(tmp_path: Path) -> None:
    _saved(tmp_path, "main", 1.0, n=0)
    mine = machine_id(run())
    one = load_history(tmp_path, mine, runs=5, name="main")
    assert one["history"] == ()
    assert "only 1 saved run of the 5 asked for" in one["note"]
    _saved(tmp_path, "main", 1.1, n=1)
    two = load_history(tmp_path, mine, runs=5, name="main")
    assert len(two["history"]) == 1
    assert two["note"] is None
    assert two["record"].run_id == "main-1"
    assert two["label"].startswith("history of 2 runs (0001_main .. 0002_main)")


# --- comparing with a history ----------------------------------------------------------------


def _history(*levels: float) -> list[RunRecord]:
    return [
        run(case("t.py::test_a", {TPS: windows(level)}), run_id=f"r{i}")
        for i, level in enumerate(levels)
    ]


def test_a_history_that_varies_keeps_a_drop_inside_its_spread_from_regressing() -> None:
    history = _history(0.85, 1.1, 0.9, 0.95, 1.0)
    current = run(case("t.py::test_a", {TPS: windows(0.9)}), run_id="cur")
    single = compare_runs(history[-1], current, GATE)
    assert single.metrics[0].verdict == "regressed"  # 0.9 / 1.0 with a 1% window spread
    judged = compare_runs(history[-1], current, GATE, history=history[:-1])
    item = judged.metrics[0]
    assert item.verdict == "inconclusive"
    assert item.baseline_n == 25  # every run's windows
    assert judged.exit_code() == 0


def test_a_real_regression_beyond_the_historys_spread_still_regresses() -> None:
    history = _history(1.0, 1.02, 0.98, 1.01)
    current = run(case("t.py::test_a", {TPS: windows(0.7)}), run_id="cur")
    judged = compare_runs(history[-1], current, GATE, history=history[:-1])
    assert judged.metrics[0].verdict == "regressed"
    assert judged.exit_code() == 1


def _write(path: Path, record: RunRecord) -> Path:
    path.write_text(record.model_dump_json(), encoding="utf-8")
    return path


def test_llem_compare_takes_several_baselines(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    history = _history(0.85, 1.1, 0.9, 0.95, 1.0)
    bases = [str(_write(tmp_path / f"b{i}.json", r)) for i, r in enumerate(history)]
    current = _write(tmp_path / "cur.json", run(case("t.py::test_a", {TPS: windows(0.9)})))
    gate = f"--fail-on={TPS}:-5%"
    assert main(["compare", bases[-1], str(current), gate]) == 1  # one run: regressed
    capsys.readouterr()
    assert main(["compare", *bases, str(current), gate, "--format=json"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["baseline"]["label"] == "history of 5 runs (b0.json .. b4.json)"
    assert out["metrics"][0]["verdict"] == "inconclusive"
    assert "warning" not in captured.err
    elsewhere = history[0].model_copy(
        update={"machine": history[0].machine.model_copy(update={"hostname": "other"})}
    )
    _write(tmp_path / "b0.json", elsewhere)
    assert main(["compare", *bases, str(current), gate]) == 0
    assert "the baselines come from 2 machines" in capsys.readouterr().err


def test_llem_compare_needs_two_runs_and_readable_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    only = _write(tmp_path / "only.json", _history(1.0)[0])
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", str(only)])
    assert exit_info.value.code == 4
    assert "BASE [BASE ...] CURRENT" in capsys.readouterr().err
    assert main(["compare", str(only), str(tmp_path / "missing.json"), str(only)]) == 2
    assert main(["compare", str(only), str(only), "--fail-on=nonsense"]) == 4


# --- through pytest --------------------------------------------------------------------------


def test_compare_with_history_after_several_saves(
    project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = "--llem-fail-on=output_tokens_per_s:-50%"
    none = _run(project, monkeypatch, FAST, "--llem-repeat=3", "--llem-compare=history", gate)
    assert none.ret == pytest.ExitCode.USAGE_ERROR
    none.stderr.fnmatch_lines(["*--llem-compare=history: no saved run for machine*"])

    _run(project, monkeypatch, FAST, "--llem-repeat=3", "--llem-save=nightly").assert_outcomes(
        passed=1
    )
    one = _run(project, monkeypatch, FAST, "--llem-repeat=3", "--llem-compare=history:3", gate)
    assert one.ret == 0
    one.stdout.fnmatch_lines(["*only 1 saved run of the 3 asked for*"])

    for _ in range(3):
        _run(project, monkeypatch, FAST, "--llem-repeat=3", "--llem-save=nightly")
    result = _run(
        project,
        monkeypatch,
        FAST,
        "--llem-repeat=3",
        "--llem-save=nightly",
        "--llem-compare=history:3",
        gate,
    )
    assert result.ret == 0, result.stdout.str()
    result.stdout.fnmatch_lines(
        ["*compared with history of 3 runs (0002_nightly .. 0004_nightly)*", "*unchanged*"]
    )
    record = json.loads((project.path / "reports" / "llem-report.json").read_text())
    assert record["comparison"]["baseline"].startswith("history of 3 runs")
    saved = sorted((project.path / ".llem").glob("*/*_nightly_*.json"))
    ids = [json.loads(p.read_text())["run_id"] for p in saved[1:4]]
    assert record["comparison"]["history"] == ids
    (row,) = record["comparison"]["rows"]
    assert row["verdict"] == "unchanged"

    bad = _run(project, monkeypatch, FAST, "--llem-compare=history:0")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["*history:K[[]:NAME[]] needs a whole number of runs*"])

    # the pull request's own runs are saved under another name; NAME picks main's
    _run(project, monkeypatch, FAST, "--llem-repeat=3", "--llem-save=pr")
    named = _run(project, monkeypatch, FAST, "--llem-repeat=3", "--llem-compare=history:2:nightly")
    assert named.ret == 0
    named.stdout.fnmatch_lines(["*compared with history of 2 runs (0004_nightly .. 0005_nightly)*"])

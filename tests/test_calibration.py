"""Calibrating the gate: between-run spread, the A/A false-alarm rate, the regression caught
with 80% power and the recommended --llem-fail-on, on hand-built runs; ``llem calibrate``; and
``--llem-calibrate=N`` through pytest with a paced fake backend."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest

from pytest_llem.cli import main
from pytest_llem.results.calibration import (
    POWER,
    calibrate_runs,
    calibration_lines,
    detectable_regression,
    runs_of_record,
)
from pytest_llem.results.compare import compare_runs, ratio_interval
from pytest_llem.results.gate import parse_fail_on
from pytest_llem.results.models import RunRecord
from tests.test_compare import case, run
from tests.test_gating import FAST, _run
from tests.test_gating import project as project  # the paced fake-backend project

pytest_plugins = ["pytester"]

TPS = "output_tokens_per_s"
EPT = "energy_per_output_token_j"
JITTER = (0.99, 1.0, 1.01, 0.995, 1.005)


def runs_at(*levels: float, metric: str = TPS) -> list[RunRecord]:
    """One run per level: five windows of ``level`` times a 1% jitter, one case."""
    return [
        run(case("t.py::test_a", {metric: [level * j for j in JITTER]}), run_id=f"r{i}")
        for i, level in enumerate(levels)
    ]


def test_a_steady_machine_has_no_false_alarm_and_catches_just_beyond_the_threshold() -> None:
    runs = runs_at(1.0, 1.0, 1.0, 1.0)
    rules = parse_fail_on(f"{TPS}:-5%")
    (item,) = calibrate_runs(runs, rules).metrics
    assert item.runs == 4
    assert item.pairs == 12  # every ordered pair of two different runs
    assert item.false_alarms == 0
    assert item.between_run_cv == pytest.approx(0.0)
    assert item.within_run_cv == pytest.approx(0.0079, abs=0.0005)
    # equal runs: the A/A interval is the windows' own spread around 1, so a drop a little
    # beyond 5% is caught in every pair
    assert item.detectable is not None
    assert 0.05 < item.detectable < 0.08


def test_the_false_alarm_rate_is_what_the_gate_says_on_each_pair() -> None:
    runs = runs_at(1.0, 0.9, 1.05, 0.97, 1.0)
    rules = parse_fail_on(f"{TPS}:-5%")
    (item,) = calibrate_runs(runs, rules).metrics
    verdicts = [
        compare_runs(base, cur, rules).metrics[0].verdict
        for base, cur in itertools.permutations(runs, 2)
    ]
    assert item.pairs == len(verdicts) == 20
    assert item.false_alarms == verdicts.count("regressed")
    assert item.false_alarms > 0  # runs 10% apart with a 1% window spread
    assert item.false_alarm_rate == pytest.approx(item.false_alarms / 20)
    medians = [1.0, 0.9, 1.05, 0.97, 1.0]
    assert item.run_medians == pytest.approx(medians)
    mean = sum(medians) / 5
    sd = math.sqrt(sum((m - mean) ** 2 for m in medians) / 4)
    assert item.between_run_cv == pytest.approx(sd / mean)


def test_the_detectable_regression_is_caught_in_80_percent_of_scaled_pairs() -> None:
    runs = runs_at(1.0, 0.98, 1.02, 0.99, 1.01)
    rules = parse_fail_on(f"{TPS}:-5%")
    (item,) = calibrate_runs(runs, rules).metrics
    assert item.detectable is not None
    groups = [[1.0 * level * j for j in JITTER] for level in (1.0, 0.98, 1.02, 0.99, 1.01)]

    def caught(drop: float) -> float:
        hits = []
        for base, cur in itertools.permutations(groups, 2):
            got = ratio_interval(base, [v * (1 - drop) for v in cur])
            assert got is not None
            hits.append(got[2] < 0.95)
        return sum(hits) / len(hits)

    assert caught(item.detectable + 0.002) >= POWER
    assert caught(item.detectable - 0.01) < POWER


def test_a_rising_metric_scales_up() -> None:
    rule = parse_fail_on(f"{EPT}:+5%")[0]
    # exact intervals at 1: a rise just beyond 5% is caught
    assert detectable_regression(rule, [(1.0, 1.0, 1.0)] * 5) == pytest.approx(0.05)
    assert detectable_regression(rule, []) is None
    absolute = parse_fail_on(f"{EPT}:+0.5")[0]
    assert detectable_regression(absolute, [(0.0, -0.1, 0.1)] * 5) == pytest.approx(0.6)


def test_the_recommendation_keeps_false_alarms_within_the_limit() -> None:
    runs = runs_at(1.0, 0.9, 1.05, 0.97, 1.0)
    calibration = calibrate_runs(runs, parse_fail_on(f"{TPS}:-5%"))
    recommended = calibration.recommended[TPS]
    assert recommended.startswith(f"{TPS}:-")
    threshold = float(recommended.split(":-")[1].rstrip("%")) / 100
    assert threshold > 0.05  # 5% raised false alarms on these runs
    looser = parse_fail_on(recommended)
    rate = calibrate_runs(runs, looser).metrics[0].false_alarm_rate
    assert rate is not None
    assert rate <= 0.05
    assert calibration.recommendation == recommended
    lines = calibration_lines(calibration)
    assert lines[-2] == f"recommended: --llem-fail-on={recommended}"
    # what the recommended gate catches is the calibration of that gate
    caught = calibration.recommended_detectable[TPS]
    assert caught == calibrate_runs(runs, looser).metrics[0].detectable
    assert caught is not None
    assert lines[-1] == (
        f"  it catches in 80% of the A/A pairs a regression of: {TPS} {caught * 100:.1f}%"
    )
    assert any("t.py::test_a" in line and "/20" in line for line in lines)


def test_a_metric_that_cannot_be_calibrated_says_why() -> None:
    runs = [run(case("t.py::test_a", {TPS: [1.0, 1.1]}), run_id=f"r{i}") for i in range(3)]
    calibration = calibrate_runs(runs, parse_fail_on(f"{TPS}:-5%"))
    (item,) = calibration.metrics
    assert item.pairs == 0
    assert item.false_alarm_rate is None
    assert item.detectable is None
    assert item.note is not None
    assert "no A/A pair" in item.note
    assert calibration.recommendation is None
    assert calibration_lines(calibration)[-1].startswith("recommended: nothing can be gated")


def test_runs_of_a_calibrated_record() -> None:
    first, second, third = runs_at(1.0, 0.9, 1.1)
    extra = [second.cases[0].repetitions, third.cases[0].repetitions]
    record = first.model_copy(
        update={"cases": [first.cases[0].model_copy(update={"calibration_runs": extra})]}
    )
    runs = runs_of_record(record)
    assert len(runs) == 3
    values = [[r.values[TPS] for r in rec.cases[0].repetitions] for rec in runs]
    assert values[1] == [0.9 * j for j in JITTER]
    assert runs_of_record(first) == [first]


# --- llem calibrate --------------------------------------------------------------------------


def _write(tmp_path: Path, records: list[RunRecord]) -> list[str]:
    paths = []
    for i, record in enumerate(records):
        path = tmp_path / f"run{i}.json"
        path.write_text(record.model_dump_json(), encoding="utf-8")
        paths.append(str(path))
    return paths


def test_llem_calibrate_prints_json_and_a_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    paths = _write(tmp_path, runs_at(1.0, 0.9, 1.05, 0.97, 1.0))
    assert main(["calibrate", *paths, f"--fail-on={TPS}:-5%", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["runs"] == 5
    assert out["fail_on"] == f"{TPS}:-5%"
    (metric,) = out["metrics"]
    assert metric["pairs"] == 20
    assert out["recommendation"].startswith(f"{TPS}:-")
    assert main(["calibrate", *paths, f"--fail-on={TPS}:-5%"]) == 0
    assert "recommended: --llem-fail-on=" in capsys.readouterr().out


def test_llem_calibrate_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    paths = _write(tmp_path, runs_at(1.0, 1.0))
    assert main(["calibrate", paths[0]]) == 4  # one plain run: nothing to pair
    assert "give two or more runs" in capsys.readouterr().err
    assert main(["calibrate", *paths, "--fail-on=nonsense"]) == 4
    assert main(["calibrate", paths[0], str(tmp_path / "missing.json")]) == 2
    broken = tmp_path / "broken.json"
    broken.write_text("{", encoding="utf-8")
    assert main(["calibrate", paths[0], str(broken)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err


# --- --llem-calibrate through pytest ---------------------------------------------------------


def test_calibrate_runs_each_case_n_times_and_reports(
    project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    result = _run(
        project,
        monkeypatch,
        FAST,
        "--llem-repeat=3",
        "--llem-calibrate=3",
        "--llem-fail-on=output_tokens_per_s:-5%",
    )
    assert result.ret == 0, result.stdout.str()
    result.stdout.fnmatch_lines(
        [
            "*llem calibration*",
            "calibration over 3 runs, gate output_tokens_per_s:-5%*",
            "*test_throughput*output_tokens_per_s:-5%*3*/6*",
            "recommended: --llem-fail-on=*",
        ]
    )
    path = project.path / "reports" / "llem-report.json"
    record = json.loads(path.read_text())
    (case_record,) = record["cases"]
    assert len(case_record["repetitions"]) == 3
    assert [len(r) for r in case_record["calibration_runs"]] == [3, 3]
    calibration = record["calibration"]
    assert calibration["runs"] == 3
    (metric,) = calibration["metrics"]
    assert metric["pairs"] == 6
    # the record alone gives the same calibration outside pytest
    capsys.readouterr()
    assert main(["calibrate", str(path), "--fail-on=output_tokens_per_s:-5%", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"][0]["pairs"] == 6


def test_calibrate_needs_two_runs(project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch):
    result = _run(project, monkeypatch, FAST, "--llem-calibrate=1")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--llem-calibrate*expected a number of runs, 2 <= N <= 100*"])


def test_a_few_quiet_pairs_do_not_talk_the_threshold_down() -> None:
    # two runs 25% apart whose windows are so noisy that neither A/A pair regresses at 1%:
    # the normal model of the between-run spread still keeps the recommendation high
    noisy = (0.85, 0.92, 1.0, 1.08, 1.15)
    runs = [
        run(case("t.py::test_a", {TPS: [level * j for j in noisy]}), run_id=f"r{i}")
        for i, level in enumerate((1.0, 1.25))
    ]
    calibration = calibrate_runs(runs, parse_fail_on(f"{TPS}:-1%"))
    (item,) = calibration.metrics
    assert item.false_alarms == 0
    assert item.between_run_cv is not None
    assert item.half_width is not None
    floor = 1.6449 * math.sqrt(2) * item.between_run_cv - item.half_width
    assert floor > 0.1
    recommended = calibration.recommended[TPS]
    assert float(recommended.split(":-")[1].rstrip("%")) / 100 >= floor
    assert any(
        "2 runs: a false-alarm rate from so few A/A pairs is rough" in n for n in calibration.notes
    )


def test_a_metric_whose_intervals_are_too_wide_to_catch_anything_is_left_out() -> None:
    wild = (0.2, 0.6, 1.0, 1.8, 3.0)
    runs = [run(case("t.py::test_a", {TPS: list(wild)}), run_id=f"r{i}") for i in range(5)]
    calibration = calibrate_runs(runs, parse_fail_on(f"{TPS}:-5%"))
    (item,) = calibration.metrics
    assert item.false_alarms == 0  # identical runs never disagree
    assert TPS not in calibration.recommended
    assert any("no regression up to 50% is caught" in note for note in calibration.notes)

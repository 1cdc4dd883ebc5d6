"""Sharded sessions end to end (pytester, a fake engine): three shards of a suite with three
model-load groups, run separately and merged, give the unsharded case list with one load per
group; a merge with a shard missing fails naming it; ``--allow-partial`` marks the record."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from pytest_llem.cli import main
from pytest_llem.report.loading import merge_runs
from pytest_llem.report.terminal import summary_lines
from pytest_llem.results.compare import compare_runs
from pytest_llem.results.gate import parse_fail_on
from pytest_llem.results.store import read_run_record

pytest_plugins = ["pytester"]

QUICK = ["-p", "no:cacheprovider", "--llem-warmup=0", "--llem-repeat=1", "--llem-baseline-s=0"]

CONFTEST = """
import time

from tests.fakes.fake_backend import FakeBackend, FakeClock
from tests.fakes.fake_meter import FakeMeter

LOADS = {loads!r}


class Counted(FakeBackend):
    def __init__(self, model):
        super().__init__(FakeClock(), prefill_s=0.0, step_s=0.0)
        self.model = model

    def load(self):
        with open(LOADS, "a") as f:
            f.write(self.model + "\\n")
        return super().load()


def pytest_llem_backend_names():
    return ["counted"]


def pytest_llem_meter_names():
    return ["steady"]


def pytest_llem_make_backend(name, case, progress):
    return Counted(case.model) if name == "counted" else None


def pytest_llem_make_meter(name, config, options):
    if name == "steady":
        return FakeMeter("steady", time.perf_counter, power_w={{"cpu": 10.0}})
    return None
"""

SUITE = """
import pytest

pytestmark = pytest.mark.llem(backend="counted", max_new_tokens=2, num_prompts=2)

@pytest.mark.llem(model="fake-a")
@pytest.mark.llem_sweep(batch_size=[1, 2])
def test_a(llem):
    llem.run()

@pytest.mark.llem(model="fake-b")
@pytest.mark.llem_sweep(batch_size=[1, 2, 4])
def test_b(llem):
    llem.run()

@pytest.mark.llem(model="fake-c")
def test_c(llem):
    llem.run()

def test_plain():
    pass
"""


def _suite(pytester: pytest.Pytester) -> Path:
    loads = pytester.path / "loads.txt"
    pytester.makeconftest(CONFTEST.format(loads=str(loads)))
    pytester.makepyfile(test_suite=SUITE)
    return loads


def _run(pytester: pytest.Pytester, report: str, *args: str) -> pytest.RunResult:
    return pytester.runpytest(*QUICK, "--llem-meter=steady", f"--llem-report-dir={report}", *args)


def _ids(path: Path) -> list[str]:
    return sorted(case["id"] for case in json.loads(path.read_text())["cases"])


@pytest.fixture
def shards(pytester: pytest.Pytester) -> dict[str, Any]:
    """The unsharded run's case ids, and three shards run one after the other."""
    loads = _suite(pytester)
    whole = _run(pytester, "whole")
    whole.assert_outcomes(passed=7)
    expected = _ids(pytester.path / "whole" / "llem-report.json")
    loads.unlink()
    deselected = 0
    for k in (1, 2, 3):
        result = _run(pytester, f"shard{k}", f"--llem-shard={k}/3")
        assert result.ret == 0
        deselected += result.parseoutcomes().get("deselected", 0)
    return {"expected": expected, "loads": loads, "deselected": deselected}


def _paths(pytester: pytest.Pytester, *ks: int) -> list[str]:
    return [str(pytester.path / f"shard{k}" / "llem-report.json") for k in ks]


def test_three_shards_merge_into_the_unsharded_case_list(
    pytester: pytest.Pytester, shards: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    merged = pytester.path / "merged.json"
    assert main(["merge", *_paths(pytester, 1, 2, 3), "-o", str(merged)]) == 0
    assert _ids(merged) == shards["expected"]
    # every model loaded once in the whole session
    assert sorted(shards["loads"].read_text().split()) == ["fake-a", "fake-b", "fake-c"]
    # 7 tests, each run by one shard: deselected by the two others
    assert shards["deselected"] == 14
    record = read_run_record(merged)
    assert record.partial is None
    assert [s.label for s in record.shards] == ["1/3", "2/3", "3/3"]
    assert len({s.assignment_digest for s in record.shards}) == 1
    assert all(case.machine is not None for case in record.cases)
    # a shard's own record holds its manifest: its ids, and what the whole session collected
    one = read_run_record(Path(_paths(pytester, 1)[0]))
    assert one.shard is not None
    assert one.shard.collection_size == 6
    assert sorted(case.id for case in one.cases) == one.shard.ids
    assert one.shard.costs == "estimate"
    assert any(line.startswith("shard 1/3: ") for line in summary_lines(one))
    # a merged record compares like any other: with itself, every case matched, no problem
    comparison = compare_runs(record, record, parse_fail_on("energy_j:+5%"), gate=False)
    assert not comparison.problems
    assert not comparison.new
    assert not comparison.gone
    assert len(comparison.metrics) == 6


def test_a_merge_with_a_shard_missing_fails_naming_it(
    pytester: pytest.Pytester, shards: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    merged = pytester.path / "merged.json"
    assert main(["merge", *_paths(pytester, 1, 3), "-o", str(merged)]) == 2
    assert "shard 2/3 missing" in capsys.readouterr().err
    assert not merged.exists()
    assert main(["merge", *_paths(pytester, 1, 2, 2, 3), "-o", str(merged)]) == 2
    assert "shard 2/3 given twice" in capsys.readouterr().err


def test_allow_partial_marks_the_merged_record(
    pytester: pytest.Pytester, shards: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    merged = pytester.path / "merged.json"
    assert main(["merge", *_paths(pytester, 1, 3), "-o", str(merged), "--allow-partial"]) == 0
    assert "shard 2/3 missing" in capsys.readouterr().err
    record = read_run_record(merged)
    assert record.partial is not None
    assert record.partial.missing_shards == ["2/3"]
    assert record.partial.expected_cases == 6
    assert record.partial.present_cases == len(record.cases) < 6
    assert any("shard 2/3 missing" in line for line in summary_lines(record))
    html = pytester.path / "merged.html"
    assert main(["report", str(merged), "--html", str(html)]) == 0
    assert "shard 2/3 missing" in html.read_text()
    whole = pytester.path / "whole" / "llem-report.json"
    assert main(["compare", str(whole), str(merged)]) == 0
    assert "current run is a partial record: shard 2/3 missing" in capsys.readouterr().err
    # under a gate, a partial run fails it
    assert main(["compare", str(whole), str(merged), "--fail-on", "energy_j:+50%"]) == 1


def test_shards_of_different_collections_are_refused(
    pytester: pytest.Pytester, shards: dict[str, Any]
) -> None:
    records = [read_run_record(Path(p)) for p in _paths(pytester, 1, 2, 3)]
    assert records[1].shard is not None
    records[1].shard.collection_digest = "0" * 64
    with pytest.raises(Exception, match=r"shard 2/3 \(b\) collected other cases"):
        merge_runs(records, labels=["a", "b", "c"])
    records[1] = read_run_record(Path(_paths(pytester, 2)[0]))
    assert records[1].shard is not None
    records[1].shard.commit = "f" * 40
    with pytest.raises(Exception, match=r"shard 2/3 \(b\) ran commit f+"):
        merge_runs(records, labels=["a", "b", "c"])
    plain = read_run_record(pytester.path / "whole" / "llem-report.json")
    with pytest.raises(Exception, match="whole is not a shard"):
        merge_runs([records[0], plain], labels=["a", "whole"])


def test_bad_shard_values_are_usage_errors(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    _suite(pytester)
    for bad in ("0/3", "4/3", "1/0", "x"):
        result = pytester.runpytest(f"--llem-shard={bad}")
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines([f"*--llem-shard*expected K/N with 1 <= K <= N*{bad}*"])
    monkeypatch.setenv("LLEM_SHARD", "5/2")
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*environment variable LLEM_SHARD*expected K/N*"])


def test_the_environment_and_the_ini_give_the_shard_and_the_command_line_wins(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    _suite(pytester)
    pytester.makeini("[pytest]\nllem_shard = 1/1\n")
    result = _run(pytester, "ini", "--collect-only")
    assert result.parseoutcomes().get("deselected", 0) == 0
    monkeypatch.setenv("LLEM_SHARD", "2/2")
    by_env = _run(pytester, "env", "--collect-only", "-q").stdout.lines
    by_cli = _run(pytester, "cli", "--collect-only", "-q", "--llem-shard=1/2").stdout.lines
    env_ids = {line for line in by_env if "::" in line}
    cli_ids = {line for line in by_cli if "::" in line}
    assert not (pytester.path / "cli").exists()  # collecting only writes no record
    assert env_ids
    assert cli_ids
    assert not env_ids & cli_ids


def _shard_ids(pytester: pytest.Pytester, report: str) -> list[str]:
    assert _run(pytester, report, "--llem-shard=1/2").ret == 0
    record = read_run_record(pytester.path / report / "llem-report.json")
    assert record.shard is not None
    return record.shard.ids


def test_past_durations_balance_the_shards(pytester: pytest.Pytester) -> None:
    """A saved run of the suite gives each case its measured seconds; the manifest says so."""
    _suite(pytester)
    # by the estimate, the three-case group is the largest and goes to shard 1
    assert all("test_b" in case for case in _shard_ids(pytester, "before"))
    _run(pytester, "saved", "--llem-save=past").assert_outcomes(passed=7)
    (saved,) = (pytester.path / ".llem").glob("*/0001_past_*.json")
    data = json.loads(saved.read_text())
    for case in data["cases"]:  # the past run says test_c took far longer than the others
        if case["id"].endswith("::test_c"):
            case["repetitions"][0]["duration_s"] = 1000.0
    saved.write_text(json.dumps(data))
    assert _shard_ids(pytester, "after") == ["test_suite.py::test_c"]
    record = read_run_record(pytester.path / "after" / "llem-report.json")
    assert record.shard is not None
    assert "0001_past_" in record.shard.costs


def test_a_shard_under_xdist_runs_the_same_cases_and_records_its_manifest(
    pytester: pytest.Pytester,
) -> None:
    pytest.importorskip("xdist", reason="pytest-xdist is not installed")
    loads = _suite(pytester)
    _run(pytester, "serial", "--llem-shard=2/3").assert_outcomes(passed=2, deselected=5)
    serial = read_run_record(pytester.path / "serial" / "llem-report.json")
    loads.unlink()
    result = _run(pytester, "parallel", "--llem-shard=2/3", "-n", "2")
    result.assert_outcomes(passed=2)
    parallel = read_run_record(pytester.path / "parallel" / "llem-report.json")
    assert sorted(c.id for c in parallel.cases) == sorted(c.id for c in serial.cases)
    assert parallel.shard is not None
    assert serial.shard is not None
    assert parallel.shard.ids == serial.shard.ids
    assert parallel.shard.assignment_digest == serial.shard.assignment_digest
    # the group stays whole on one worker, which loads its model once
    assert len(loads.read_text().split()) == 1


def test_each_case_keeps_the_machine_of_its_shard(
    pytester: pytest.Pytester, shards: dict[str, Any]
) -> None:
    records = [read_run_record(Path(p)) for p in _paths(pytester, 1, 2, 3)]
    records[1].machine = records[1].machine.model_copy(update={"hostname": "node2"})
    merged = merge_runs(records, labels=["a", "b", "c"])
    hosts = {case.id: case.machine.hostname for case in merged.cases if case.machine}
    assert len(hosts) == len(merged.cases)
    assert {hosts[case.id] for case in records[1].cases} == {"node2"}
    assert {hosts[case.id] for case in records[0].cases} == {records[0].machine.hostname}
    assert {m.hostname for m in merged.machines} == {"node2", records[0].machine.hostname}


def test_a_case_recorded_by_two_shards_is_refused(
    pytester: pytest.Pytester, shards: dict[str, Any]
) -> None:
    records = [read_run_record(Path(p)) for p in _paths(pytester, 1, 2, 3)]
    stray = records[0].cases[0].model_copy()
    records[2].cases.append(stray)
    with pytest.raises(Exception, match=rf"case {re.escape(stray.id)} is in shard 1/3 and"):
        merge_runs(records, labels=["a", "b", "c"])


def test_more_shards_than_groups_still_write_every_shards_record(
    pytester: pytest.Pytester, capsys: pytest.CaptureFixture[str]
) -> None:
    _suite(pytester)
    for k in range(1, 6):
        # an empty share is the shard's whole job done, not an empty selection (exit 5)
        assert _run(pytester, f"shard{k}", f"--llem-shard={k}/5").ret == 0
    empty = read_run_record(Path(_paths(pytester, 5)[0]))
    assert empty.shard is not None
    assert empty.shard.ids == []
    assert empty.cases == []
    merged = pytester.path / "merged.json"
    assert main(["merge", *_paths(pytester, 1, 2, 3, 4, 5), "-o", str(merged)]) == 0
    assert len(read_run_record(merged).cases) == 6


def test_a_shard_of_nothing_at_all_still_exits_5(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_plain="def helper():\n    pass\n")
    result = pytester.runpytest("--llem-shard=1/2", "--llem-report-dir=nothing")
    assert result.ret == pytest.ExitCode.NO_TESTS_COLLECTED

"""The run recorder's pieces on their own: cases read back from test reports, the error of a
failed test, the case of an interrupted test, the run record assembled at session end and the
terminal summary. End to end through pytest: test_journal.py, test_outputs.py, test_gating.py."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pytest_llem.finish import Finish, run_record, with_compare_baseline, write_summary
from pytest_llem.fixtures import CASE_PROPERTY
from pytest_llem.recorder import cases_from, failure_of, interrupted_case
from pytest_llem.results.models import CaseRecord, ProfileRecord


def _report(outcome: str, *properties: tuple[str, object], longrepr: Any = None) -> Any:
    return pytest.TestReport(
        nodeid="test_x.py::test_x",
        location=("test_x.py", 0, "test_x"),
        keywords={},
        outcome=outcome,  # type: ignore[arg-type]
        longrepr=longrepr,
        when="call",
        user_properties=list(properties),
    )


def _case(case_id: str, outcome: str = "passed") -> dict[str, Any]:
    return CaseRecord(id=case_id, name=case_id, outcome=outcome).model_dump(mode="json")


@pytest.mark.parametrize(
    ("test_outcome", "recorded"),
    [("passed", "passed"), ("failed", "failed"), ("skipped", "skipped")],
)
def test_a_passed_case_takes_the_tests_outcome(test_outcome: str, recorded: str) -> None:
    report = _report(test_outcome, (CASE_PROPERTY, _case("a")), ("other", {"id": "b"}))
    (case,) = cases_from(report)
    assert (case.id, case.outcome) == ("a", recorded)


def test_a_case_that_did_not_pass_keeps_its_own_outcome() -> None:
    report = _report("failed", (CASE_PROPERTY, _case("a", "error")), (CASE_PROPERTY, "not a dict"))
    assert [case.outcome for case in cases_from(report)] == ["error"]


def test_the_failure_is_the_first_line_of_the_crash_message() -> None:
    try:
        raise AssertionError("assert 8.3 < 0\n +  where 8.3 = median")
    except AssertionError:
        excinfo = pytest.ExceptionInfo.from_current()
    crash = SimpleNamespace(reprcrash=SimpleNamespace(message="AssertionError: assert 8.3 < 0"))
    error = failure_of(_report("failed", longrepr=crash), excinfo)
    assert (error.type, error.message) == ("AssertionError", "assert 8.3 < 0")
    error = failure_of(_report("failed"), excinfo)  # no crash line: the exception itself
    assert error.message == "assert 8.3 < 0"


def test_only_a_running_llem_test_without_a_case_is_marked_interrupted() -> None:
    session: Any = SimpleNamespace(llem_items={"t.py::a", "t.py::b"}, cases=[])
    case = interrupted_case("t.py::a", session)
    assert case is not None
    assert (case.id, case.name, case.outcome) == ("t.py::a", "a", "error")
    assert case.error is not None
    assert case.error.type == "KeyboardInterrupt"
    assert interrupted_case(None, session) is None
    assert interrupted_case("t.py::other", session) is None  # not an llem test
    session.cases.append(CaseRecord(id="t.py::b", name="b"))
    assert interrupted_case("t.py::b", session) is None  # its case is recorded already


def _session(**fields: Any) -> Any:
    profile = ProfileRecord(name="full", reason="--llem-profile=full")
    given = {"options": SimpleNamespace(given={"repeat": 1}, store=None, profile=profile)}
    state = {
        "record": None,
        "store_error": None,
        "journal_error": None,
        "finish": None,
        "shard": None,
    }
    return SimpleNamespace(**{**given, **state, "journal": None, **fields})


def test_the_record_holds_the_sessions_cases_and_this_machine(tmp_path: Path) -> None:
    from datetime import datetime, timezone

    started = datetime(2026, 1, 2, tzinfo=timezone.utc)
    cases = [CaseRecord(id="a", name="a"), CaseRecord(id="b", name="b")]
    session = _session(run_id="r1", started_at=started, cases=cases, baseline=None)
    record = run_record(session, root=tmp_path)
    assert (record.run_id, record.created_at, record.options) == ("r1", started, {"repeat": 1})
    assert [case.id for case in record.cases] == ["a", "b"]
    assert record.profile == ProfileRecord(name="full", reason="--llem-profile=full")
    assert record.finished_at is not None
    assert record.finished_at >= started
    assert record.machine.hostname


def test_without_a_session_baseline_the_first_case_baseline_is_the_runs(tmp_path: Path) -> None:
    from datetime import datetime, timezone

    from pytest_llem.results.models import BaselineRecord

    def idle(seconds: float) -> BaselineRecord:
        return BaselineRecord(taken_at=datetime.now(timezone.utc), seconds=seconds, cached=False)

    cases = [
        CaseRecord(id="a", name="a"),
        CaseRecord(id="b", name="b", baseline=idle(5.0)),
        CaseRecord(id="c", name="c", baseline=idle(7.0)),
    ]
    started = datetime.now(timezone.utc)
    session = _session(run_id="r", started_at=started, cases=cases, baseline=None)
    record = run_record(session, root=tmp_path)
    assert record.baseline is not None
    assert record.baseline.seconds == 5.0  # measured on xdist workers: each case carries its own
    session.baseline = SimpleNamespace(record=idle(3.0))
    record = run_record(session, root=tmp_path)
    assert record.baseline is not None
    assert record.baseline.seconds == 3.0


def test_nothing_to_compare_leaves_the_options_as_they_are(tmp_path: Path) -> None:
    options: Any = SimpleNamespace(store=None)
    assert with_compare_baseline(options, root=tmp_path) is options
    options = SimpleNamespace(store=SimpleNamespace(compare=None))
    assert with_compare_baseline(options, root=tmp_path) is options


class _Reporter:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def write_sep(self, sep: str, title: str, **markup: bool) -> None:
        self.lines.append(("sep", title))

    def write_line(self, line: str, **markup: bool) -> None:
        self.lines.append(("red" if markup.get("red") else "yellow" if markup else "", line))


def test_a_session_that_recorded_nothing_prints_nothing() -> None:
    reporter = _Reporter()
    write_summary(reporter, _session())
    assert reporter.lines == []


def test_a_failed_store_is_printed_in_red() -> None:
    reporter = _Reporter()
    write_summary(reporter, _session(store_error="cannot write reports/x.json"))
    assert reporter.lines == [
        ("sep", "llem benchmark summary"),
        ("red", "llem: cannot write reports/x.json"),
    ]


def test_the_finish_lists_paths_comparison_problems_and_breaches(tmp_path: Path) -> None:
    finish = Finish(
        lines=["compared with base.json"],
        warnings=["llem: elsewhere"],
        errors=["llem: cannot save"],
        breaches=["a: energy +9%"],
        paths={"record": tmp_path / "r.json", "html": tmp_path / "r.html"},
    )
    reporter = _Reporter()
    write_summary(reporter, _session(store_error="x", finish=finish))
    assert ("", f"llem run record: {tmp_path / 'r.json'}") in reporter.lines
    assert ("", f"llem html: {tmp_path / 'r.html'}") in reporter.lines
    seps = [text for kind, text in reporter.lines if kind == "sep"]
    assert seps == ["llem benchmark summary", "llem comparison", "llem gate failed"]
    assert ("yellow", "llem: elsewhere") in reporter.lines
    assert ("red", "llem: cannot save") in reporter.lines
    assert reporter.lines[-1] == ("red", "a: energy +9%")

"""The run recorder: collects the cases each test recorded from its reports, journals them as
they arrive, and at the end of the session hands them to ``finish`` for the run record.

``RunRecorder`` is a plugin object that ``plugin.pytest_configure`` registers, so its methods
are pytest hooks that see the session state. Cases travel on the test reports
(``user_properties``), which is how they reach the controller from xdist workers; only the
controller journals them and writes the record.
"""

from __future__ import annotations

import logging
from collections.abc import Generator
from typing import Any

import pytest

from pytest_llem.exceptions import ResultStoreError
from pytest_llem.finish import finish_run, run_record, write_summary
from pytest_llem.fixtures import CASE_PROPERTY, record_test_failure, skipped_sweep_case
from pytest_llem.results.journal import Journal, journal_path
from pytest_llem.results.models import CaseError, CaseRecord
from pytest_llem.session import LlemSession

__all__ = ["RECORDER_NAME", "RunRecorder", "cases_from", "failure_of", "interrupted_case"]

logger = logging.getLogger("pytest_llem")

#: The name the recorder is registered under with pytest's plugin manager.
RECORDER_NAME = "llem-run-recorder"


class RunRecorder:
    """Collects recorded cases from test reports and writes the run record at session end.

    Registered as a plugin object in ``pytest_configure`` so its hooks see the session state.
    """

    def __init__(self, config: pytest.Config, session: LlemSession) -> None:
        self.config = config
        self.session = session
        self.running: str | None = None

    def pytest_runtest_logstart(self, nodeid: str) -> None:
        """Remember the running test, to mark it if the session is interrupted."""
        self.running = nodeid

    def pytest_runtest_logfinish(self, nodeid: str) -> None:
        """The test finished: nothing to mark."""
        self.running = None

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        """Put what the record needs on the report, where the process that ran the test (an
        xdist worker, say) hands it on: a skipped sweep combination's case, and the error of a
        test that failed after its cases were recorded."""
        report = yield
        if report.when == "setup" and report.skipped:
            skipped = skipped_sweep_case(item, self.session)
            if skipped is not None:
                report.user_properties.append((CASE_PROPERTY, skipped))
        elif report.when == "call" and report.failed and call.excinfo is not None:
            record_test_failure(report.user_properties, failure_of(report, call.excinfo))
        return report

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """Take the cases a test recorded, with the test's outcome, and journal them."""
        if report.when != "call" and not (report.when == "setup" and report.skipped):
            return
        cases = cases_from(report)
        self.session.cases.extend(cases)
        if cases and not hasattr(self.config, "workerinput"):
            self._journal(cases)

    def _journal(self, cases: list[CaseRecord]) -> None:
        llem_session = self.session
        if llem_session.journal_error is not None:
            return  # a journal with a hole in it would pass for the whole run
        try:
            if llem_session.journal is None:
                path = journal_path(
                    llem_session.options.report_dir, llem_session.started_at, llem_session.run_id
                )
                llem_session.journal = Journal(path)
                llem_session.journal.start(
                    run_id=llem_session.run_id,
                    created_at=llem_session.started_at,
                    options=llem_session.options.given,
                    profile=getattr(llem_session.options, "profile", None),
                )
            for case in cases:
                llem_session.journal.append(case)
        except OSError as e:
            where = llem_session.journal.path if llem_session.journal is not None else "?"
            llem_session.journal_error = f"cannot write the journal {where}: {e}"
            logger.warning("llem: %s", llem_session.journal_error)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        """Write the run record (not on xdist workers) and release backend and meters."""
        llem_session = self.session
        if session.exitstatus == pytest.ExitCode.INTERRUPTED:
            case = interrupted_case(self.running, llem_session)
            if case is not None:
                llem_session.cases.append(case)
        if llem_session.journal is not None:
            llem_session.journal.close()
        store = llem_session.options.store
        # a gate must judge a run without llem cases too (every baseline case is gone)
        comparing = store is not None and store.compare_baseline is not None
        try:
            if (llem_session.cases or comparing) and not hasattr(self.config, "workerinput"):
                record = run_record(llem_session, root=self.config.rootpath)
                llem_session.record = record
                llem_session.finish = finish_run(record, llem_session.options)
                if llem_session.finish.failed and session.exitstatus == 0:
                    session.exitstatus = pytest.ExitCode.TESTS_FAILED
        except ResultStoreError as e:
            llem_session.store_error = str(e)
            if session.exitstatus == 0:
                session.exitstatus = pytest.ExitCode.TESTS_FAILED
        finally:
            llem_session.close()

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        """The summary table, one row per case, and where the run record is."""
        write_summary(terminalreporter, self.session)


def interrupted_case(running: str | None, session: LlemSession) -> CaseRecord | None:
    """The error case of the llem test that ran when the session was interrupted, or None when
    no llem test ran or it had recorded its case already."""
    if running is None or running not in session.llem_items:
        return None
    if any(case.id == running for case in session.cases):
        return None
    return CaseRecord(
        id=running,
        name=running.rsplit("::", 1)[-1],
        outcome="error",
        error=CaseError(
            type="KeyboardInterrupt",
            message="the session was interrupted while this case ran",
        ),
    )


def failure_of(
    report: pytest.TestReport, excinfo: pytest.ExceptionInfo[BaseException]
) -> CaseError:
    """The exception that failed a test, as the report shows it: its type and the first line
    of the crash message (``assert 8.3 < 0``)."""
    kind = excinfo.typename
    crash = getattr(report.longrepr, "reprcrash", None)
    text = str(crash.message if crash is not None else excinfo.value).strip()
    first = text.splitlines()[0] if text else ""
    return CaseError(type=kind, message=first.removeprefix(f"{kind}: "))


def cases_from(report: pytest.TestReport) -> list[CaseRecord]:
    """The cases a test report carries, each with the test's outcome when the test did not pass
    after recording a passed case (an assertion on the result failed, say)."""
    cases = []
    for name, value in report.user_properties:
        if name != CASE_PROPERTY or not isinstance(value, dict):
            continue
        case = CaseRecord.model_validate(value)
        if case.outcome == "passed" and report.outcome != "passed":
            case.outcome = "failed" if report.outcome == "failed" else "skipped"
        cases.append(case)
    return cases

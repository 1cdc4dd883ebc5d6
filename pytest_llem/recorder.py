"""The run recorder: collects the cases each test recorded from its reports, journals them as
they arrive, and at the end of the session hands them to ``finish`` for the run record.

``RunRecorder`` is a plugin object that ``plugin.pytest_configure`` registers, so its methods
are pytest hooks that see the session state. Cases travel on the test reports
(``user_properties``), which is how they reach the controller from xdist workers; only the
controller journals them and writes the record. A worker also sends each llem case's facts as
it starts (on the setup report), so that when the worker dies while running it, the controller
records the case as an error from those facts (``pytest_handlecrashitem``).
"""

from __future__ import annotations

import logging
import signal
import subprocess
from collections.abc import Generator
from typing import Any

import pytest

from pytest_llem.exceptions import ResultStoreError
from pytest_llem.finish import finish_run, run_record, write_summary
from pytest_llem.fixtures import (
    CASE_PROPERTY,
    CASE_START_PROPERTY,
    record_test_failure,
    skipped_sweep_case,
    started_case,
)
from pytest_llem.results.journal import Journal, journal_path
from pytest_llem.results.models import CaseError, CaseRecord
from pytest_llem.session import LlemSession
from pytest_llem.shard_session import nothing_assigned

__all__ = [
    "RECORDER_NAME",
    "WORKER_CRASHED",
    "RunRecorder",
    "cases_from",
    "crashed_case",
    "failure_of",
    "interrupted_case",
    "worker_exit",
]

logger = logging.getLogger("pytest_llem")

#: The name the recorder is registered under with pytest's plugin manager.
RECORDER_NAME = "llem-run-recorder"
#: The error type of a case whose xdist worker died while running it.
WORKER_CRASHED = "WorkerCrashed"


class RunRecorder:
    """Collects recorded cases from test reports and writes the run record at session end.

    Registered as a plugin object in ``pytest_configure`` so its hooks see the session state.
    """

    def __init__(self, config: pytest.Config, session: LlemSession) -> None:
        self.config = config
        self.session = session
        self.running: str | None = None
        #: On the controller: node id -> the facts of an llem case running on a worker.
        self.started: dict[str, dict[str, Any]] = {}

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
        elif report.when == "setup" and report.passed and hasattr(self.config, "workerinput"):
            started = started_case(item, self.session)
            if started is not None:
                report.user_properties.append((CASE_START_PROPERTY, started))
        elif report.when == "call" and report.failed and call.excinfo is not None:
            record_test_failure(report.user_properties, failure_of(report, call.excinfo))
        return report

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """Take the cases a test recorded, with the test's outcome, and journal them."""
        if report.when == "setup":
            for name, value in report.user_properties:
                if name == CASE_START_PROPERTY and isinstance(value, dict):
                    self.started[report.nodeid] = value
        elif report.when == "call":
            self.started.pop(report.nodeid, None)
        if report.when != "call" and not (report.when == "setup" and report.skipped):
            return
        cases = cases_from(report)
        self.session.cases.extend(cases)
        if cases and not hasattr(self.config, "workerinput"):
            self._journal(cases)

    @pytest.hookimpl(optionalhook=True)
    def pytest_handlecrashitem(self, crashitem: str, report: pytest.TestReport, sched: Any) -> None:
        """An xdist worker died while running ``crashitem``: record the case as an error (the
        scheduler does not hand it out again)."""
        started = self.started.pop(crashitem, None)
        # Without the worker's facts (it died in setup), pytest-llem's scheduler still knows
        # an llem case by its load group.
        group_of = getattr(sched, "load_group", None)
        grouped = callable(group_of) and group_of(crashitem) is not None
        node = getattr(report, "node", None)
        case = crashed_case(
            crashitem,
            started,
            worker=str(getattr(getattr(node, "gateway", None), "id", "?")),
            how=worker_exit(node),
            session=self.session,
            llem=started is not None or grouped,
        )
        if case is not None:
            self.session.cases.append(case)
            self._journal([case])

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
                    profile=llem_session.options.profile,
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
        # a shard with no case assigned still writes its manifest: the merge must see it
        collect_only = bool(getattr(self.config.option, "collectonly", False))
        wanted = llem_session.cases or comparing or (llem_session.shard and not collect_only)
        try:
            if wanted and not hasattr(self.config, "workerinput"):
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
        if session.exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED and nothing_assigned(
            llem_session.shard
        ):
            # a job array's task whose shard is empty has done its part: its record is written
            session.exitstatus = pytest.ExitCode.OK

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


def crashed_case(
    nodeid: str,
    started: dict[str, Any] | None,
    *,
    worker: str,
    how: str,
    session: LlemSession,
    llem: bool = True,
) -> CaseRecord | None:
    """The error case of an llem test whose xdist worker died while running it.

    Args:
        nodeid: The test's node id.
        started: The facts its worker sent as it started (None: it died before that, in
            setup).
        worker: The worker's id (``gw1``).
        how: How the worker ended (``killed by signal 9 (SIGKILL)``).
        session: The session; a case already recorded (the worker died in teardown) gets a
            note instead.
        llem: Whether the test is known to be an llem case.

    Returns:
        The case for the record, or None when the test had recorded its case already or is no
        llem case.
    """
    message = f"worker {worker!r} crashed while running this case ({how}); not run again"
    recorded = [c for c in session.cases if c.id == nodeid or c.id.startswith(f"{nodeid}#")]
    if recorded:
        for case in recorded:
            case.notes.append(f"after the case was recorded, {message}")
        return None
    if not llem:
        return None
    facts = started or {"id": nodeid, "name": nodeid.rsplit("::", 1)[-1]}
    known = (
        "from the facts the worker sent as the case started: parameters as markers and options "
        "resolve them (overrides given to llem.run() are not known)"
        if started is not None
        else "the worker died before the case started (in its setup)"
    )
    case = CaseRecord.model_validate(facts)
    case.outcome = "error"
    case.error = CaseError(type=WORKER_CRASHED, message=message)
    case.notes.append(
        "the worker process died while running the case, as a CUDA fault or the kernel's "
        f"out-of-memory killer ends one; recorded by the controller {known}"
    )
    return case


def worker_exit(node: Any) -> str:
    """How an xdist worker's process ended, as far as the controller can tell: the signal that
    killed it or its exit status (only for workers it started as local processes)."""
    popen = getattr(getattr(getattr(node, "gateway", None), "_io", None), "popen", None)
    code: int | None = None
    if popen is not None:
        try:
            code = popen.wait(timeout=2.0)
        except (subprocess.TimeoutExpired, OSError):
            code = None
    if not isinstance(code, int):
        return "its exit status is unknown"
    if code >= 0:
        return f"exit status {code}"
    try:
        name = f" ({signal.Signals(-code).name})"
    except ValueError:
        name = ""
    return f"killed by signal {-code}{name}"


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

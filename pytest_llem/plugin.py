"""pytest hooks of pytest-llem: options, ini keys, the marker, collection checks and the end
of the session (run record and terminal summary).

Only hooks live here; the work is done by ``session``, ``fixtures``, ``harness``, ``results``
and ``report``. The built-in backend and meter factories are ``trylast`` implementations of the
plugin's own hooks, so a conftest can replace them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
from collections.abc import Callable, Generator, Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from pytest_llem import hookspecs
from pytest_llem.backends.base import Backend
from pytest_llem.collection import (
    BUDGET_MARKER,
    MARKER,
    SWEEP_FIXTURE,
    SWEEP_MARKER,
    mark_load_groups,
    order_by_load,
    sweep_cases,
)
from pytest_llem.config.models import BUILTIN_BACKENDS, CaseConfig
from pytest_llem.exceptions import ConfigurationError, LlemError, ResultStoreError
from pytest_llem.finish import finish_run
from pytest_llem.fixtures import (
    CASE_PROPERTY,
    SESSION_KEY,
    llem,
    llem_sweep_params,
    record_test_failure,
    skipped_sweep_case,
)
from pytest_llem.meters.base import EnergyMeter
from pytest_llem.options import (
    LlemOptions,
    add_options,
    load_compare_baseline,
    options_from_config,
)
from pytest_llem.report.terminal import summary_lines
from pytest_llem.results.journal import Journal, journal_path
from pytest_llem.results.models import CaseError, CaseRecord, GpuInfo, MachineInfo, RunRecord
from pytest_llem.results.store import RUNS_DIRNAME, check_writable
from pytest_llem.session import (
    METER_NAMES,
    BackendCache,
    BaselineState,
    LlemSession,
    MeterState,
)

__all__ = ["llem", "llem_sweep_params"]

logger = logging.getLogger("pytest_llem")

#: Engine loggers quieted unless pytest runs with -v.
NOISY_LOGGERS = ("transformers", "torch", "codecarbon", "vllm", "tensorrt_llm", "urllib3")


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    """Register the plugin's own hooks."""
    pluginmanager.add_hookspecs(hookspecs)


def pytest_addoption(parser: pytest.Parser) -> None:
    """The ``llem`` option group and its ini keys, from the option table."""
    add_options(parser)


def _progress(config: pytest.Config) -> Callable[[str], None]:
    def write(message: str) -> None:
        logger.info(message)
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        if reporter is None or config.get_verbosity() < 0:
            return
        capture = config.pluginmanager.get_plugin("capturemanager")
        # Long one-off work happens inside a test, where output is captured: show it anyway.
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            reporter.ensure_newline()
            reporter.write_line(f"llem: {message}")

    return write


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker, validate the options and set up the session state."""
    config.addinivalue_line(
        "markers",
        "llem(**params): parameters of an llem benchmark case (e.g. batch_size=4, "
        "max_new_tokens=16); see `llem params` for every parameter.",
    )
    config.addinivalue_line(
        "markers",
        "llem_sweep(**axes): sweep llem parameters over lists of values, one test per "
        "combination (e.g. batch_size=[1, 8, 32], dtype='auto').",
    )
    config.addinivalue_line(
        "markers",
        "llem_budget(**limits): absolute limits on an llem case's medians, e.g. "
        "energy_per_output_token_j=0.5, ttft_ms_p99=200, output_tokens_per_s_min=50.",
    )
    if config.get_verbosity() < 1:
        for name in NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        # vLLM sets its loggers' level from this when imported, in its engine processes too.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    backend_names = _names(config.hook.pytest_llem_backend_names(), BUILTIN_BACKENDS)
    meter_names = _names(config.hook.pytest_llem_meter_names(), METER_NAMES)
    try:
        options = options_from_config(config, backend_names=backend_names, meter_names=meter_names)
        _scale_out(config, options.gpu_groups)
        config.stash[_OUTPUTS] = _output_folders(options)
        if _explicit_llem_run(config, options):
            _check_outputs(config)
        if not hasattr(config, "workerinput"):  # the controller compares, after pinning
            options = _load_compare_baseline(config, options)
    except ConfigurationError as e:
        raise pytest.UsageError(f"pytest-llem: {e}") from e
    progress = _progress(config)

    def make_backend(case: CaseConfig) -> Backend:
        backend = config.hook.pytest_llem_make_backend(
            name=case.backend, case=case, progress=progress, options=options
        )
        if backend is None:
            raise ConfigurationError(f"no plugin provides the backend {case.backend!r}")
        return backend  # type: ignore[no-any-return]

    def make_meter(name: str) -> EnergyMeter:
        meter = config.hook.pytest_llem_make_meter(name=name, config=config, options=options)
        if meter is None:
            raise ConfigurationError(f"no plugin provides the meter {name!r}")
        return meter  # type: ignore[no-any-return]

    def select_auto() -> tuple[str, str]:
        from pytest_llem.meters.registry import select_auto as select

        return select()

    session = LlemSession(
        options=options,
        backends=BackendCache(make_backend),
        meters=MeterState(options.meter, make=make_meter, select_auto=select_auto),
        progress=progress,
        baseline=BaselineState(options.energy, progress),
    )
    config.stash[SESSION_KEY] = session
    config.pluginmanager.register(RunRecorder(config, session), "llem-run-recorder")


def _load_compare_baseline(config: pytest.Config, options: LlemOptions) -> LlemOptions:
    """Read the ``--llem-compare`` baseline now, looked up under this machine's id as the run
    record will carry it (same hostname, platform and visible GPUs)."""
    if options.store is None or options.store.compare is None:
        return options
    from pytest_llem.results.storage import machine_id

    return load_compare_baseline(options, machine_id(_machine_info(config)))


_OUTPUTS = pytest.StashKey[list[tuple[Path, str]]]()


def _output_folders(options: LlemOptions) -> list[tuple[Path, str]]:
    """The folders the run writes at its end, each with how a message names its option: the
    report folder (record, HTML page, journal), the CSV's folder and, when saving, the storage
    folder."""
    report_origin = options.origin("report_dir")
    folders = [
        (options.report_dir, report_origin),
        (options.report_dir / RUNS_DIRNAME, report_origin),
    ]
    store = options.store
    if store is not None and store.csv is not None:
        folders.append((store.csv.parent, "--llem-csv"))
    if store is not None and store.save:
        folders.append((store.storage, options.origin("storage")))
    return folders


def _explicit_llem_run(config: pytest.Config, options: LlemOptions) -> bool:
    """Whether the session will write llem outputs whatever it collects: it saves or compares a
    run, or it is an xdist controller (which never sees the items its workers collect)."""
    store = options.store
    saves_or_compares = store is not None and (store.save or store.compare is not None)
    return saves_or_compares or bool(getattr(config.option, "numprocesses", None))


def _check_outputs(config: pytest.Config) -> None:
    """Before any case runs, check that the run can write what it will write at its end. Not on
    xdist workers (the controller writes) nor for ``--help``/``--collect-only``.

    Raises:
        pytest.UsageError: a folder cannot be created or written, naming its option.
    """
    if hasattr(config, "workerinput") or any(
        getattr(config.option, name, False) for name in ("help", "collectonly")
    ):
        return
    for folder, origin in config.stash.get(_OUTPUTS, []):
        try:
            check_writable(folder)
        except ResultStoreError as e:
            raise pytest.UsageError(f"pytest-llem: {origin}: {e}") from e


def _dist_given(config: pytest.Config) -> bool:
    args = [str(a) for a in config.invocation_params.args]
    return any(a == "--dist" or a.startswith(("--dist=", "-d")) for a in args)


def _scale_out(config: pytest.Config, groups: tuple[tuple[int, ...], ...] | None) -> None:
    """Pin this process to its GPU group, and keep model-load groups on one xdist worker."""
    from pytest_llem.workers import pin_worker, worker_info

    workerinput = getattr(config, "workerinput", None)
    worker = worker_info(workerinput)
    if workerinput and workerinput.get("llem_loadgroup"):
        config.option.loadgroup = True  # a worker parses the command line, not our choice
    workers = getattr(config.option, "numprocesses", None)
    controller = worker.id is None and bool(workers)
    if controller and getattr(config.option, "dist", "no") == "load" and not _dist_given(config):
        # Each load group goes to one worker, which loads its model once (xdist_scheduling).
        config.option.dist = "loadgroup"
        folder = Path(tempfile.mkdtemp(prefix="llem-xdist-"))
        config.stash[_GROUPS_FILE] = folder / "groups.json"
    if groups is None:
        return
    if controller:
        if isinstance(workers, int) and workers > len(groups):
            raise ConfigurationError(
                f"--llem-gpus gives {len(groups)} GPU group(s) for {workers} xdist workers"
            )
        return
    if worker.id is None and len(groups) > 1:
        logger.warning("--llem-gpus: without xdist (-n) only the first group is used")
    pinned = pin_worker(groups, worker)
    logger.info("llem: %s pinned to CUDA_VISIBLE_DEVICES=%s", worker.id or "this process", pinned)


_GROUPS_FILE = pytest.StashKey[Path]()


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """Tell each xdist worker whether, and through which file, load groups are scheduled."""
    node.workerinput["llem_loadgroup"] = node.config.option.dist == "loadgroup"
    groups_file = node.config.stash.get(_GROUPS_FILE, None)
    if groups_file is not None:
        node.workerinput["llem_groups_file"] = str(groups_file)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Schedule each model-load group onto one worker (when pytest-llem chose loadgroup)."""
    groups_file = config.stash.get(_GROUPS_FILE, None)
    if groups_file is None:
        return None
    from pytest_llem.xdist_scheduling import ModelGroupScheduling

    return ModelGroupScheduling(config, log, groups_file)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """``-n auto`` with ``--llem-gpus``: one worker per GPU group."""
    from pytest_llem.options import OptionValues, option

    try:
        groups = OptionValues.from_config(config).get(option("gpus"))
    except ConfigurationError:
        return None  # reported as a usage error in pytest_configure
    return len(groups) if groups else None


def _names(contributed: Iterable[Iterable[str]], builtin: tuple[str, ...]) -> tuple[str, ...]:
    names = list(builtin)
    for group in contributed:
        names.extend(n for n in group if n not in names)
    return tuple(names)


@pytest.hookimpl(trylast=True)
def pytest_llem_make_backend(
    name: str, case: CaseConfig, progress: Callable[[str], None]
) -> Backend | None:
    """The built-in backends."""
    if name == "transformers":
        from pytest_llem.backends.transformers import TransformersBackend

        return TransformersBackend(case, progress=progress)
    if name == "endpoint":
        from pytest_llem.backends.endpoint import EndpointBackend

        return EndpointBackend(case, progress=progress)
    if name == "tensorrt":
        from pytest_llem.backends.tensorrt import TensorRTBackend

        return TensorRTBackend(case, progress=progress)
    if name == "vllm":
        from pytest_llem.backends.vllm import VllmBackend

        return VllmBackend(case, progress=progress)
    return None


@pytest.hookimpl(trylast=True)
def pytest_llem_make_meter(
    name: str, config: pytest.Config, options: LlemOptions
) -> EnergyMeter | None:
    """The built-in meters."""
    if name not in METER_NAMES or name == "auto":
        return None
    from pytest_llem.meters.registry import create_meter

    return create_meter(name, options=options.energy)


_PRELOADED = pytest.StashKey[bool]()


@pytest.hookimpl(tryfirst=True)
def pytest_fixture_setup(
    fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest
) -> None:
    """Before the first ``pytester`` fixture, load the engine once (see ``nested``)."""
    if fixturedef.argname not in ("pytester", "testdir"):
        return
    config = request.config
    if not config.stash.get(_PRELOADED, False):
        config.stash[_PRELOADED] = True
        from pytest_llem.nested import preload_engine

        preload_engine()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Check every llem test's parameters and expand its sweep, naming the test on error."""
    definition = metafunc.definition
    uses_llem = "llem" in metafunc.fixturenames
    marked = any(
        any(definition.iter_markers(name)) for name in (MARKER, SWEEP_MARKER, BUDGET_MARKER)
    )
    session = metafunc.config.stash.get(SESSION_KEY, None)
    if session is None or not (uses_llem or marked):
        return
    problem = None
    try:
        cases = sweep_cases(definition, session)
    except LlemError as e:
        problem = f"{definition.nodeid}: invalid llem parameters: {e}"
    if problem is not None:
        # Raised outside the except block so the collection error is this line alone.
        pytest.fail(problem, pytrace=False)
    if cases and uses_llem:
        metafunc.parametrize(
            SWEEP_FIXTURE,
            [
                pytest.param(
                    case,
                    id=case.id,
                    marks=[pytest.mark.skip(reason=case.skip_reason)] if case.skip_reason else [],
                )
                for case in cases
            ],
            indirect=True,  # the fixture hands the test the values; the item keeps the case
        )


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run cases that share a model load together (and shuffle within groups if asked); under
    ``--dist loadgroup`` (the default with ``-n``) each load group goes to one xdist worker."""
    session = config.stash.get(SESSION_KEY, None)
    if session is None:
        return
    items[:] = order_by_load(items, session)
    # xdist resets a worker's ``dist`` to "no" and keeps the choice in ``loadgroup``.
    if getattr(config.option, "loadgroup", False):
        groups = mark_load_groups(items, session)
        groups_file = getattr(config, "workerinput", {}).get("llem_groups_file")
        if groups_file:
            from pytest_llem.xdist_scheduling import write_groups

            write_groups(Path(groups_file), groups)
    session.llem_items = {i.nodeid for i in items if "llem" in getattr(i, "fixturenames", ())}
    if session.llem_items:  # a session without llem cases writes nothing of ours
        _check_outputs(config)


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
            record_test_failure(report.user_properties, _failure(report, call.excinfo))
        return report

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """Take the cases a test recorded, with the test's outcome, and journal them."""
        if report.when != "call" and not (report.when == "setup" and report.skipped):
            return
        cases = _cases_from(report)
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
                )
            for case in cases:
                llem_session.journal.append(case)
        except OSError as e:
            where = llem_session.journal.path if llem_session.journal is not None else "?"
            llem_session.journal_error = f"cannot write the journal {where}: {e}"
            logger.warning("llem: %s", llem_session.journal_error)

    def _mark_interrupted(self, session: pytest.Session) -> None:
        running = self.running
        if session.exitstatus != pytest.ExitCode.INTERRUPTED or running is None:
            return
        if running not in self.session.llem_items:
            return
        if any(case.id == running for case in self.session.cases):
            return
        self.session.cases.append(
            CaseRecord(
                id=running,
                name=running.rsplit("::", 1)[-1],
                outcome="error",
                error=CaseError(
                    type="KeyboardInterrupt",
                    message="the session was interrupted while this case ran",
                ),
            )
        )

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        """Write the run record (not on xdist workers) and release backend and meters."""
        llem_session = self.session
        self._mark_interrupted(session)
        if llem_session.journal is not None:
            llem_session.journal.close()
        store = llem_session.options.store
        # a gate must judge a run without llem cases too (every baseline case is gone)
        comparing = store is not None and store.compare_baseline is not None
        try:
            if (llem_session.cases or comparing) and not hasattr(self.config, "workerinput"):
                record = _run_record(self.config, llem_session)
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
        llem_session = self.session
        record = llem_session.record
        if record is None and llem_session.store_error is None and not llem_session.journal_error:
            return
        terminalreporter.write_sep("-", "llem benchmark summary")
        if record is not None:
            for line in summary_lines(record):
                terminalreporter.write_line(line)
        if llem_session.store_error is not None:
            terminalreporter.write_line(f"llem: {llem_session.store_error}", red=True)
        if llem_session.journal_error is not None:
            terminalreporter.write_line(
                f"llem: {llem_session.journal_error} (no case journalled after it: a killed "
                "run could not be rebuilt)",
                red=True,
            )
        finish = llem_session.finish
        if finish is None:
            return
        for kind, path in finish.paths.items():
            label = "run record" if kind == "record" else kind
            terminalreporter.write_line(f"llem {label}: {_shown(path)}")
        if llem_session.journal is not None and llem_session.journal_error is None:
            terminalreporter.write_line(f"llem journal: {_shown(llem_session.journal.path)}")
        if finish.lines:
            terminalreporter.write_sep("-", "llem comparison")
            for line in finish.lines:
                terminalreporter.write_line(line)
        for line in finish.warnings:
            terminalreporter.write_line(line, yellow=True)
        for line in finish.errors:
            terminalreporter.write_line(line, red=True)
        if finish.breaches:
            terminalreporter.write_sep("-", "llem gate failed", red=True)
            for line in finish.breaches:
                terminalreporter.write_line(line, red=True)


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _machine_info(config: pytest.Config) -> MachineInfo:
    from pytest_llem.machine import collect_machine_info
    from pytest_llem.meters.nvml import nvml_gpus

    gpus, gpu_note = nvml_gpus()
    return collect_machine_info(
        root=config.rootpath,
        gpus=[GpuInfo(**dataclasses.asdict(gpu)) for gpu in gpus],
        gpu_note=gpu_note,
    )


def _run_record(config: pytest.Config, session: LlemSession) -> RunRecord:
    machine = _machine_info(config)
    baseline = session.baseline.record if session.baseline is not None else None
    if baseline is None:  # measured on xdist workers: each case carries its own
        baseline = next((case.baseline for case in session.cases if case.baseline), None)
    return RunRecord(
        run_id=session.run_id,
        created_at=session.started_at,
        finished_at=datetime.now(timezone.utc),
        machine=machine,
        options=session.options.given,
        baseline=baseline,
        cases=session.cases,
    )


def _failure(report: pytest.TestReport, excinfo: pytest.ExceptionInfo[BaseException]) -> CaseError:
    """The exception that failed a test, as the report shows it: its type and the first line
    of the crash message (``assert 8.3 < 0``)."""
    kind = excinfo.typename
    crash = getattr(report.longrepr, "reprcrash", None)
    text = str(crash.message if crash is not None else excinfo.value).strip()
    first = text.splitlines()[0] if text else ""
    return CaseError(type=kind, message=first.removeprefix(f"{kind}: "))


def _cases_from(report: pytest.TestReport) -> list[CaseRecord]:
    cases = []
    for name, value in report.user_properties:
        if name != CASE_PROPERTY or not isinstance(value, dict):
            continue
        case = CaseRecord.model_validate(value)
        if case.outcome == "passed" and report.outcome != "passed":
            case.outcome = "failed" if report.outcome == "failed" else "skipped"
        cases.append(case)
    return cases


def pytest_unconfigure(config: pytest.Config) -> None:
    """Release whatever a session left loaded, and the controller's xdist scratch folder."""
    session = config.stash.get(SESSION_KEY, None)
    if session is not None:
        session.close()
    groups_file = config.stash.get(_GROUPS_FILE, None)
    if groups_file is not None:
        import shutil

        shutil.rmtree(groups_file.parent, ignore_errors=True)

"""pytest hooks of pytest-llem: options, ini keys, the markers, collection and the xdist hooks.

Only hooks live here; the work is done elsewhere: ``session`` (options and session state),
``collection`` (sweeps and load order), ``fixtures`` (the ``llem`` fixture), ``recorder`` (a
plugin object registered in ``pytest_configure``: cases from test reports, journal, run record
at session end, with ``finish``), ``outputs`` (can the run write its outputs),
``xdist_scheduling`` (GPU pinning, one worker per model-load group). The built-in backend and
meter factories are ``trylast`` implementations of the plugin's own hooks, so a conftest can
replace them.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

import pytest

from pytest_llem import hookspecs, xdist_scheduling
from pytest_llem.backends.base import Backend
from pytest_llem.collection import (
    BUDGET_MARKER,
    MARKER,
    SWEEP_FIXTURE,
    SWEEP_MARKER,
    order_by_load,
    sweep_cases,
)
from pytest_llem.config.models import BUILTIN_BACKENDS, CaseConfig
from pytest_llem.exceptions import ConfigurationError, LlemError
from pytest_llem.finish import with_compare_baseline
from pytest_llem.fixtures import SESSION_KEY, llem, llem_sweep_params
from pytest_llem.meters.base import EnergyMeter
from pytest_llem.outputs import OUTPUTS, check_outputs, explicit_llem_run, output_folders
from pytest_llem.recorder import RECORDER_NAME, RunRecorder
from pytest_llem.session import (
    METER_NAMES,
    BackendCache,
    BaselineState,
    LlemSession,
    MeterState,
    build_options,
)

__all__ = ["llem", "llem_sweep_params"]

logger = logging.getLogger("pytest_llem")

_OPTIONS: tuple[tuple[str, str, str | None], ...] = (
    ("backend", "Inference backend for every case (default: transformers).", None),
    ("model", "Model for every case: llem-tiny (built-in), a folder, or a hub id.", None),
    ("device", "Device: auto, cpu or cuda (default: auto).", None),
    (
        "meter",
        "Energy meter(s): auto, nvml, rapl, zeus, codecarbon or none, or several joined with "
        "commas (nvml,rapl); each domain is taken from one meter (default: auto).",
        "NAME[,NAME]",
    ),
    ("repeat", "Measured repetitions per case (default: 3).", "N"),
    ("warmup", "Unmeasured warmup repetitions per case (default: 1).", "N"),
    ("report_dir", "Folder for llem-report.json and runs/ (default: reports).", "DIR"),
    (
        "baseline_s",
        "Seconds of idle power measured before the first case, for dynamic energy; cached per "
        "machine for an hour unless given here; 0 disables (default: 5).",
        "SECONDS",
    ),
    (
        "min_window_s",
        "Shortest measurement window: the workload repeats inside a window until it lasts "
        "max(this, 20 x the meter's update period) (default: 0, the meters' resolution decides).",
        "SECONDS",
    ),
    (
        "cooldown",
        "Before each case: off, temperature (wait until the GPU is near its idle temperature) "
        "or seconds:N (default: off).",
        "MODE",
    ),
    ("country", "Country (ISO code, e.g. USA, FRA) for CodeCarbon's emissions.", "ISO"),
    (
        "gpus",
        "GPUs per xdist worker, e.g. 0,1,2,3 (one each) or 0-1,2-3 (two each): worker N sees "
        "only group N (CUDA_VISIBLE_DEVICES).",
        "LIST",
    ),
    (
        "isolation",
        "Other processes on a measured GPU: warn, skip or fail the case (default: warn).",
        "MODE",
    ),
    (
        "timeout_s",
        "Fail a case whose warmup and measured windows run longer than this; model loading, "
        "the idle baseline and the cooldown do not count. The session goes on (default: no "
        "limit).",
        "SECONDS",
    ),
    (
        "endpoint",
        "Benchmark an OpenAI-compatible server running on this machine, e.g. "
        "http://127.0.0.1:8000 (selects the endpoint backend unless a backend is given).",
        "URL",
    ),
)

#: Engine loggers quieted unless pytest runs with -v.
NOISY_LOGGERS = ("transformers", "torch", "codecarbon", "vllm", "tensorrt_llm", "urllib3")


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    """Register the plugin's own hooks."""
    pluginmanager.add_hookspecs(hookspecs)


def pytest_addoption(parser: pytest.Parser) -> None:
    """The ``llem`` option group and its ini keys."""
    group = parser.getgroup("llem", "LLM inference energy benchmarks (pytest-llem)")
    for name, text, metavar in _OPTIONS:
        flag = f"--llem-{name.replace('_', '-')}"
        group.addoption(flag, dest=f"llem_{name}", default=None, metavar=metavar, help=text)
        parser.addini(f"llem_{name}", f"{text} Overridden by {flag}.", default="")
    group.addoption(
        "--llem-set",
        dest="llem_set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Set any case parameter, e.g. batch_size=8 or transformers.attn_implementation=sdpa "
        "(repeatable; wins over ini, llem.run() overrides and markers, and replaces a marker's "
        "or the ini's sweep axis of the same parameter).",
    )
    parser.addini("llem_set", "Case parameters as KEY=VALUE lines.", type="linelist", default=[])
    group.addoption(
        "--llem-sweep",
        dest="llem_sweep",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="Sweep a parameter over values for every llem test (KEY=auto takes the values the "
        "models define); repeatable, replaces a marker's or the ini's axis of the same "
        "parameter and wins over llem.run() overrides.",
    )
    parser.addini("llem_sweep", "Sweep axes as KEY=V1,V2 lines.", type="linelist", default=[])
    group.addoption(
        "--llem-shuffle",
        dest="llem_shuffle",
        nargs="?",
        const="random",
        default=None,
        metavar="SEED",
        help="Shuffle the cases within each model-load group (seeded; the seed is recorded).",
    )
    _add_run_store_options(group, parser)


def _add_run_store_options(group: Any, parser: pytest.Parser) -> None:
    """Saving, comparing and gating runs, and the CSV export."""
    group.addoption(
        "--llem-save",
        dest="llem_save",
        nargs="?",
        const="",
        default=None,
        metavar="NAME",
        help="Save the run record in the storage folder (optionally under NAME).",
    )
    group.addoption(
        "--llem-autosave", dest="llem_autosave", action="store_true", help="Save every run."
    )
    group.addoption(
        "--llem-storage",
        dest="llem_storage",
        default=None,
        metavar="DIR",
        help="Folder of saved runs (default: .llem).",
    )
    parser.addini("llem_storage", "Folder of saved runs (default: .llem).", default="")
    group.addoption(
        "--llem-compare",
        dest="llem_compare",
        nargs="?",
        const="latest",
        default=None,
        metavar="NAME|PATH|latest",
        help="Compare with a saved run (default: the latest saved on this machine).",
    )
    group.addoption(
        "--llem-fail-on",
        dest="llem_fail_on",
        default=None,
        metavar="EXPR",
        help="Fail when a metric regressed beyond a threshold, e.g. "
        "'energy_per_output_token_j:+5%%,output_tokens_per_s:-5%%,ttft_ms.p99:+10%%'.",
    )
    group.addoption(
        "--llem-fail-inconclusive",
        dest="llem_fail_inconclusive",
        action="store_true",
        help="Also fail when a comparison's interval straddles a threshold.",
    )
    group.addoption(
        "--llem-gate-estimated",
        dest="llem_gate_estimated",
        action="store_true",
        help="Let estimated energy figures gate too (they do not by default).",
    )
    group.addoption(
        "--llem-compare-strict",
        dest="llem_compare_strict",
        action="store_true",
        help="Refuse to compare runs from different GPUs, drivers or engine versions.",
    )
    group.addoption(
        "--llem-csv",
        dest="llem_csv",
        nargs="?",
        const="",
        default=None,
        metavar="PATH",
        help="Also write one CSV row per case (default: <report-dir>/llem-report.csv).",
    )


def _raw_options(config: pytest.Config) -> tuple[dict[str, Any], dict[str, Any]]:
    cli = {name: config.getoption(f"llem_{name}") for name, _, _ in _OPTIONS}
    cli["set"] = list(config.getoption("llem_set") or [])
    cli["sweep"] = list(config.getoption("llem_sweep") or [])
    cli["shuffle"] = config.getoption("llem_shuffle")
    ini: dict[str, Any] = {name: config.getini(f"llem_{name}") for name, _, _ in _OPTIONS}
    ini["set"] = [line for line in config.getini("llem_set") if line.strip()]
    ini["sweep"] = [line for line in config.getini("llem_sweep") if line.strip()]
    for name in (
        "save",
        "autosave",
        "storage",
        "compare",
        "fail_on",
        "fail_inconclusive",
        "gate_estimated",
        "compare_strict",
        "csv",
    ):
        cli[name] = config.getoption(f"llem_{name}")
    ini["storage"] = config.getini("llem_storage")
    return cli, ini


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
    cli, ini = _raw_options(config)
    try:
        options = build_options(
            cli=cli,
            ini=ini,
            invocation_dir=config.invocation_params.dir,
            backend_names=backend_names,
            meter_names=meter_names,
        )
        xdist_scheduling.scale_out(config, options.gpu_groups)
        config.stash[OUTPUTS] = output_folders(options, cli, ini)
        if explicit_llem_run(config, options):
            check_outputs(config)
        if not hasattr(config, "workerinput"):  # the controller compares, after pinning
            options = with_compare_baseline(options, root=config.rootpath)
    except ConfigurationError as e:
        raise pytest.UsageError(f"pytest-llem: {e}") from e
    progress = _progress(config)

    def make_backend(case: CaseConfig) -> Backend:
        backend = config.hook.pytest_llem_make_backend(
            name=case.backend, case=case, progress=progress
        )
        if backend is None:
            raise ConfigurationError(f"no plugin provides the backend {case.backend!r}")
        return backend  # type: ignore[no-any-return]

    def make_meter(name: str) -> EnergyMeter:
        meter = config.hook.pytest_llem_make_meter(
            name=name,
            config=config,
            options={"country_iso_code": options.energy.country_iso_code},
        )
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
    config.pluginmanager.register(RunRecorder(config, session), RECORDER_NAME)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """Tell each xdist worker whether, and through which file, load groups are scheduled."""
    xdist_scheduling.configure_node(node)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Schedule each model-load group onto one worker (when pytest-llem chose loadgroup)."""
    return xdist_scheduling.make_scheduler(config, log)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """``-n auto`` with ``--llem-gpus``: one worker per GPU group."""
    return xdist_scheduling.auto_num_workers(config)


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
    name: str, config: pytest.Config, options: dict[str, Any]
) -> EnergyMeter | None:
    """The built-in meters."""
    if name not in METER_NAMES or name == "auto":
        return None
    from pytest_llem.meters.registry import create_meter

    return create_meter(name, country_iso_code=options.get("country_iso_code"))


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
    xdist_scheduling.share_load_groups(config, items, session)
    session.llem_items = {i.nodeid for i in items if "llem" in getattr(i, "fixturenames", ())}
    if session.llem_items:  # a session without llem cases writes nothing of ours
        check_outputs(config)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Release whatever a session left loaded, and the controller's xdist scratch folder."""
    session = config.stash.get(SESSION_KEY, None)
    if session is not None:
        session.close()
    xdist_scheduling.remove_groups_file(config)

"""pytest hooks of pytest-llem: options, ini keys, the markers, collection and the xdist hooks.

Only hooks live here; the work is done elsewhere: ``options`` (the option table and the typed
options), ``session_setup`` and ``session`` (the session state), ``collection`` (sweeps and load order), ``fixtures`` (the ``llem`` fixture), ``recorder`` (a
plugin object registered in ``pytest_configure``: cases from test reports, journal, run record
at session end, with ``finish``), ``outputs`` (can the run write its outputs),
``xdist_scheduling`` (GPU pinning, one worker per model-load group). The built-in backend and
meter factories are ``trylast`` implementations of the plugin's own hooks, so a conftest can
replace them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest

from pytest_llem import hookspecs, profile_report, shard_session, xdist_scheduling
from pytest_llem.collection import (
    BUDGET_MARKER,
    MARKER,
    SWEEP_FIXTURE,
    SWEEP_MARKER,
    order_by_load,
    sweep_cases,
)
from pytest_llem.config.models import CaseConfig
from pytest_llem.exceptions import LlemError
from pytest_llem.fixtures import SESSION_KEY, llem, llem_sweep_params
from pytest_llem.options import LlemOptions, add_options
from pytest_llem.outputs import check_outputs
from pytest_llem.recorder import RECORDER_NAME, RunRecorder
from pytest_llem.session import METER_NAMES
from pytest_llem.session_setup import configured_options, new_session

if TYPE_CHECKING:
    from pytest_llem.backends.base import Backend
    from pytest_llem.meters.base import EnergyMeter

__all__ = ["llem", "llem_sweep_params"]

logger = logging.getLogger("pytest_llem")

#: Engine loggers quieted unless pytest runs with -v.
NOISY_LOGGERS = ("transformers", "torch", "codecarbon", "vllm", "tensorrt_llm", "urllib3")

#: The markers' lines in ``pytest --markers``.
MARKER_LINES = (
    "llem(**params): parameters of an llem benchmark case (e.g. batch_size=4, "
    "max_new_tokens=16); see `llem params` for every parameter.",
    "llem_sweep(**axes): sweep llem parameters over lists of values, one test per "
    "combination (e.g. batch_size=[1, 8, 32], dtype='auto').",
    "llem_budget(**limits): absolute limits on an llem case's medians, e.g. "
    "energy_per_output_token_j=0.5, ttft_ms_p99=200, output_tokens_per_s_min=50.",
)


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    """Register the plugin's own hooks."""
    pluginmanager.add_hookspecs(hookspecs)


def pytest_addoption(parser: pytest.Parser) -> None:
    """The ``llem`` option group and its ini keys, from the option table."""
    add_options(parser)


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker, validate the options and set up the session state."""
    for line in MARKER_LINES:
        config.addinivalue_line("markers", line)
    if config.get_verbosity() < 1:
        for name in NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        # vLLM sets its loggers' level from this when imported, in its engine processes too.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    session = new_session(config, configured_options(config))
    config.stash[SESSION_KEY] = session
    config.pluginmanager.register(RunRecorder(config, session), RECORDER_NAME)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """Tell each xdist worker whether, and through which file, load groups are scheduled."""
    xdist_scheduling.configure_node(node)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """Take the shard manifest (``--llem-shard``) a finished xdist worker computed."""
    shard_session.take_worker_manifest(node, node.config.stash.get(SESSION_KEY, None))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Schedule each model-load group onto one worker (when pytest-llem chose loadgroup)."""
    return xdist_scheduling.make_scheduler(config, log)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """``-n auto`` with ``--llem-gpus``: one worker per GPU group."""
    return xdist_scheduling.auto_num_workers(config)


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
    """Keep this shard's cases (``--llem-shard``), run cases that share a model load together
    (and shuffle within groups if asked); under ``--dist loadgroup`` (the default with ``-n``)
    each load group goes to one xdist worker."""
    session = config.stash.get(SESSION_KEY, None)
    if session is None:
        return
    shard_session.shard_items(config, items, session)
    items[:] = order_by_load(items, session)
    profile_report.write_estimate(config, items, session)
    xdist_scheduling.share_load_groups(config, items, session)
    session.llem_items = {i.nodeid for i in items if "llem" in getattr(i, "fixturenames", ())}
    if session.llem_items:  # a session without llem cases writes nothing of ours
        check_outputs(config)


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Which workload profile runs, and why."""
    session = config.stash.get(SESSION_KEY, None)
    return [] if session is None else profile_report.header_lines(session.options)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Release whatever a session left loaded, and the controller's xdist scratch folder."""
    session = config.stash.get(SESSION_KEY, None)
    if session is not None:
        session.close()
    xdist_scheduling.remove_groups_file(config)

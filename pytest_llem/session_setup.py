"""Setting up a pytest run's llem session: progress messages, the options, the session state.

Called from ``plugin.pytest_configure``; the backend and meter factories go through the
plugin's own hooks (``pytest_llem_make_backend``/``pytest_llem_make_meter``), so a conftest can
replace either. The harness, the meters and the backends are imported on first use, not
here, so a pytest run without llem tests never loads them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import pytest

from pytest_llem import xdist_scheduling
from pytest_llem.config.models import BUILTIN_BACKENDS, CaseConfig
from pytest_llem.exceptions import ConfigurationError
from pytest_llem.finish import with_compare_baseline
from pytest_llem.options import LlemOptions, options_from_config
from pytest_llem.outputs import OUTPUTS, check_outputs, explicit_llem_run, output_folders
from pytest_llem.session import METER_NAMES, BackendCache, BaselineState, LlemSession, MeterState

if TYPE_CHECKING:
    from pytest_llem.backends.base import Backend
    from pytest_llem.meters.base import EnergyMeter

logger = logging.getLogger("pytest_llem")


def progress_writer(config: pytest.Config) -> Callable[[str], None]:
    """A callback that logs a progress message and shows it on the terminal, even mid-test."""

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


def _names(contributed: Iterable[Iterable[str]], builtin: tuple[str, ...]) -> tuple[str, ...]:
    """The built-in names followed by those plugins contribute, once each."""
    names = list(builtin)
    for group in contributed:
        names.extend(n for n in group if n not in names)
    return tuple(names)


def configured_options(config: pytest.Config) -> LlemOptions:
    """Validate the options, pin this process's GPUs, check the output folders and, on the
    controller, read the ``--llem-compare`` baseline.

    Raises:
        pytest.UsageError: a bad option or ini value, an unwritable output folder, or a
            baseline that cannot be read (exit 4).
    """
    backend_names = _names(config.hook.pytest_llem_backend_names(), BUILTIN_BACKENDS)
    meter_names = _names(config.hook.pytest_llem_meter_names(), METER_NAMES)
    try:
        options = options_from_config(config, backend_names=backend_names, meter_names=meter_names)
        xdist_scheduling.scale_out(config, options.gpu_groups)
        config.stash[OUTPUTS] = output_folders(options)
        if explicit_llem_run(config, options):
            check_outputs(config)
        # the controller compares, after pinning; a worker reads the baseline only for a gate,
        # so a repeat=auto case there measures until its gated verdicts are decided
        gated = options.store is not None and bool(options.store.rules)
        if not hasattr(config, "workerinput") or gated:
            options = with_compare_baseline(options, root=config.rootpath)
    except ConfigurationError as e:
        raise pytest.UsageError(f"pytest-llem: {e}") from e
    return options


def new_session(config: pytest.Config, options: LlemOptions) -> LlemSession:
    """The session state, with backends and meters made through the plugin's hooks."""
    progress = progress_writer(config)

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

    return LlemSession(
        options=options,
        backends=BackendCache(make_backend),
        meters=MeterState(options.meter, make=make_meter, select_auto=select_auto),
        progress=progress,
        baseline=BaselineState(options.energy, progress),
    )

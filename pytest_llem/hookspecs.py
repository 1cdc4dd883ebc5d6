"""The plugin's own hooks, so a conftest can bring its own engine or meter.

Both factory hooks are ``firstresult``: the first implementation that returns an object wins.
The built-in implementations are registered ``trylast``, so a user's conftest is asked first.
An implementation takes the arguments it needs by name, any subset of those below.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from pytest_llem.backends.base import Backend
    from pytest_llem.config.models import CaseConfig
    from pytest_llem.meters.base import EnergyMeter
    from pytest_llem.options.model import LlemOptions

__all__ = [
    "pytest_llem_backend_names",
    "pytest_llem_make_backend",
    "pytest_llem_make_meter",
    "pytest_llem_meter_names",
]

hookspec = pytest.hookspec


@hookspec
def pytest_llem_backend_names() -> Iterable[str]:  # type: ignore[empty-body]
    """Return backend names this plugin or conftest provides (added to ``--llem-backend``'s
    choices)."""


@hookspec
def pytest_llem_meter_names() -> Iterable[str]:  # type: ignore[empty-body]
    """Return meter names this plugin or conftest provides (added to ``--llem-meter``'s
    choices)."""


@hookspec(firstresult=True)
def pytest_llem_make_backend(
    name: str, case: CaseConfig, progress: Callable[[str], None], options: LlemOptions
) -> Backend | None:
    """Create (not load) the backend ``name`` for ``case``; return None if not yours.

    Args:
        name: The backend the case asks for.
        case: The resolved case.
        progress: Prints a progress line (long downloads, builds).
        options: The plugin's options, parsed and checked (frozen).
    """


@hookspec(firstresult=True)
def pytest_llem_make_meter(
    name: str, config: pytest.Config, options: LlemOptions
) -> EnergyMeter | None:
    """Create the energy meter ``name``; return None if not yours. Raise
    MeterUnavailableError when it cannot measure on this machine.

    Args:
        name: One meter name of ``--llem-meter``.
        config: The pytest config.
        options: The plugin's options, parsed and checked (frozen); ``options.energy`` says how
            energy is measured (``options.energy.country_iso_code`` for ``--llem-country``).
    """

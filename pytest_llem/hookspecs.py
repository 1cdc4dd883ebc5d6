"""The plugin's own hooks, so a conftest can bring its own engine or meter.

Both factory hooks are ``firstresult``: the first implementation that returns an object wins.
The built-in implementations are registered ``trylast``, so a user's conftest is asked first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from pytest_llem.backends.base import Backend
    from pytest_llem.config.models import CaseConfig
    from pytest_llem.meters.base import EnergyMeter

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
def pytest_llem_make_backend(  # type: ignore[empty-body]
    name: str, case: CaseConfig, progress: Callable[[str], None]
) -> Backend | None:
    """Create (not load) the backend ``name`` for ``case``; return None if not yours."""


@hookspec(firstresult=True)
def pytest_llem_make_meter(  # type: ignore[empty-body]
    name: str, config: pytest.Config, options: dict[str, Any]
) -> EnergyMeter | None:
    """Create the energy meter ``name``; return None if not yours. Raise
    MeterUnavailableError when it cannot measure on this machine."""

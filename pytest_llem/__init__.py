"""pytest-llem: a pytest plugin that turns test functions into LLM inference energy benchmarks.

The public API: the case configuration, the results a benchmark returns, and the errors.
Names are imported on first use, so importing one submodule (the ``llem`` command, an engine
subprocess, pytest loading the plugin) does not pay for the Pydantic models and the report
loader it may not need.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pytest_llem.config.models import CaseConfig
    from pytest_llem.config.profiles import by_profile
    from pytest_llem.exceptions import (
        ConfigurationError,
        LlemError,
        MeterUnavailableError,
        ModelLoadError,
    )
    from pytest_llem.report.loading import Run, load_run
    from pytest_llem.results.models import CaseResult, MetricSummary, RunRecord

__version__ = "0.1.0"

__all__ = [
    "CaseConfig",
    "CaseResult",
    "ConfigurationError",
    "LlemError",
    "MeterUnavailableError",
    "MetricSummary",
    "ModelLoadError",
    "Run",
    "RunRecord",
    "__version__",
    "by_profile",
    "load_run",
]

# Public name -> the module that defines it.
_HOMES = {
    "CaseConfig": "pytest_llem.config.models",
    "CaseResult": "pytest_llem.results.models",
    "ConfigurationError": "pytest_llem.exceptions",
    "LlemError": "pytest_llem.exceptions",
    "MeterUnavailableError": "pytest_llem.exceptions",
    "MetricSummary": "pytest_llem.results.models",
    "ModelLoadError": "pytest_llem.exceptions",
    "Run": "pytest_llem.report.loading",
    "RunRecord": "pytest_llem.results.models",
    "by_profile": "pytest_llem.config.profiles",
    "load_run": "pytest_llem.report.loading",
}


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first use (PEP 562) and keep it here."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

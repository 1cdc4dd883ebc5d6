"""pytest-llem: a pytest plugin that turns test functions into LLM inference energy benchmarks.

The public API: the case configuration, the results a benchmark returns, and the errors.
"""

from __future__ import annotations

from pytest_llem.config.models import CaseConfig
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
    "load_run",
]

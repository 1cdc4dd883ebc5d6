"""pytest-benchmark interop: each llem case also appears as a pytest-benchmark benchmark.

When pytest-benchmark is installed and active, and the test does not use its ``benchmark``
fixture itself, the case's measured windows become the benchmark's rounds (seconds per round)
and its metrics' medians go into ``extra_info``, so ``--benchmark-json`` and
``--benchmark-autosave`` carry them. Without pytest-benchmark nothing happens.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from pytest_llem.results.models import CaseResult

__all__ = ["record_benchmark"]

logger = logging.getLogger("pytest_llem")


def _fixture(request: pytest.FixtureRequest) -> Any:
    if not request.config.pluginmanager.hasplugin("benchmark"):
        return None
    if "benchmark" in request.fixturenames:
        return None  # the test measures something of its own with it
    session = getattr(request.config, "_benchmarksession", None)
    if session is not None and getattr(session, "disabled", False):
        return None  # disabled (e.g. under xdist): asking for the fixture would only warn
    try:
        bench = request.getfixturevalue("benchmark")
    except pytest.FixtureLookupError:
        return None
    return None if getattr(bench, "disabled", True) else bench


def record_benchmark(request: pytest.FixtureRequest, result: CaseResult) -> bool:
    """Report ``result`` through pytest-benchmark's fixture; False when it is not active."""
    bench = _fixture(request)
    if bench is None or getattr(bench, "stats", None) is not None:
        return False
    make_stats = getattr(bench, "_make_stats", None)
    if make_stats is None:
        logger.warning("this pytest-benchmark version cannot take external timings; skipped")
        return False
    stats = make_stats(1)
    bench._mode = "llem.run()"  # marks the fixture as used, as its own calls do
    for repetition in result.repetitions:
        stats.update(repetition.duration_s / repetition.rounds)
    bench.extra_info.update(
        {
            f"llem.{name}": summary.median
            for name, summary in result.metrics.items()
            if summary.median is not None
        }
    )
    bench.extra_info["llem.units"] = {name: s.unit for name, s in result.metrics.items()}
    bench.extra_info["llem.sources"] = {name: s.source for name, s in result.metrics.items()}
    return True

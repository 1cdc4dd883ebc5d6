"""The harness: runs a case's workload through a backend under energy meters and measures it.

``runner`` owns the warmup, repetitions and measurement window (``window``, ``window_record``,
``steady``, ``case_summary``); ``scenarios`` how requests are driven; ``metrics`` every figure of
METRICS.md. Summaries across repetitions are :mod:`pytest_llem.results.stats`; names and units
are the metric catalogue's (:mod:`pytest_llem.results.catalogue`).
"""

from __future__ import annotations

from pytest_llem.harness.metrics import (
    METRIC_UNITS,
    RequestLatency,
    WindowEnergy,
    combine_energy,
    metric_source,
    request_latency,
    window_values,
)
from pytest_llem.harness.runner import CaseMeasurement, measure_window, run_case, summarise_case
from pytest_llem.harness.scenarios import SCENARIOS, build_workload, offline, split_batches
from pytest_llem.results.stats import BOOTSTRAP_RESAMPLES, distribution, percentile, summarise

__all__ = [
    "BOOTSTRAP_RESAMPLES",
    "METRIC_UNITS",
    "SCENARIOS",
    "CaseMeasurement",
    "RequestLatency",
    "WindowEnergy",
    "build_workload",
    "combine_energy",
    "distribution",
    "measure_window",
    "metric_source",
    "offline",
    "percentile",
    "request_latency",
    "run_case",
    "split_batches",
    "summarise",
    "summarise_case",
    "window_values",
]

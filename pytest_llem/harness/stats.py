"""The harness's name for :mod:`pytest_llem.results.stats`, where the statistics now live.

Percentiles, summaries and the bootstrap moved to the results layer so the comparison can use
them without importing the harness; this module keeps the old import path working.
"""

from __future__ import annotations

from pytest_llem.results.stats import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    FEWER_THAN_3_NOTE,
    bootstrap_median_ci,
    distribution,
    percentile,
    summarise,
)

__all__ = [
    "BOOTSTRAP_RESAMPLES",
    "BOOTSTRAP_SEED",
    "FEWER_THAN_3_NOTE",
    "bootstrap_median_ci",
    "distribution",
    "percentile",
    "summarise",
]

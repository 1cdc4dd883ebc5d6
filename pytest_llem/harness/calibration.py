"""``--llem-calibrate=N``: a case measured N times, each a whole independent run.

Each run goes through the case runner again (cooldown, warmup, windows), so the spread between
the runs is the spread a gate sees between a baseline and a later run of unchanged code. The
first run is the case's record; the windows of the others go into its ``calibration_runs``,
from which :mod:`pytest_llem.results.calibration` computes the calibration at the end of the
session.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from pytest_llem.config.models import CaseConfig
from pytest_llem.harness.case import CaseOutcome, CaseRunner
from pytest_llem.results.gate import BudgetRule
from pytest_llem.results.models import CaseRecord

__all__ = ["run_calibrated"]


def run_calibrated(
    runner: CaseRunner,
    case: CaseConfig,
    base: CaseRecord,
    *,
    runs: int,
    budget: Sequence[BudgetRule] = (),
) -> CaseOutcome:
    """Run ``case`` ``runs`` times in a row.

    Returns:
        The first run's outcome with the windows of the later runs in its record's
        ``calibration_runs``; the outcome of the first run that was not measured (skipped or
        failed) instead, so a case that cannot be calibrated says why.
    """
    first = runner.run(case, base, budget=budget)
    if first.result is None:
        return first
    later: list[CaseOutcome] = []
    for _ in range(runs - 1):
        again = runner.run(case, base, budget=budget)
        if again.result is None:
            return again
        later.append(again)
    windows = [outcome.record.repetitions for outcome in later]
    record = first.record.model_copy(update={"calibration_runs": windows})
    return dataclasses.replace(first, record=record)

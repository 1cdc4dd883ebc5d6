"""History: comparing a run with several saved runs, so the verdict sees between-run variation.

``--llem-compare=history[:K[:NAME]]`` (and ``llem compare BASE [BASE ...] CURRENT``) takes the
last K saved runs of this machine under one name as the baseline. One run's windows say nothing about
how much a whole run moves (thermal state, other tenants, clocks), so the baseline side's
median is resampled hierarchically: the runs with replacement, then the windows within each
picked run, pooled. When the runs differ, that interval is wider than a single run's; when they
agree, it is about as wide. The current side is resampled by window as in
:func:`~pytest_llem.results.comparison.ratio_interval`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_llem.exceptions import ResultStoreError
from pytest_llem.results.comparison import MIN_WINDOWS, difference_interval, ratio_interval
from pytest_llem.results.models import CaseRecord, RunRecord
from pytest_llem.results.stats import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, tail_percentiles
from pytest_llem.results.storage import SavedRun, list_saved_runs, safe_name

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    _FloatArray = npt.NDArray[np.float64]

__all__ = [
    "DEFAULT_HISTORY_RUNS",
    "MIN_HISTORY_RUNS",
    "HistorySpec",
    "hierarchical_medians",
    "history_intervals",
    "history_label",
    "load_history",
    "older_cases",
    "parse_history",
    "pooled_values",
    "select_history",
    "short_history_note",
]

#: Saved runs ``--llem-compare=history`` takes when no K is given.
DEFAULT_HISTORY_RUNS = 5
#: Runs a history needs before its between-run variation means anything; with fewer the
#: comparison is with the one run, and says so.
MIN_HISTORY_RUNS = 2

_SPEC = re.compile(r"^history(?::(.*))?$")


@dataclass(frozen=True)
class HistorySpec:
    """A parsed ``history[:K[:NAME]]``: how many saved runs to take, and under which name
    (None: the caller's default)."""

    runs: int
    name: str | None = None


def parse_history(spec: str) -> HistorySpec | None:
    """``history``, ``history:K`` or ``history:K:NAME`` as a :class:`HistorySpec`; None for
    any other spec.

    Raises:
        ResultStoreError: ``history:`` followed by something other than an integer >= 1 (and
            an optional name).
    """
    match = _SPEC.match(spec.strip())
    if match is None:
        return None
    raw = match.group(1)
    if raw is None:
        return HistorySpec(DEFAULT_HISTORY_RUNS)
    count, colon, name = raw.partition(":")
    try:
        runs = int(count)
    except ValueError:
        runs = 0
    if runs < 1 or (colon and not name.strip()):
        raise ResultStoreError(
            f"history:K[:NAME] needs a whole number of runs K >= 1 and, after a second colon, "
            f"a name; got {spec.strip()!r} (e.g. history:5 or history:5:main)"
        )
    return HistorySpec(runs, name.strip() or None)


def select_history(
    storage: Path, machine: str, *, runs: int, name: str | None = None
) -> list[SavedRun]:
    """The last ``runs`` saved runs of ``machine`` under one name, oldest first.

    Args:
        storage: The storage folder.
        machine: The machine id (:func:`~pytest_llem.results.storage.machine_id`).
        runs: How many to take (the newest ones).
        name: The save name (``--llem-save NAME``); None takes the name of the newest saved
            run of the machine, so a history is always of one name.

    Raises:
        ResultStoreError: the machine has no saved run (under that name).
    """
    saved = list_saved_runs(storage, machine)
    if not saved:
        raise ResultStoreError(f"no saved run for machine {machine} in {storage}")
    wanted = safe_name(name) if name else saved[-1].name
    same = [run for run in saved if run.name == wanted]
    if not same:
        names = ", ".join(sorted({run.name for run in saved}))
        raise ResultStoreError(
            f"no saved run named {wanted!r} for machine {machine} in {storage} (names: {names})"
        )
    return same[-runs:]


# --- the hierarchical bootstrap --------------------------------------------------------------


def hierarchical_medians(groups: Sequence[Sequence[float]]) -> _FloatArray:
    """Bootstrap medians of several runs' windows: runs resampled, then windows within each.

    Each resample picks ``len(groups)`` runs with replacement, then, within every picked run,
    as many windows as it has with replacement, and takes the median of all picked windows.
    Seeded with :data:`~pytest_llem.results.stats.BOOTSTRAP_SEED`, so equal inputs give equal
    medians.

    Args:
        groups: Per run, its per-window values (each run at least one value).

    Returns:
        :data:`~pytest_llem.results.stats.BOOTSTRAP_RESAMPLES` resampled medians.
    """
    import numpy as np

    sizes = np.asarray([len(g) for g in groups], dtype=np.int64)
    widest = int(sizes.max())
    padded = np.full((len(groups), widest), np.nan)
    for row, values in enumerate(groups):
        padded[row, : len(values)] = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(BOOTSTRAP_SEED + 1)  # not the single-run stream
    runs = rng.integers(0, len(groups), size=(BOOTSTRAP_RESAMPLES, len(groups)))
    picked_sizes = sizes[runs][:, :, None]  # (B, R, 1)
    slots = np.arange(widest)[None, None, :]
    draws = np.floor(rng.random((BOOTSTRAP_RESAMPLES, len(groups), widest)) * picked_sizes)
    windows = padded[runs[:, :, None], draws.astype(np.int64)]
    # a picked run contributes as many windows as it has: the padding slots beyond are dropped
    windows[slots >= picked_sizes] = np.nan
    medians: _FloatArray = np.nanmedian(windows.reshape(BOOTSTRAP_RESAMPLES, -1), axis=1)
    return medians


def _current_medians(current: Sequence[float]) -> _FloatArray:
    import numpy as np

    data = np.asarray(current, dtype=np.float64)
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    picks = rng.integers(0, data.size, size=(BOOTSTRAP_RESAMPLES, data.size))
    medians: _FloatArray = np.median(data[picks], axis=1)
    return medians


Triple = tuple[float, float, float]


def history_intervals(
    groups: Sequence[Sequence[float]], current: Sequence[float], confidence: float = 0.95
) -> tuple[Triple | None, Triple | None]:
    """Ratio and difference of medians (current against the pooled history), with 95% (or
    ``confidence``) intervals from the hierarchical bootstrap on the history side.

    With a single run (or none with values) this is exactly the single-run comparison
    (:func:`~pytest_llem.results.comparison.ratio_interval` and ``difference_interval``).

    Args:
        groups: Per history run, its per-window values of the metric.
        current: The current run's per-window values.
        confidence: The intervals' level: 0.95, or the corrected level of an adaptive case.

    Returns:
        ``((ratio, low, high) | None, (difference, low, high) | None)``; None where the pooled
        history or the current run has fewer than :data:`MIN_WINDOWS` values, and a ratio is
        None where a median (or a resampled history median) is not positive.
    """
    kept = [list(g) for g in groups if len(g) > 0]
    pooled = [v for g in kept for v in g]
    if len(kept) < MIN_HISTORY_RUNS:
        return (
            ratio_interval(pooled, current, confidence),
            difference_interval(pooled, current, confidence),
        )
    if len(pooled) < MIN_WINDOWS or len(current) < MIN_WINDOWS:
        return None, None
    import numpy as np

    base_median = float(np.median(np.asarray(pooled)))
    cur_median = float(np.median(np.asarray(current, dtype=np.float64)))
    base_samples = hierarchical_medians(kept)
    cur_samples = _current_medians(current)
    diffs = cur_samples - base_samples
    low, high = np.percentile(diffs, tail_percentiles(confidence))
    difference = (cur_median - base_median, float(low), float(high))
    if base_median <= 0 or cur_median < 0 or float(base_samples.min()) <= 0:
        return None, difference
    low, high = np.percentile(cur_samples / base_samples, tail_percentiles(confidence))
    return (cur_median / base_median, float(low), float(high)), difference


def pooled_values(groups: Sequence[Sequence[float]]) -> tuple[list[float], float | None]:
    """All runs' windows in one list, and their median (None without a value)."""
    import numpy as np

    pooled = [v for g in groups for v in g]
    return pooled, float(np.median(np.asarray(pooled))) if pooled else None


def history_label(runs: Sequence[SavedRun]) -> str:
    """How a history is named in reports: ``history of 3 runs (0002_main .. 0004_main)``."""
    if len(runs) == 1:
        return f"history of 1 run ({runs[0].path.name})"
    return f"history of {len(runs)} runs ({runs[0].label} .. {runs[-1].label})"


def short_history_note(found: int, wanted: int) -> str | None:
    """The warning for a history too short to show between-run variation; None when long enough."""
    if found >= MIN_HISTORY_RUNS:
        return None
    return (
        f"history: only {found} saved run of the {wanted} asked for: compared with it alone, so "
        "the interval does not include variation between runs (save more runs)"
    )


def load_history(
    storage: Path, machine: str, *, runs: int, name: str | None = None
) -> dict[str, Any]:
    """Read the last ``runs`` saved runs (:func:`select_history`).

    Returns:
        ``path`` and ``record`` of the newest run, ``history`` (the older records, oldest
        first), ``label`` (:func:`history_label`) and ``note`` (:func:`short_history_note`).

    Raises:
        ResultStoreError: no saved run, or one that cannot be read.
    """
    from pytest_llem.results.store import read_run_record

    selected = select_history(storage, machine, runs=runs, name=name)
    records = [read_run_record(run.path) for run in selected]
    return {
        "path": selected[-1].path,
        "record": records[-1],
        "history": tuple(records[:-1]),
        "label": history_label(selected),
        "note": short_history_note(len(selected), runs),
    }


def older_cases(baseline: RunRecord, history: Sequence[RunRecord]) -> dict[str, list[CaseRecord]]:
    """Per baseline case id, the same case in each older run of the history (oldest first)."""
    return {
        case.id: [c for record in history for c in record.cases if c.id == case.id]
        for case in baseline.cases
    }

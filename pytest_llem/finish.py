"""What happens to a run record when a session ends: compare it with a baseline and gate, save
it, and write the HTML page and the CSV table beside it.

Called by the plugin's session-finish hook with the record already written to disk; it returns
what to print and whether the session must fail, and never raises for a gate breach.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_llem.exceptions import LlemError
from pytest_llem.options import CompareBaseline, LlemOptions, StoreOptions
from pytest_llem.results.models import RunRecord
from pytest_llem.results.store import write_run_record

if TYPE_CHECKING:
    from pytest_llem.results.compare import Comparison

__all__ = ["Finish", "comparison_rows", "finish_run"]


@dataclass
class Finish:
    """The outcome of finishing a run: lines for the terminal, and whether to fail."""

    lines: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    breaches: list[str] = field(default_factory=list)
    failed: bool = False
    paths: dict[str, Path] = field(default_factory=dict)


def comparison_rows(comparison: Any) -> list[dict[str, Any]]:
    """A comparison as plain rows for the HTML page (and the record's ``comparison``)."""
    rows = []
    for item in comparison.metrics:
        ratio = item.ratio
        rows.append(
            {
                "case": item.case_id,
                "metric": item.metric,
                "unit": item.unit,
                "baseline": item.baseline_median,
                "current": item.current_median,
                "ratio": ratio.estimate if ratio else None,
                "low": ratio.low if ratio else None,
                "high": ratio.high if ratio else None,
                "verdict": item.verdict,
                "gated": item.gated,
                "reason": item.reason,
            }
        )
    return rows


def _compare(
    record: RunRecord, loaded: CompareBaseline, store: StoreOptions, finish: Finish
) -> Comparison | None:
    from pytest_llem.results.compare import compare_runs, format_breaches, format_table
    from pytest_llem.results.gate import FAIL_ON_EXAMPLE, parse_fail_on

    gating = bool(store.rules)
    rules = list(store.rules) if gating else parse_fail_on(FAIL_ON_EXAMPLE)
    comparison = compare_runs(
        loaded.record,
        record,
        rules,
        gate_estimated=store.gate_estimated,
        gate=gating,
        baseline_label=loaded.path.name,
    )
    if comparison.environment:
        what = "; ".join(comparison.environment)
        if store.strict:
            finish.errors.append(f"llem: refusing to compare runs of different machines: {what}")
            finish.failed = True
            return None
        finish.warnings.append(f"llem: the baseline ran elsewhere, figures may differ: {what}")
    finish.lines.append(f"compared with {loaded.path}")
    finish.lines.extend(format_table(comparison).splitlines())
    if not gating:  # under a gate they fail it, and are breaches
        finish.warnings.extend(f"llem: {problem}" for problem in comparison.problems)
    if gating and comparison.exit_code(store.fail_inconclusive):
        finish.failed = True
        finish.breaches.extend(
            format_breaches(comparison, fail_inconclusive=store.fail_inconclusive)
        )
    return comparison


def _comparison_record(comparison: Comparison, store: StoreOptions) -> dict[str, Any]:
    """What the run record keeps of a comparison: the baseline, the lines that failed the gate
    (why a metric could not be judged among them), run-level problems and one row per case and
    metric."""
    from pytest_llem.results.compare import format_breaches

    return {
        "baseline": comparison.baseline.label,
        "gated": comparison.gate,
        "problems": list(comparison.problems),
        "breaches": format_breaches(comparison, fail_inconclusive=store.fail_inconclusive)
        if comparison.gate
        else [],
        "rows": comparison_rows(comparison),
    }


def finish_run(record: RunRecord, options: LlemOptions) -> Finish:
    """Compare and gate (``--llem-compare``, with the baseline read at start-up into
    ``options.store.compare_baseline``; ``--llem-fail-on``; the comparison goes into the
    record), write the record, save it (``--llem-save``), and write the HTML page and, when
    asked, the CSV table, all from the record.

    Raises:
        ResultStoreError: the run record itself could not be written.
    """
    from pytest_llem.report.html import write_html
    from pytest_llem.report.tables import write_csv
    from pytest_llem.results.storage import save_run

    finish = Finish()
    store = options.store
    if store is not None and store.compare_baseline is not None:
        comparison = _compare(record, store.compare_baseline, store, finish)
        if comparison is not None:
            record.comparison = _comparison_record(comparison, store)
    finish.paths["record"], _copy = write_run_record(record, options.report_dir)
    if store is not None and store.save:
        try:
            finish.paths["saved"] = save_run(record, store.storage, store.save_name)
        except LlemError as e:
            finish.errors.append(f"llem: cannot save the run: {e}")
            finish.failed = True
    html = options.report_dir / "llem-report.html"
    try:
        write_html(record, html, comparison=record.comparison)
        finish.paths["html"] = html
    except Exception as e:  # the JSON record is written; a report failure must not hide it
        finish.errors.append(f"llem: cannot write the HTML report: {type(e).__name__}: {e}")
    if store is not None and store.csv is not None:
        try:
            write_csv(record, store.csv)
            finish.paths["csv"] = store.csv
        except (LlemError, OSError) as e:
            finish.errors.append(f"llem: cannot write the CSV table: {e}")
            finish.failed = True  # asked for and missing: as for a failed save
    return finish

"""What happens when a session ends: the recorded cases become the run record, which is compared
with a baseline and gated, written, saved, rendered as the HTML page and the CSV table, and
summed up in the terminal.

Called by the run recorder's session-finish and terminal-summary hooks (see ``recorder``);
``finish_run`` returns what to print and whether the session must fail, and never raises for a
gate breach. The ``--llem-compare`` baseline is read at start-up (``with_compare_baseline``) so a
missing one stops the session before any case runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_llem.exceptions import LlemError
from pytest_llem.machine import this_machine
from pytest_llem.options import CompareBaseline, LlemOptions, StoreOptions, load_compare_baseline
from pytest_llem.results.models import RunRecord
from pytest_llem.results.store import write_run_record
from pytest_llem.session import LlemSession

if TYPE_CHECKING:
    from pytest_llem.results.compare import Comparison

__all__ = [
    "Finish",
    "comparison_rows",
    "finish_run",
    "run_record",
    "with_compare_baseline",
    "write_summary",
]


@dataclass
class Finish:
    """The outcome of finishing a run: lines for the terminal, and whether to fail."""

    lines: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    breaches: list[str] = field(default_factory=list)
    calibration: list[str] = field(default_factory=list)
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
                "disturbed": item.disturbed,
                "confidence": item.confidence,
            }
        )
    return rows


def _compare(
    record: RunRecord, loaded: CompareBaseline, store: StoreOptions, finish: Finish
) -> Comparison | None:
    from pytest_llem.results.compare import compare_runs, format_breaches, format_table
    from pytest_llem.results.drift import DEFAULT_DRIFT_MARGIN
    from pytest_llem.results.gate import FAIL_ON_EXAMPLE, parse_fail_on

    gating = bool(store.rules)
    rules = list(store.rules) if gating else parse_fail_on(FAIL_ON_EXAMPLE)
    comparison = compare_runs(
        loaded.record,
        record,
        rules,
        gate_estimated=store.gate_estimated,
        gate=gating,
        baseline_label=loaded.label or loaded.path.name,
        history=loaded.history,
        # A store built before the margin existed (a test's stand-in) judges with the default.
        drift_margin=getattr(store, "drift_margin", DEFAULT_DRIFT_MARGIN),
    )
    if loaded.note is not None:
        finish.warnings.append(f"llem: {loaded.note}")
    if comparison.environment:
        what = "; ".join(comparison.environment)
        if store.strict:
            finish.errors.append(f"llem: refusing to compare runs of different machines: {what}")
            finish.failed = True
            return None
        finish.warnings.append(
            f"llem: the baseline ran elsewhere or with other settings, figures may differ: {what}"
        )
    finish.lines.append(f"compared with {loaded.label or loaded.path}")
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
    from pytest_llem.results.compare_format import drift_json
    from pytest_llem.results.drift import DEFAULT_DRIFT_MARGIN

    loaded = store.compare_baseline
    history = [r.run_id for r in (*loaded.history, loaded.record)] if loaded else []
    return {
        "baseline": comparison.baseline.label,
        # --llem-compare=history: the run ids of the history, oldest first
        **({"history": history} if len(history) > 1 else {}),
        "gated": comparison.gate,
        "problems": list(comparison.problems),
        "breaches": format_breaches(comparison, fail_inconclusive=store.fail_inconclusive)
        if comparison.gate
        else [],
        "rows": comparison_rows(comparison),
        "drift_margin": getattr(store, "drift_margin", DEFAULT_DRIFT_MARGIN).text,
        "drift": [drift_json(d) for d in comparison.drift],
    }


def _calibrate(record: RunRecord, store: StoreOptions, finish: Finish) -> None:
    """``--llem-calibrate=N``: the calibration of the gate from the N runs the cases hold,
    into the record and the terminal."""
    from pytest_llem.results.calibration import (
        calibrate_runs,
        calibration_lines,
        runs_of_record,
    )
    from pytest_llem.results.gate import FAIL_ON_EXAMPLE, parse_fail_on

    rules = list(store.rules) or parse_fail_on(FAIL_ON_EXAMPLE)
    calibration = calibrate_runs(runs_of_record(record), rules)
    record.calibration = calibration.to_json()
    finish.calibration = calibration_lines(calibration)


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
    if store is not None and store.calibrate:
        _calibrate(record, store, finish)
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


def with_compare_baseline(options: LlemOptions, *, root: Path) -> LlemOptions:
    """Read the ``--llem-compare`` baseline now, looked up under this machine's id as the run
    record will carry it (same hostname, platform and visible GPUs).

    Args:
        options: The session's options; returned unchanged when they compare with nothing.
        root: The project's root folder (for the machine description).

    Raises:
        ConfigurationError: the baseline cannot be found or read.
    """
    if options.store is None or options.store.compare is None:
        return options
    from pytest_llem.results.storage import machine_id

    return load_compare_baseline(options, machine_id(this_machine(root)))


def run_record(session: LlemSession, *, root: Path) -> RunRecord:
    """The run record of the session's recorded cases, with this machine, its reproducibility
    manifest and the idle baseline.

    Args:
        session: The session state holding the cases and options.
        root: The project's root folder (for the machine description).
    """
    from pytest_llem.manifest import this_manifest

    baseline = session.baseline.record if session.baseline is not None else None
    if baseline is None:  # measured on xdist workers: each case carries its own
        baseline = next((case.baseline for case in session.cases if case.baseline), None)
    machine = this_machine(root)
    profile = session.options.profile
    return RunRecord(
        run_id=session.run_id,
        created_at=session.started_at,
        finished_at=datetime.now(timezone.utc),
        machine=machine,
        options=session.options.given,
        baseline=baseline,
        profile=profile,
        cases=session.cases,
        manifest=this_manifest(
            root, machine=machine, profile=profile.name if profile is not None else None
        ),
        shard=session.shard,
    )


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def write_summary(reporter: Any, session: LlemSession) -> None:
    """Write the end-of-session summary: one row per case, the scorecard, where the record,
    journal and reports are, the comparison, and what went wrong writing them or failed the
    gate.

    Args:
        reporter: pytest's terminal reporter (``write_sep``, ``write_line``).
        session: The finished session's state.
    """
    record = session.record
    if record is None and session.store_error is None and not session.journal_error:
        return
    reporter.write_sep("-", "llem benchmark summary")
    if record is not None:
        from pytest_llem.report.terminal import summary_lines

        for line in summary_lines(record):
            reporter.write_line(line)
        _write_scorecard(reporter, record)
    if session.store_error is not None:
        reporter.write_line(f"llem: {session.store_error}", red=True)
    if session.journal_error is not None:
        reporter.write_line(
            f"llem: {session.journal_error} (no case journalled after it: a killed "
            "run could not be rebuilt)",
            red=True,
        )
    if session.finish is not None:
        _write_finish(reporter, session.finish, session)


def _write_scorecard(reporter: Any, record: RunRecord) -> None:
    """The scorecard after the summary table, when a case measured something."""
    from pytest_llem.report.scorecard import build_scorecard
    from pytest_llem.report.scorecard_format import scorecard_lines

    card = build_scorecard(record)
    if not card.tables:
        return
    reporter.write_sep("-", "llem scorecard")
    for line in scorecard_lines(card):
        reporter.write_line(line)


def _write_finish(reporter: Any, finish: Finish, session: LlemSession) -> None:
    for kind, path in finish.paths.items():
        label = "run record" if kind == "record" else kind
        reporter.write_line(f"llem {label}: {_shown(path)}")
    if session.journal is not None and session.journal_error is None:
        reporter.write_line(f"llem journal: {_shown(session.journal.path)}")
    if finish.lines:
        reporter.write_sep("-", "llem comparison")
        for line in finish.lines:
            reporter.write_line(line)
    if finish.calibration:
        reporter.write_sep("-", "llem calibration")
        for line in finish.calibration:
            reporter.write_line(line)
    for line in finish.warnings:
        reporter.write_line(line, yellow=True)
    for line in finish.errors:
        reporter.write_line(line, red=True)
    if finish.breaches:
        reporter.write_sep("-", "llem gate failed", red=True)
        for line in finish.breaches:
            reporter.write_line(line, red=True)

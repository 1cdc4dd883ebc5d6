"""Rendering a comparison of two runs: a terminal table, Markdown, JSON and breach lines.

The plugin's terminal summary and ``llem compare`` both render a
:class:`~pytest_llem.results.comparison.Comparison` with these functions.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pytest_llem.results.comparison import (
    Comparison,
    Interval,
    MetricComparison,
    RunIdentity,
    UnmatchedCase,
)
from pytest_llem.results.drift import DISTURBED_PREFIX, CaseDrift

__all__ = ["drift_json", "format_breaches", "format_table", "to_json", "to_markdown"]


def _number(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:.4g}{f' {unit}' if unit else ''}"


def _change(m: MetricComparison) -> str:
    """``1.200 [1.150, 1.250]`` for a ratio, ``+20 [+12, +31] ms`` for a difference; the
    level follows when it is not 95% (an adaptive case's corrected one)."""
    level = "" if m.confidence == 0.95 else f" ({m.level})"
    if m.rule.relative:
        r = m.ratio
        return "-" if r is None else f"{r.estimate:.3f} [{r.low:.3f}, {r.high:.3f}]{level}"
    d = m.difference
    if d is None:
        return "-"
    unit = f" {m.unit}" if m.unit else ""
    return f"{d.estimate:+.4g} [{d.low:+.4g}, {d.high:+.4g}]{unit}{level}"


def _verdict(m: MetricComparison) -> str:
    if m.disturbed:
        return f"{m.verdict} (disturbed)"
    if m.verdict == "not comparable" or m.gated or m.reason is None:
        return m.verdict
    return f"{m.verdict} (not gated)"


def _breach(m: MetricComparison) -> str:
    if m.verdict == "not judged":
        return (
            f"{m.case_id}: {m.metric} could not be judged (limit {m.rule.limit_text}): {m.reason}"
        )
    what = "ratio" if m.rule.relative else "difference"
    interval = m.interval
    bounds = f"[{interval.low:.4g}, {interval.high:.4g}]" if interval else "-"
    estimate = f"{interval.estimate:.4g}" if interval else "-"
    return (
        f"{m.case_id}: {m.metric} {m.verdict} (limit {m.rule.limit_text}): "
        f"baseline {_number(m.baseline_median, m.unit)}, current {_number(m.current_median, m.unit)}, "
        f"{what} {estimate}, {m.level} CI {bounds}" + (f"; {m.reason}" if m.disturbed else "")
    )


def format_breaches(comparison: Comparison, *, fail_inconclusive: bool = False) -> list[str]:
    """One line per reason the gate fails: first the run-level problems (under a gate), then
    per metric the case, metric, baseline, current, ratio (or difference) and its interval, or
    why it could not be judged."""
    problems = list(comparison.problems) if comparison.gate else []
    return problems + [_breach(m) for m in comparison.breaches(fail_inconclusive)]


def _headline(comparison: Comparison) -> str:
    counts = comparison.counts()
    cases = len({m.case_id for m in comparison.metrics})
    parts = [f"{n} {verdict}" for verdict, n in counts.items() if n]
    gated = "" if comparison.gate else " (report only, nothing gated)"
    plural = "" if cases == 1 else "s"
    return f"{cases} case{plural} compared: {', '.join(parts) or 'no metric'}{gated}"


def _extras(comparison: Comparison) -> list[tuple[str, list[str]]]:
    def unmatched(items: Iterable[UnmatchedCase]) -> list[str]:
        return [f"{u.case.id}{f' ({u.note})' if u.note else ''}" for u in items]

    return [
        ("Problems", list(comparison.problems)),
        (
            "Not measured in the baseline (nothing to compare against)",
            unmatched(comparison.unmeasured),
        ),
        ("Compared although their parameters changed", unmatched(comparison.changed)),
        ("New cases (not in the baseline)", unmatched(comparison.new)),
        ("Gone cases (not in this run)", unmatched(comparison.gone)),
        ("Environment differs, figures may differ for that alone", list(comparison.environment)),
        (
            "Machine disturbed (a breach there is inconclusive, not regressed)",
            [f"{d.case_id}: {d.reason}" for d in comparison.disturbed],
        ),
        ("Machine busy", [f"{d.case_id}: {w}" for d in comparison.drift for w in d.warnings]),
        ("Machine state not compared", _drift_notes(comparison)),
    ]


def _drift_notes(comparison: Comparison) -> list[str]:
    """Why drift was not judged, once per reason (an old record lacks it for every case)."""
    counts: dict[str, int] = {}
    for d in comparison.drift:
        if d.note:
            counts[d.note] = counts.get(d.note, 0) + 1
    return [f"{note} ({n} case{'' if n == 1 else 's'})" for note, n in counts.items()]


def _notes(comparison: Comparison) -> list[str]:
    """Each metric's reason; a disturbed case's evidence is in its own section already."""
    return [
        f"{m.case_id} {m.metric}: {m.reason}"
        for m in comparison.metrics
        if m.reason and not m.reason.startswith(DISTURBED_PREFIX)
    ]


_HEADER = ("case", "metric", "rule", "baseline", "current", "ratio [95% CI]", "verdict")


def _rows(comparison: Comparison) -> list[tuple[str, ...]]:
    return [
        (
            m.case_id,
            m.metric,
            m.rule.limit_text,
            _number(m.baseline_median, m.unit),
            _number(m.current_median, m.unit),
            _change(m),
            _verdict(m),
        )
        for m in comparison.metrics
    ]


def format_table(comparison: Comparison) -> str:
    """A plain-text table for a terminal: one row per case and metric, then new and gone
    cases, environment differences and the reasons behind ungated or missing verdicts.

    For an absolute rule the ``ratio`` column holds the difference of medians instead.
    """
    lines = [
        f"baseline: {comparison.baseline.label}",
        f"current:  {comparison.current.label}",
        _headline(comparison),
    ]
    rows = _rows(comparison)
    if rows:
        widths = [max(len(row[i]) for row in [_HEADER, *rows]) for i in range(len(_HEADER))]
        for row in [_HEADER, *rows]:
            lines.append(
                "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            )
    notes = _notes(comparison)
    for title, items in [*_extras(comparison), ("Notes", notes)]:
        if items:
            lines.append(f"{title}:")
            lines.extend(f"  {item}" for item in items)
    return "\n".join(lines)


def _md(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _code(text: str) -> str:
    # GitHub splits table cells on "|" even inside a code span, unless it is escaped.
    return f"`{text.replace('|', chr(92) + '|')}`" if "`" not in text else _md(text)


def to_markdown(comparison: Comparison) -> str:
    """A Markdown report for a pull-request comment: a headline, one table row per case and
    metric (verdicts as words, regressions in bold), then new and gone cases and environment
    differences."""
    lines = [
        "### pytest-llem comparison",
        "",
        _headline(comparison),
        "",
        f"- Baseline: {_md(comparison.baseline.label)}",
        f"- Current: {_md(comparison.current.label)}",
        "",
    ]
    rows = _rows(comparison)
    if rows:
        lines.append("| Case | Metric | Rule | Baseline | Current | Ratio [95% CI] | Verdict |")
        lines.append("|---|---|---|---|---|---:|---|")
        for m, row in zip(comparison.metrics, rows, strict=True):
            verdict = f"**{row[6]}**" if m.gated and m.verdict == "regressed" else row[6]
            cells = [_code(row[0]), _code(row[1]), *(_md(c) for c in row[2:6]), verdict]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    notes = _notes(comparison)
    for title, items in [*_extras(comparison), ("Notes", notes)]:
        if items:
            lines.append(f"**{title}:**")
            lines.extend(f"- {_md(item)}" for item in items)
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _interval_json(interval: Interval | None) -> dict[str, float] | None:
    if interval is None:
        return None
    return {"estimate": interval.estimate, "low": interval.low, "high": interval.high}


def _metric_json(m: MetricComparison) -> dict[str, Any]:
    return {
        "case": m.case_id,
        "metric": m.metric,
        "rule": m.rule.text,
        "direction": m.rule.direction,
        "threshold": m.rule.threshold,
        "relative": m.rule.relative,
        "unit": m.unit,
        "source": m.source,
        "baseline": {"median": m.baseline_median, "n": m.baseline_n},
        "current": {"median": m.current_median, "n": m.current_n},
        "ratio": _interval_json(m.ratio),
        "difference": _interval_json(m.difference),
        "verdict": m.verdict,
        "gated": m.gated,
        "reason": m.reason,
        "disturbed": m.disturbed,
        "confidence": m.confidence,
    }


def drift_json(drift: CaseDrift) -> dict[str, Any]:
    """One case's drift as a JSON-ready dict."""
    return {
        "case": drift.case_id,
        "disturbed": drift.disturbed,
        "evidence": list(drift.evidence),
        "warnings": list(drift.warnings),
        "note": drift.note,
    }


def to_json(comparison: Comparison, *, fail_inconclusive: bool = False) -> dict[str, Any]:
    """The comparison as a JSON-ready dict (ratios, intervals, verdicts, new, gone and
    unmeasured cases, run-level problems, environment differences, the lines that fail the
    gate and the exit code under ``fail_inconclusive``)."""

    def run(identity: RunIdentity) -> dict[str, Any]:
        return {
            "label": identity.label,
            "run_id": identity.run_id,
            "created_at": identity.created_at,
            "commit": identity.commit,
            "machine": identity.machine,
        }

    def unmatched(items: Iterable[UnmatchedCase]) -> list[dict[str, Any]]:
        return [{"case": u.case.id, "note": u.note} for u in items]

    return {
        "baseline": run(comparison.baseline),
        "current": run(comparison.current),
        "rules": [rule.text for rule in comparison.rules],
        "gate": comparison.gate,
        "gate_estimated": comparison.gate_estimated,
        "fail_inconclusive": fail_inconclusive,
        "metrics": [_metric_json(m) for m in comparison.metrics],
        "new": unmatched(comparison.new),
        "gone": unmatched(comparison.gone),
        "unmeasured": unmatched(comparison.unmeasured),
        "problems": list(comparison.problems),
        "environment": list(comparison.environment),
        "drift": [drift_json(d) for d in comparison.drift],
        "counts": comparison.counts(),
        "breaches": format_breaches(comparison, fail_inconclusive=fail_inconclusive),
        "exit_code": comparison.exit_code(fail_inconclusive),
    }

"""The scorecard as text (the terminal and ``llem scorecard``), Markdown (a model card, a pull
request) and JSON, all from :func:`pytest_llem.report.scorecard.build_scorecard`.

A cell is the median with its 95% interval in brackets and ``est.`` after an estimated figure;
a missing figure is ``n/a`` with a numbered note giving the record's reason.
"""

from __future__ import annotations

from typing import Any, Literal

from pytest_llem.report.scorecard import (
    FIGURES,
    Figure,
    Scorecard,
    ScorecardRow,
    ScorecardTable,
    build_scorecard,
)
from pytest_llem.report.terminal import format_table
from pytest_llem.results.models import RunRecord

__all__ = [
    "FORMATS",
    "figure_text",
    "footer_lines",
    "format_number",
    "render_scorecard",
    "row_label",
    "scorecard_json",
    "scorecard_lines",
    "scorecard_markdown",
]

Format = Literal["table", "markdown", "json"]
#: The formats ``llem scorecard --format`` takes.
FORMATS: tuple[str, ...] = ("table", "markdown", "json")

_TINY_MODEL = "llem-tiny"
_LEGEND = (
    "Median over the measured windows [95% bootstrap interval of the median; none under 3 "
    "windows]; est. = estimated (a model, not a hardware counter).",
    "J/1k out tok = 1000 x energy_per_output_token_j; TTFT p99 at the row's load; goodput = "
    "requests/s meeting the SLO (docs/metrics.md, The scorecard).",
)
_TINY_NOTE = (
    "llem-tiny has random weights: its figures show the plugin working, not a model's merit."
)


def format_number(value: float | None) -> str:
    """Three significant digits, thousands grouped; ``n/a`` for None."""
    if value is None:
        return "n/a"
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def figure_text(figure: Figure, notes: dict[str, int], *, mark_estimated: bool = True) -> str:
    """A figure as one cell: ``239 [217, 710] est.``, or ``n/a (N)`` where N numbers its
    reason in ``notes`` (reason -> number, added to as reasons come). ``mark_estimated=False``
    leaves ``est.`` to the caller (the HTML page marks the cell instead)."""
    if figure.value is None:
        reason = figure.missing or "no value"
        number = notes.setdefault(reason, len(notes) + 1)
        return f"n/a ({number})"
    text = format_number(figure.value)
    if figure.low is not None and figure.high is not None:
        text += f" [{format_number(figure.low)}, {format_number(figure.high)}]"
    return text + " est." if figure.estimated and mark_estimated else text


def row_label(row: ScorecardRow) -> str:
    """A row's workload, with the case's outcome when it did not pass."""
    return row.workload if row.outcome == "passed" else f"{row.workload} [{row.outcome}]"


def _header() -> list[str]:
    return ["workload", "scenario", *(spec.header for spec in FIGURES)]


def _rows(table: ScorecardTable, notes: dict[str, int]) -> list[list[str]]:
    return [
        [
            row_label(row),
            row.setting,
            *(figure_text(row.figures[spec.key], notes) for spec in FIGURES),
        ]
        for row in table.rows
    ]


def footer_lines(card: Scorecard, notes: dict[str, int]) -> list[str]:
    """The numbered reasons of missing figures, the legend and what was left out."""
    lines = [f"({number}) {reason}" for reason, number in notes.items()]
    lines.extend(_LEGEND)
    if any(table.model == _TINY_MODEL for table in card.tables):
        lines.append(_TINY_NOTE)
    if card.skipped:
        lines.append(f"not in the scorecard (skipped): {', '.join(card.skipped)}")
    return lines


def _heading(card: Scorecard) -> str:
    profile = f", profile {card.profile}" if card.profile else ""
    return f"run {card.run_id}{profile}"


def scorecard_lines(card: Scorecard) -> list[str]:
    """The scorecard as text lines: a title and a table per model, engine and hardware, then
    the numbered reasons for missing figures and the legend."""
    if not card.tables:
        return ["no measured case: no scorecard", *footer_lines(card, {})[1:]]
    notes: dict[str, int] = {}
    lines = [_heading(card)]
    for table in card.tables:
        lines += ["", table.title, *format_table(_header(), _rows(table, notes), left=2)]
    return [*lines, "", *footer_lines(card, notes)]


def _markdown_cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def scorecard_markdown(card: Scorecard) -> str:
    """The scorecard as Markdown: a heading and a table per model, engine and hardware,
    ready to paste into a model card or a pull-request comment."""
    notes: dict[str, int] = {}
    lines = [f"### Energy scorecard ({_markdown_cell(_heading(card))})", ""]
    if not card.tables:
        lines += ["No measured case: no scorecard.", ""]
    for table in card.tables:
        header = _header()
        lines += [
            f"#### {_markdown_cell(table.title)}",
            "",
            "| " + " | ".join(header) + " |",
            "| --- | --- |" + " ---: |" * (len(header) - 2),
        ]
        for row in _rows(table, notes):
            lines.append("| " + " | ".join(_markdown_cell(cell) for cell in row) + " |")
        lines.append("")
    footer = footer_lines(card, notes)
    if notes:
        lines += [*(f"- {_markdown_cell(line)}" for line in footer[: len(notes)]), ""]
    for line in footer[len(notes) :]:
        lines += [_markdown_cell(line), ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def _figure_json(figure: Figure) -> dict[str, Any]:
    return {
        "value": figure.value,
        "ci95_low": figure.low,
        "ci95_high": figure.high,
        "unit": figure.unit,
        "source": figure.source,
        "derived_from": figure.derived_from,
        "n": figure.n,
        "missing": figure.missing,
    }


def scorecard_json(card: Scorecard) -> dict[str, Any]:
    """The scorecard as plain data: the columns, then per table its rows with every figure's
    value, interval, unit, source, the metric it came from and, when missing, why."""
    return {
        "run_id": card.run_id,
        "profile": card.profile,
        "figures": [
            {
                "key": spec.key,
                "header": spec.header,
                "unit": spec.unit,
                "metric": spec.metric,
                "better": spec.better,
            }
            for spec in FIGURES
        ],
        "tables": [
            {
                "model": table.model,
                "backend": table.backend,
                "engine_version": table.engine_version,
                "hardware": table.hardware,
                "rows": [
                    {
                        "workload": row.workload,
                        "shape": row.shape,
                        "scenario": row.scenario,
                        "setting": row.setting,
                        "batch_size": row.batch_size,
                        "rate_rps": row.rate_rps,
                        "case": row.case_id,
                        "outcome": row.outcome,
                        "figures": {k: _figure_json(f) for k, f in row.figures.items()},
                    }
                    for row in table.rows
                ],
            }
            for table in card.tables
        ],
        "skipped": list(card.skipped),
    }


def render_scorecard(record: RunRecord, fmt: str = "table") -> str:
    """The scorecard of a record in ``fmt`` (``table``, ``markdown`` or ``json``).

    Raises:
        ValueError: an unknown format.
    """
    import json

    card = build_scorecard(record)
    if fmt == "table":
        return "\n".join(scorecard_lines(card)) + "\n"
    if fmt == "markdown":
        return scorecard_markdown(card)
    if fmt == "json":
        return json.dumps(scorecard_json(card), indent=2) + "\n"
    raise ValueError(f"unknown scorecard format {fmt!r}; choose one of {', '.join(FORMATS)}")

"""The terminal summary: one row per case, built from the run record alone."""

from __future__ import annotations

from collections.abc import Sequence

from pytest_llem.results.models import CaseRecord, RunRecord

__all__ = ["COLUMNS", "format_table", "summary_lines", "summary_rows"]

COLUMNS = (
    "case",
    "backend",
    "meter",
    "J/out tok",
    "out tok/s",
    "TTFT p50 ms",
    "TPOT p50 ms",
)


def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    magnitude = abs(value)
    if magnitude == 0:
        return "0"
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def _metric(case: CaseRecord, name: str) -> str:
    summary = case.metrics.get(name)
    if summary is None or summary.median is None:
        return "n/a"
    text = _fmt(summary.median)
    return f"{text} (est.)" if summary.source == "estimated" else text


def summary_rows(record: RunRecord) -> list[list[str]]:
    """One row of COLUMNS per case."""
    rows = []
    for case in record.cases:
        meter = "+".join(m.name for m in case.meters) or "-"
        if case.outcome != "passed" and not case.metrics:
            status = case.error.type if case.error else case.outcome
            rows.append([case.name, case.backend or "-", meter, status, "", "", ""])
            continue
        name = case.name if case.outcome == "passed" else f"{case.name} [{case.outcome}]"
        rows.append(
            [
                f"{name} (hot)" if case.measured_hot else name,
                case.backend,
                meter,
                _metric(case, "energy_per_output_token_j"),
                _metric(case, "output_tokens_per_s"),
                _metric(case, "ttft_ms.p50"),
                _metric(case, "tpot_ms.p50"),
            ]
        )
    return rows


def format_table(
    header: Sequence[str], rows: Sequence[Sequence[str]], *, left: int = 3
) -> list[str]:
    """Text columns: the first ``left`` left-aligned, the rest (numbers) right-aligned."""
    widths = [len(h) for h in header]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            cell.ljust(w) if i < left else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def _baseline_line(record: RunRecord) -> str | None:
    baseline = record.baseline
    if baseline is None:
        return None
    parts = [
        f"{domain} {d.idle_power_w:.3g} W"
        + (f" ±{d.relative_spread:.1%}" if d.relative_spread is not None else "")
        + (" (est.)" if d.source == "estimated" else "")
        for domain, d in baseline.domains.items()
    ]
    origin = "cached" if baseline.cached else f"measured over {baseline.seconds:g} s"
    return f"idle baseline ({origin}): {', '.join(parts) or 'no domain'}"


def summary_lines(record: RunRecord) -> list[str]:
    """The whole table, header first, then the idle baseline and cases measured hot."""
    lines = format_table(COLUMNS, summary_rows(record))
    baseline = _baseline_line(record)
    if baseline is not None:
        lines.append(baseline)
    hot = [case.name for case in record.cases if case.measured_hot]
    if hot:
        lines.append(
            f"measured hot (a window started well above idle temperature; try "
            f"--llem-cooldown=temperature): {', '.join(hot)}"
        )
    return lines

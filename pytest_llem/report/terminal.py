"""The terminal summary: one row per case, built from the run record alone.

A case's name carries a mark for what makes its figures need a second look (``hot``,
``saturated``, ``dynamic<0``, ``multi-node``); the lines after the table say what each mark means and name the
cases, and give the reason of every skipped case.
"""

from __future__ import annotations

from collections.abc import Sequence

from pytest_llem.report.search_lines import search_lines
from pytest_llem.results.catalogue import metric
from pytest_llem.results.models import CaseRecord, RunRecord

__all__ = ["COLUMNS", "METRIC_COLUMNS", "format_table", "summary_lines", "summary_rows"]

#: The metric columns: header and catalogue name (a name not in the catalogue fails on import).
METRIC_COLUMNS: tuple[tuple[str, str], ...] = tuple(
    (header, metric(name).name)
    for header, name in (
        ("J/out tok", "energy_per_output_token_j"),
        ("out tok/s", "output_tokens_per_s"),
        ("TTFT p50 ms", "ttft_ms.p50"),
        ("TPOT p50 ms", "tpot_ms.p50"),
    )
)
COLUMNS = ("case", "backend", "meter", *(header for header, _ in METRIC_COLUMNS))


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


#: Longest line the summary writes for a skipped case's reason.
REASON_WIDTH = 120


def _saturated(case: CaseRecord) -> int:
    return sum(1 for rep in case.repetitions if rep.server is not None and rep.server.saturated)


def _below_idle(case: CaseRecord) -> int:
    return sum(1 for rep in case.repetitions if rep.dynamic_energy_negative)


def _flags(case: CaseRecord) -> list[str]:
    """The marks after a case's name: figures that need a second look."""
    flags = []
    if case.measured_hot:
        flags.append("hot")
    if _saturated(case):
        flags.append("saturated")
    if _below_idle(case):
        flags.append("dynamic<0")
    if case.multi_node:
        flags.append("multi-node")
    if case.machine_state is not None and case.machine_state.disturbed:
        flags.append("disturbed")
    return flags


def summary_rows(record: RunRecord) -> list[list[str]]:
    """One row of COLUMNS per case."""
    rows = []
    for case in record.cases:
        meter = "+".join(m.name for m in case.meters) or "-"
        if case.outcome != "passed" and not case.metrics:
            status = case.error.type if case.error else case.outcome
            blanks = [""] * (len(METRIC_COLUMNS) - 1)
            rows.append([case.name, case.backend or "-", meter, status, *blanks])
            continue
        name = case.name if case.outcome == "passed" else f"{case.name} [{case.outcome}]"
        flags = _flags(case)
        rows.append(
            [
                f"{name} ({', '.join(flags)})" if flags else name,
                case.backend,
                meter,
                *(_metric(case, name) for _, name in METRIC_COLUMNS),
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


def _shortened(text: str, width: int) -> str:
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 3].rstrip() + "..."


def _flag_lines(record: RunRecord) -> list[str]:
    """What each mark in the table means, and which cases carry it."""
    lines = []
    disturbed = [
        f"{case.name} ({'; '.join(case.machine_state.disturbances)})"
        for case in record.cases
        if case.machine_state is not None and case.machine_state.disturbed
    ]
    if disturbed:
        lines.append(
            "disturbed (the machine changed between the case's windows; docs/ci.md, Reading a "
            f"disturbed case): {', '.join(disturbed)}"
        )
    hot = [case.name for case in record.cases if case.measured_hot]
    if hot:
        lines.append(
            f"measured hot (a window started well above idle temperature; try "
            f"--llem-cooldown=temperature): {', '.join(hot)}"
        )
    saturated = [
        f"{case.name} ({_saturated(case)} of {len(case.repetitions)} windows{_rates(case)})"
        for case in record.cases
        if _saturated(case) and case.part_of is None  # a capacity search saturates on purpose
    ]
    if saturated:
        lines.append(
            "saturated (the server fell behind the target arrival rate: its figures are for "
            f"the load it reached): {', '.join(saturated)}"
        )
    below = [
        f"{case.name} ({_below_idle(case)} of {len(case.repetitions)} windows)"
        for case in record.cases
        if _below_idle(case)
    ]
    if below:
        lines.append(
            "negative dynamic energy (energy below idle power x duration, reported unclamped: "
            f"the idle baseline may be stale): {', '.join(below)}"
        )
    spread = [case.name for case in record.cases if case.multi_node]
    if spread:
        lines.append(
            "multi-node (the engine may run on GPUs this process cannot measure, as through "
            f"Ray: energy covers only the measured GPUs): {', '.join(spread)}"
        )
    return lines


def _rates(case: CaseRecord) -> str:
    """The achieved and target rate of a case's first saturated window (the reason is in the
    case's notes)."""
    for rep in case.repetitions:
        server = rep.server
        if server is not None and server.saturated and server.achieved_rate_rps is not None:
            return (
                f", first {server.achieved_rate_rps:.3g} of {server.target_rate_rps:.3g} requests/s"
            )
    return ""


def _skip_lines(record: RunRecord) -> list[str]:
    """Each skipped case with its reason (its first note), shortened to one line."""
    return [
        _shortened(f"skipped {case.name}: {case.notes[0]}", REASON_WIDTH)
        for case in record.cases
        if case.outcome == "skipped" and case.notes
    ]


def summary_lines(record: RunRecord) -> list[str]:
    """The whole table, header first, then the idle baseline, what the marks in the table
    mean and why cases were skipped."""
    lines = format_table(COLUMNS, summary_rows(record))
    baseline = _baseline_line(record)
    if baseline is not None:
        lines.append(baseline)
    return [
        *lines,
        *_shard_lines(record),
        *_flag_lines(record),
        *_adaptive_lines(record),
        *_skip_lines(record),
        *search_lines(record),
    ]


def _adaptive_lines(record: RunRecord) -> list[str]:
    """How many windows each ``repeat=auto`` case took and why it stopped."""
    return [
        _shortened(f"repeat=auto {case.name}: {case.adaptive.summary}", REASON_WIDTH)
        for case in record.cases
        if case.adaptive is not None
    ]


def _shard_lines(record: RunRecord) -> list[str]:
    """What share of a sharded session the record holds, and what a partial merge lacks."""
    from pytest_llem.results.shards import partial_note

    lines = []
    if record.shard is not None:
        shard = record.shard
        lines.append(
            f"shard {shard.label}: {len(shard.ids)} of {shard.collection_size} llem cases, "
            f"{shard.groups} model-load group(s), balanced by {shard.costs}"
        )
    if record.partial is not None:
        lines.append(partial_note(record.partial))
    return lines

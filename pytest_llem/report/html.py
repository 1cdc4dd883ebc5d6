"""The HTML report: one self-contained page rendered with Jinja2 from the run record alone.

Everything from the record (test ids, parameters, prompts, notes, error messages) goes through
Jinja2's autoescaping; the only markup inserted as is are the charts of
:mod:`pytest_llem.report.svg`, which escape their own text. Styles and the small sorting and
filtering script are inline and pinned by hash in the page's Content-Security-Policy, so nothing
else can run even if something slipped through. No network, no external files.
"""

from __future__ import annotations

import base64
import hashlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup

from pytest_llem.report import svg
from pytest_llem.report.html_attribution import attribution_view
from pytest_llem.report.html_run import json_text, kv, run_section, scorecard_section
from pytest_llem.report.html_search import search_sections
from pytest_llem.report.tables import case_machine
from pytest_llem.results import catalogue
from pytest_llem.results.models import CaseRecord, MetricSummary, RunRecord
from pytest_llem.results.store import atomic_write_text

__all__ = [
    "HEADLINE_METRICS",
    "HTML_FILENAME",
    "render_html",
    "write_html",
]

HTML_FILENAME = "llem-report.html"

#: Columns of the case table: metric name, header and its unit (from the metric catalogue).
HEADLINE_METRICS: tuple[tuple[str, str, str], ...] = tuple(
    (name, label, catalogue.metric(name).unit)
    for name, label in (
        ("energy_per_output_token_j", "Energy / out token"),
        ("output_tokens_per_s", "Out throughput"),
        ("ttft_ms.p50", "TTFT p50"),
        ("tpot_ms.p50", "TPOT p50"),
        ("e2e_ms.p50", "E2E p50"),
        ("avg_power_w", "Avg power"),
    )
)

_ENERGY = "energy_per_output_token_j"
_THROUGHPUT = "output_tokens_per_s"
_PARETO_LATENCIES = ("ttft_ms.p50", "e2e_ms.p50")
_VERDICTS = ("regressed", "improved", "unchanged", "inconclusive")
_FAMILY_STATS = catalogue.LATENCY_STATISTICS


@lru_cache(maxsize=1)
def _environment() -> Environment:
    env = Environment(
        loader=PackageLoader("pytest_llem.report", "templates"),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["num"] = svg.format_number
    return env


def _csp_hash(text: str) -> str:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return "'sha256-" + base64.b64encode(digest).decode("ascii") + "'"


def _chart(drawing: svg.Svg) -> Markup:
    """The one place markup enters the page unescaped: charts svg.py built from escaped text."""
    if not isinstance(drawing, svg.Svg):
        raise TypeError("only charts drawn by pytest_llem.report.svg are inserted as markup")
    return Markup(str(drawing))


def _test_function(case: CaseRecord) -> str:
    """The node id of the test function a case came from (its id without ``[...]``)."""
    return case.id.split("[", 1)[0]


def _unit(record: RunRecord, name: str, default: str) -> str:
    for case in record.cases:
        if name in case.metrics:
            return case.metrics[name].unit
    return catalogue.unit_of(name, default)


def _median(case: CaseRecord, name: str) -> float | None:
    return case.value(name) if name in case.metrics else None


@dataclass(frozen=True)
class _Cell:
    sort: str
    text: str
    estimated: bool = False
    tip: str = ""


def _headline_cell(summary: MetricSummary | None) -> _Cell:
    value = summary.median if summary is not None else None
    if summary is None or value is None:
        return _Cell("", "n/a", tip=(summary.note or "") if summary is not None else "")
    return _Cell(f"{value:.6g}", svg.format_number(value), summary.source == "estimated")


def _sweep_text(case: CaseRecord) -> str:
    return ", ".join(f"{key}={json_text(value)}" for key, value in case.sweep.items())


@dataclass
class _CaseView:
    index: int
    anchor: str
    case: CaseRecord
    machine: str
    sweep: str
    cells: list[_Cell]
    settings: list[tuple[str, str]] = field(default_factory=list)
    metrics: list[dict[str, str]] = field(default_factory=list)
    families: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    n: str = ""
    latency_chart: Markup | None = None
    power_chart: Markup | None = None
    thermal: list[dict[str, str]] = field(default_factory=list)
    attribution: dict[str, Any] | None = None


def _usual_n(case: CaseRecord) -> int | None:
    counts = Counter(s.n for s in case.metrics.values())
    return counts.most_common(1)[0][0] if counts else None


def _metric_cell(summary: MetricSummary, usual: int | None) -> dict[str, str]:
    """A metric's median and interval, plus one remark for the rest (an estimated source, an
    unusual n, a note)."""
    if summary.ci95_low is not None and summary.ci95_high is not None:
        # Three digits are plenty for the bounds of an interval, and keep big pages small.
        low = svg.format_number(summary.ci95_low, digits=3)
        high = svg.format_number(summary.ci95_high, digits=3)
        interval = f"{low}\u2013{high}"
    else:
        interval = "\u2014"
    remarks = [] if summary.source in ("measured", "computed") else [summary.source[:3] + "."]
    if summary.n != usual:
        remarks.append(f"n={summary.n}")
    if summary.note:
        remarks.append(summary.note)
    return {
        "median": svg.format_number(summary.median),
        "interval": interval,
        "unit": summary.unit,
        "remark": "; ".join(remarks),
    }


def _metric_tables(case: CaseRecord) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """Every metric of a case: scalars as rows, and latency-like families (``ttft_ms.p50``,
    ``ttft_ms.p99``, ...) as one matrix whose rows are the families and columns the
    statistics, which says the same in less room."""
    usual = _usual_n(case)
    families: dict[str, dict[str, MetricSummary]] = {}
    for name, summary in case.metrics.items():
        base, _, stat = name.rpartition(".")
        if base and stat in _FAMILY_STATS:
            families.setdefault(base, {})[stat] = summary
    families = {base: stats for base, stats in families.items() if len(stats) > 1}
    in_family = {f"{base}.{stat}" for base, stats in families.items() for stat in stats}
    scalars = [
        {"name": name, **_metric_cell(summary, usual)}
        for name, summary in case.metrics.items()
        if name not in in_family
    ]
    columns = [s for s in _FAMILY_STATS if any(s in stats for stats in families.values())]
    rows = [
        {
            "name": base,
            "unit": next(iter(stats.values())).unit,
            "cells": [_metric_cell(stats[c], usual) if c in stats else None for c in columns],
        }
        for base, stats in families.items()
    ]
    units = {row["unit"] for row in rows}
    unit = units.pop() if len(units) == 1 else ""
    return scalars, {"columns": columns, "rows": rows, "unit": unit}


def _settings(case: CaseRecord) -> dict[str, str]:
    """A case's resolved parameters and engine facts as flat ``path -> text``."""
    flat = {key: value for key, value in kv(case.params)}
    flat.update({f"engine.{key}": value for key, value in kv(case.backend_info)})
    return flat


def _common_settings(record: RunRecord) -> dict[str, str]:
    """The parameters and engine facts every case shares (shown once, in the run section)."""
    settings = [_settings(case) for case in record.cases]
    if not settings:
        return {}
    return {
        key: value
        for key, value in settings[0].items()
        if all(other.get(key) == value for other in settings[1:])
    }


def _power_series(case: CaseRecord) -> list[list[tuple[float, float]]] | None:
    """Power samples per window, ``(seconds into the window, W)``, summed over the domains a
    window has a timeline for (one line per window)."""
    series = []
    for repetition in case.repetitions:
        if not repetition.power_timeline:
            continue
        totals: dict[float, float] = {}
        for timeline in repetition.power_timeline:
            for t, w in zip(timeline.times_s, timeline.watts, strict=True):
                totals[t] = totals.get(t, 0.0) + w
        series.append(sorted(totals.items()))
    return series or None


def _thermal_rows(case: CaseRecord) -> list[dict[str, str]]:
    """Per window: device state at start and end, and the counter-vs-power cross-check."""
    rows = []
    for repetition in case.repetitions:
        start = repetition.device_states.get("start", {})
        end = repetition.device_states.get("end", {})
        for label in sorted({*start, *end}):
            first, last = start.get(label), end.get(label)
            reasons = sorted(
                {
                    *(first.throttle_reasons if first else []),
                    *(last.throttle_reasons if last else []),
                }
            )
            rows.append(
                {
                    "window": str(repetition.index),
                    "device": label,
                    "temperature": f"{_num(first.temperature_c if first else None)} → "
                    f"{_num(last.temperature_c if last else None)}",
                    "sm_clock": f"{_num(first.sm_clock_mhz if first else None)} → "
                    f"{_num(last.sm_clock_mhz if last else None)}",
                    "power_limit": _num(last.power_limit_w if last else None),
                    "throttle": ", ".join(reasons) or "none",
                    "cross_check": ", ".join(
                        f"{domain} {diff:+.2%}"
                        for domain, diff in repetition.counter_vs_power_diff.items()
                    )
                    or "n/a",
                }
            )
    return rows


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:g}"


def _power_chart(case: CaseRecord) -> Markup | None:
    series = _power_series(case)
    return _chart(svg.power_timeline(series)) if series else None


def _case_notes(case: CaseRecord) -> list[str]:
    return [*case.notes, *(case.prompts.notes if case.prompts else [])]


def _common_notes(record: RunRecord) -> list[str]:
    """Notes every case carries (shown once, in the run section), when there are two cases or
    more."""
    if len(record.cases) < 2:
        return []
    first, *others = (_case_notes(case) for case in record.cases)
    return [note for note in dict.fromkeys(first) if all(note in other for other in others)]


def _case_views(
    record: RunRecord, common: Mapping[str, str], common_notes: Sequence[str]
) -> list[_CaseView]:
    views = []
    for i, case in enumerate(record.cases):
        usual = _usual_n(case)
        scalars, families = _metric_tables(case)
        views.append(
            _CaseView(
                index=i,
                anchor=f"case-{i}",
                case=case,
                machine=case_machine(record, case).hostname,
                sweep=_sweep_text(case),
                cells=[_headline_cell(case.metrics.get(name)) for name, _, _ in HEADLINE_METRICS],
                settings=[
                    (key, value)
                    for key, value in _settings(case).items()
                    if (key not in common or common[key] != value) and key not in case.sweep
                ],
                metrics=scalars,
                families=families,
                notes=[note for note in _case_notes(case) if note not in common_notes],
                n="" if usual is None else str(usual),
                latency_chart=_chart(svg.latency_distribution(case.latency)),
                power_chart=_power_chart(case),
                thermal=_thermal_rows(case),
                attribution=_attribution(case),
            )
        )
    return views


def _attribution(case: CaseRecord) -> dict[str, Any] | None:
    view = attribution_view(case)
    if view is None:
        return None
    return {"scatter": _chart(view.scatter), "split": _chart(view.split), "rows": view.rows}


def _sweep_value(value: Any) -> float | int | str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int | float | str):
        return value
    return json_text(value)


def _series_name(case: CaseRecord, axis: str, machine: str | None) -> str:
    others = [f"{k}={json_text(v)}" for k, v in case.sweep.items() if k != axis]
    if machine is not None:
        others.append(f"@{machine}")
    return ", ".join(others) or "cases"


def _sweep_charts(
    record: RunRecord, function: str, cases: Sequence[CaseRecord]
) -> list[dict[str, Any]]:
    """For one swept test: per swept parameter, energy per token and throughput against it."""
    machines = {case_machine(record, c).hostname for c in cases}
    axes: dict[str, None] = {}
    for case in cases:
        axes.update(dict.fromkeys(case.sweep))
    charts = []
    short = function.rsplit("::", 1)[-1]
    for axis in axes:
        on_axis = [c for c in cases if axis in c.sweep]
        if len({_sweep_value(c.sweep[axis]) for c in on_axis}) < 2:
            continue
        drawings = []
        for metric, label in ((_ENERGY, "energy per output token"), (_THROUGHPUT, "throughput")):
            unit = _unit(record, metric, "")
            series: dict[str, list[tuple[float | int | str, float | None]]] = {}
            for case in on_axis:
                machine = case_machine(record, case).hostname if len(machines) > 1 else None
                name = _series_name(case, axis, machine)
                series.setdefault(name, []).append(
                    (_sweep_value(case.sweep[axis]), _median(case, metric))
                )
            drawings.append(
                _chart(
                    svg.line_chart(
                        [svg.Series(name, points) for name, points in series.items()],
                        title=f"{short}: {label} vs {axis}",
                        x_label=axis,
                        y_label=f"{label}, median ({unit})",
                    )
                )
            )
        charts.append({"function": function, "axis": axis, "charts": drawings})
    return charts


def _sweeps(record: RunRecord) -> list[dict[str, Any]]:
    groups: dict[str, list[CaseRecord]] = {}
    for case in record.cases:
        if case.sweep:
            groups.setdefault(_test_function(case), []).append(case)
    charts = []
    for function, cases in groups.items():
        charts += _sweep_charts(record, function, cases)
    return charts


def _pareto(record: RunRecord) -> list[Markup]:
    energy_unit = _unit(record, _ENERGY, "J/token")
    charts = []
    for latency in _PARETO_LATENCIES:
        points = []
        for i, case in enumerate(record.cases):
            x, y = _median(case, latency), _median(case, _ENERGY)
            if x is not None and y is not None:
                points.append(svg.ScatterPoint(case.name, x, y, href=f"#case-{i}"))
        charts.append(
            _chart(
                svg.pareto_scatter(
                    points,
                    title=f"Energy per output token vs {latency}",
                    x_label=f"{latency}, median ({_unit(record, latency, 'ms')})",
                    y_label=f"energy per output token ({energy_unit})",
                )
            )
        )
    return charts


def _comparison(comparison: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if comparison is None:
        return None
    rows = []
    for row in comparison.get("rows", []):
        verdict = str(row.get("verdict", ""))
        rows.append(
            {
                "case": str(row.get("case", row.get("case_id", ""))),
                "metric": str(row.get("metric", "")),
                "unit": str(row.get("unit") or ""),
                "baseline": svg.format_number(row.get("baseline")),
                "current": svg.format_number(row.get("current")),
                "ratio": svg.format_number(row.get("ratio")),
                "interval": (
                    f"{svg.format_number(row.get('low'))} \u2013 "
                    f"{svg.format_number(row.get('high'))}"
                ),
                "verdict": f"{verdict} (disturbed)" if row.get("disturbed") else verdict,
                "verdict_class": verdict if verdict in _VERDICTS else "other",
            }
        )
    info = kv({key: value for key, value in comparison.items() if key != "rows"})
    counts = Counter(row["verdict"] for row in rows)
    return {"rows": rows, "info": info, "counts": sorted(counts.items())}


def _headers(record: RunRecord) -> list[dict[str, str]]:
    return [
        {"name": name, "label": label, "unit": _unit(record, name, unit)}
        for name, label, unit in HEADLINE_METRICS
    ]


def _context(record: RunRecord, comparison: Mapping[str, Any] | None) -> dict[str, Any]:
    env = _environment()
    script = env.get_template("report.js").render()
    style = env.get_template("report.css").render()
    common = _common_settings(record)
    common_notes = _common_notes(record)
    views = _case_views(record, common, common_notes)
    sweeps = _sweeps(record)
    pareto = _pareto(record)
    searches = [
        {**section, "charts": [_chart(c) for c in section["charts"]]}
        for section in search_sections(record)
    ]
    power_charts = sum(v.power_chart is not None for v in views)
    # Without a power timeline in any case, one note for the record instead of one per case.
    no_power = None if power_charts else _chart(svg.power_timeline(None))
    chart_count = (
        len(views)
        + power_charts
        + (no_power is not None)
        + len(pareto)
        + sum(len(s["charts"]) for s in sweeps)
        + sum(len(s["charts"]) for s in searches)
    )
    return {
        "record": record,
        **run_section(record),
        "scorecard": scorecard_section(record),
        "common": list(common.items()),
        "common_notes": common_notes,
        "outcomes": sorted(Counter(c.outcome for c in record.cases).items()),
        "headers": _headers(record),
        "cases": views,
        "sweeps": sweeps,
        "pareto": pareto,
        "searches": searches,
        "comparison": _comparison(comparison if comparison is not None else record.comparison),
        "chart_count": chart_count,
        "no_power": no_power,
        "csp": (
            "default-src 'none'; img-src data:; base-uri 'none'; form-action 'none'; "
            f"style-src {_csp_hash(style)}; script-src {_csp_hash(script)}"
        ),
    }


def render_html(record: RunRecord, *, comparison: Mapping[str, Any] | None = None) -> str:
    """Render the report page from a run record.

    Args:
        record: The run record (as read from disk; nothing else is consulted).
        comparison: A comparison with a baseline run, shown as deltas with their verdicts:
            ``{"rows": [{"case", "metric", "baseline", "current", "ratio", "low", "high",
            "verdict"}, ...]}`` (``unit`` optional); its other keys (the baseline, a
            threshold) are shown above the rows. None takes the record's own
            ``comparison``; the section is left out when neither has one.

    Returns:
        The whole page, self-contained.
    """
    return _environment().get_template("report.html.j2").render(_context(record, comparison))


def write_html(
    record: RunRecord, path: Path, *, comparison: Mapping[str, Any] | None = None
) -> Path:
    """Render the report and write it atomically.

    Args:
        record: The run record.
        path: The page's path (``<report-dir>/llem-report.html``); folders are created.
        comparison: As for :func:`render_html`.

    Returns:
        ``path``.
    """
    atomic_write_text(Path(path), render_html(record, comparison=comparison))
    return Path(path)

"""The HTML report's searches section: for each case that ran ``llem.capacity``, its capacity
curves (good fraction and energy per good request against the arrival rate); for each that ran
``llem.search``, the objective against the frontier's other metric over the feasible points
evaluated, the frontier and the chosen point marked. Built from the record alone."""

from __future__ import annotations

from typing import Any

from pytest_llem.report import svg
from pytest_llem.report.search_lines import capacity_line, search_line
from pytest_llem.results.catalogue import unit_of
from pytest_llem.results.models import RunRecord
from pytest_llem.results.search import CapacityRecord, SearchRecord

__all__ = ["search_sections"]


def _capacity_charts(capacity: CapacityRecord) -> list[svg.Svg]:
    points = sorted(capacity.tried, key=lambda p: p.rate_rps)
    target = capacity.target_good_fraction
    fraction = svg.line_chart(
        [
            svg.Series("good fraction", [(p.rate_rps, p.good_fraction) for p in points]),
            svg.Series(f"target {target:g}", [(p.rate_rps, target) for p in points]),
        ],
        title="Good fraction against arrival rate",
        x_label="target arrival rate (requests/s)",
        y_label="requests meeting the SLO (fraction)",
        x_axis="linear",
    )
    energy = svg.line_chart(
        [
            svg.Series(
                "energy per good request",
                [(p.rate_rps, p.energy_per_good_request_j) for p in points],
            )
        ],
        title="Energy per good request against arrival rate",
        x_label="target arrival rate (requests/s)",
        y_label="energy per good request (J/request)",
        x_axis="linear",
    )
    return [fraction, energy]


def _label(params: dict[str, Any]) -> str:
    return ",".join(f"{path}={value}" for path, value in params.items())


def _search_chart(search: SearchRecord) -> svg.Svg:
    other = search.frontier_metric or ""
    chosen = search.best.params if search.best is not None else None
    on_front = {_label(p.params) for p in search.frontier}
    points = []
    for point in search.evaluated:
        x = point.values.get(other)
        if not point.feasible or point.objective is None or x is None:
            continue
        label = _label(point.params)
        if point.params == chosen:
            label = f"chosen: {label}"
        elif label in on_front:
            label = f"frontier: {label}"
        points.append(svg.ScatterPoint(label, x, point.objective))
    title = f"{search.objective} against {other} (feasible points evaluated)"
    axis_x = f"{other}, median ({unit_of(other)})"
    axis_y = f"{search.objective}, median ({unit_of(search.objective)})"
    if search.direction == "minimize":
        drawing = svg.pareto_scatter(points, title=title, x_label=axis_x, y_label=axis_y)
    else:  # the scatter's front assumes lower is better on both axes: draw the points only
        series = [svg.Series(p.label, [(p.x, p.y)]) for p in points]
        drawing = svg.line_chart(
            series, title=title, x_label=axis_x, y_label=axis_y, x_axis="linear"
        )
    return drawing


def search_sections(record: RunRecord) -> list[dict[str, Any]]:
    """Per case with a capacity or search section: its name, its answer line and charts (the
    page inserts them through its one markup gate)."""
    sections = []
    for case in record.cases:
        if case.capacity is not None:
            sections.append(
                {
                    "name": case.name,
                    "line": capacity_line(case.name, case.capacity),
                    "charts": _capacity_charts(case.capacity),
                }
            )
        if case.search is not None:
            sections.append(
                {
                    "name": case.name,
                    "line": search_line(case.name, case.search),
                    "charts": [_search_chart(case.search)],
                }
            )
    return sections

"""The answers of ``llem.capacity`` and ``llem.search`` in the terminal: one line per case
that ran one, built from the record's ``capacity`` and ``search`` sections alone."""

from __future__ import annotations

from pytest_llem.results.catalogue import unit_of
from pytest_llem.results.models import CaseRecord, RunRecord
from pytest_llem.results.search import CapacityRecord, SearchRecord

__all__ = ["capacity_line", "search_line", "search_lines"]


def _bounds(bounds: dict[str, float], unit: str = "") -> str:
    return ", ".join(f"{name}<={limit:g}{unit}" for name, limit in bounds.items())


def capacity_line(name: str, capacity: CapacityRecord) -> str:
    """``capacity NAME: RATE requests/s (...)`` or why there is no rate."""
    slo = _bounds(capacity.slo, " ms")
    target = f"{capacity.target_good_fraction:.0%}"
    tried = f"{len(capacity.tried)} rates tried"
    if capacity.rate_rps is None:
        return (
            f"capacity {name}: none: {slo} not met by {target} of requests even at "
            f"{min(p.rate_rps for p in capacity.tried):.3g} requests/s ({tried})"
        )
    good = capacity.good_fraction or 0.0
    low, high = capacity.bracket
    where = (
        f"bracket {low:.3g}-{high:.3g}"
        if low is not None and high is not None
        else "still met at the highest rate tried"
    )
    point = next((p for p in capacity.tried if p.rate_rps == capacity.rate_rps), None)
    energy = point.energy_per_good_request_j if point is not None else None
    joules = f", {energy:.3g} J/good request" if energy is not None else ""
    return (
        f"capacity {name}: {capacity.rate_rps:.3g} requests/s ({good:.0%} of requests within "
        f"{slo}, target {target}{joules}; {tried}, {where}, stopped: {capacity.stop_reason})"
    )


def search_line(name: str, search: SearchRecord) -> str:
    """``search NAME: best PARAMS: OBJECTIVE VALUE UNIT (...)`` or why there is no best."""
    full = sum(1 for point in search.evaluated if not point.screening)
    short = len(search.evaluated) - full
    counted = f"{full} of {search.grid_size} points evaluated"
    if short:
        counted += f" (and {short} on short windows to rank them)"
    if search.best is None:
        broke = next((p for p in search.evaluated if p.broke), None)
        example = f"; e.g. {_params(broke.params)} broke {broke.broke[0]}" if broke else ""
        return f"search {name}: no feasible point ({counted}{example})"
    best = search.best
    unit = unit_of(search.objective)
    value = f"{best.objective:.4g} {unit}".rstrip() if best.objective is not None else "n/a"
    held = ", ".join(
        f"{metric} {got:.4g}" for metric, got in best.values.items() if got is not None
    )
    within = f" with {held} ({_bounds(search.subject_to)})" if held else ""
    noise = f"; within noise: {'; '.join(best.uncertain)}" if best.uncertain else ""
    return (
        f"search {name}: best {_params(best.params)}: {search.objective} {value}{within}; "
        f"{counted}{noise}"
    )


def _params(params: dict[str, object]) -> str:
    return ",".join(f"{path}={value}" for path, value in params.items())


def search_lines(record: RunRecord) -> list[str]:
    """One line per case that ran a capacity search or a configuration search."""
    lines = []
    for case in record.cases:
        lines.extend(_case_lines(case))
    return lines


def _case_lines(case: CaseRecord) -> list[str]:
    lines = []
    if case.capacity is not None:
        lines.append(capacity_line(case.name, case.capacity))
    if case.search is not None:
        lines.append(search_line(case.name, case.search))
    return lines

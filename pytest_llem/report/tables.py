"""The run record as a flat table: one row per case, metrics spread into columns.

This is the table behind ``llem export --csv``, ``--llem-csv`` and ``Run.to_dataframe()``. It
reads only the run record. Columns: the case's identity (``id``, ``name``, ``outcome``,
``error``, ``backend``, ``model``, ``machine``, ``swept``), every resolved parameter as
``param.<path>``, then for every metric ``<name>.median``, ``.mean``, ``.stdev``, ``.min``,
``.max``, ``.ci95_low``, ``.ci95_high``, ``.n``, ``.unit`` (the catalogue's where the summary
has none) and ``.source``. In the CSV text, a
text cell that a spreadsheet would run as a formula is neutralised (see :func:`csv_text`).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pytest_llem.results.catalogue import unit_of
from pytest_llem.results.models import CaseRecord, MachineInfo, RunRecord
from pytest_llem.results.store import atomic_write_text

__all__ = [
    "CASE_COLUMNS",
    "CSV_FILENAME",
    "METRIC_FIELDS",
    "case_machine",
    "case_rows",
    "csv_text",
    "flatten_params",
    "table_columns",
    "write_csv",
]

CSV_FILENAME = "llem-report.csv"

CASE_COLUMNS = ("id", "name", "outcome", "error", "backend", "model", "machine", "swept")

METRIC_FIELDS = (
    "median",
    "mean",
    "stdev",
    "min",
    "max",
    "ci95_low",
    "ci95_high",
    "n",
    "unit",
    "source",
)


def case_machine(record: RunRecord, case: CaseRecord) -> MachineInfo:
    """The machine a case ran on: its own in a merged record, else the run's."""
    return case.machine if case.machine is not None else record.machine


def _cell(value: Any) -> Any:
    """A parameter value as one table cell: scalars as they are, lists as JSON text."""
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return json.dumps(value, sort_keys=True, default=str)


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested parameters as ``{"sampling.temperature": 1.0, ...}``, in their own order.

    Args:
        params: The resolved parameters (nested mappings for sections).
        prefix: Prepended to every path, with a dot.

    Returns:
        Paths to cell values; lists and other non-scalars become JSON text.
    """
    flat: dict[str, Any] = {}
    for key, value in params.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, path))
        else:
            flat[path] = _cell(value)
    return flat


def _metric_cells(case: CaseRecord) -> dict[str, Any]:
    cells: dict[str, Any] = {}
    for name, summary in case.metrics.items():
        for stat in METRIC_FIELDS:
            value = getattr(summary, stat)
            if stat == "unit" and not value:
                value = unit_of(name)
            if isinstance(value, float) and not math.isfinite(value):
                value = None
            cells[f"{name}.{stat}"] = value
    return cells


def _identity(record: RunRecord, case: CaseRecord) -> dict[str, Any]:
    error = f"{case.error.type}: {case.error.message}" if case.error is not None else None
    return {
        "id": case.id,
        "name": case.name,
        "outcome": case.outcome,
        "error": error,
        "backend": case.backend,
        "model": case.model,
        "machine": case_machine(record, case).hostname,
        "swept": ",".join(case.sweep) or None,
    }


def table_columns(record: RunRecord) -> list[str]:
    """Every column of the table: identity, then parameters and metrics in first-seen order."""
    params: dict[str, None] = {}
    metrics: dict[str, None] = {}
    for case in record.cases:
        params.update(dict.fromkeys(f"param.{p}" for p in flatten_params(case.params)))
        metrics.update(dict.fromkeys(case.metrics))
    metric_columns = [f"{name}.{stat}" for name in metrics for stat in METRIC_FIELDS]
    return [*CASE_COLUMNS, *params, *metric_columns]


def case_rows(record: RunRecord) -> list[dict[str, Any]]:
    """One row per case, every row with every column of :func:`table_columns`.

    A value the case does not have (a metric another case has, an unmeasured figure) is None.

    Args:
        record: The run record.

    Returns:
        The rows, in the record's case order.
    """
    columns = table_columns(record)
    rows = []
    for case in record.cases:
        cells = _identity(record, case)
        cells.update({f"param.{p}": v for p, v in flatten_params(case.params).items()})
        cells.update(_metric_cells(case))
        rows.append({column: cells.get(column) for column in columns})
    return rows


#: First characters that make a spreadsheet read a cell as a formula (OWASP, CSV injection).
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _neutralised(value: Any) -> Any:
    """A text cell that starts like a formula, prefixed with ``'`` so it stays text; numbers
    (a negative energy, say) are left as they are."""
    if isinstance(value, str) and value.startswith(_FORMULA_STARTS):
        return "'" + value
    return value


def csv_text(record: RunRecord) -> str:
    """The table as CSV text: a header line, then one line per case; None is an empty cell.

    A record can hold text from anywhere (test ids, error messages, model names), so a text cell
    starting with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return gets a leading ``'``:
    opened in a spreadsheet it shows as text instead of running as a formula.
    """
    columns = table_columns(record)
    lines = [_csv_line([_neutralised(column) for column in columns])]
    for row in case_rows(record):
        lines.append(_csv_line([_neutralised(row[column]) for column in columns]))
    return "".join(lines)


def _csv_line(cells: list[Any]) -> str:
    """One CSV line ending in ``\n``. The writer is told lines end in ``\r\n`` because it quotes
    only cells holding a character of its line terminator: a lone ``\r`` in a cell would
    otherwise split the row for every reader."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\r\n").writerow(cells)
    return buffer.getvalue()[:-2] + "\n"


def write_csv(record: RunRecord, path: Path) -> Path:
    """Write the table as CSV, atomically.

    Args:
        record: The run record.
        path: Where to write it; missing folders are created.

    Returns:
        ``path``.
    """
    atomic_write_text(Path(path), csv_text(record))
    return Path(path)

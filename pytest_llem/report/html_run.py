"""The HTML report's run-level sections, from the run record alone: the machines, engines,
meters, idle baseline and options; the reproducibility manifest; and the scorecard.

Split from :mod:`pytest_llem.report.html`, which renders the page and its per-case parts.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from pytest_llem.report.scorecard import FIGURES, build_scorecard
from pytest_llem.report.scorecard_format import figure_text, footer_lines, row_label
from pytest_llem.report.tables import flatten_params
from pytest_llem.results.models import GpuManifest, MachineInfo, RunManifest, RunRecord

__all__ = ["json_text", "kv", "manifest_view", "run_section", "scorecard_section"]


def json_text(value: Any) -> str:
    """A value as text: a string as it is, anything else as JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def kv(mapping: Mapping[str, Any]) -> list[tuple[str, str]]:
    """A mapping as rows of a key-value table (nested sections flattened, None as n/a)."""
    return [
        (key, "n/a" if value is None else json_text(value))
        for key, value in flatten_params(mapping).items()
    ]


def _machines(record: RunRecord) -> list[MachineInfo]:
    machines: list[MachineInfo] = list(record.machines) or [record.machine]
    for case in record.cases:
        if case.machine is not None and case.machine not in machines:
            machines.append(case.machine)
    return machines


def _unique(items: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    for item in items:
        if item not in seen:
            seen.append(item)
    return seen


def _engines(record: RunRecord) -> list[dict[str, Any]]:
    keys = ("name", "version", "device", "dtype", "model")
    return _unique(
        {key: json_text(case.backend_info.get(key, "n/a")) for key in keys}
        for case in record.cases
        if case.backend_info
    )


def _meters(record: RunRecord) -> list[dict[str, Any]]:
    return _unique(
        {
            "name": meter.name,
            "sources": sorted(meter.sources.items()),
            "domains": ", ".join(meter.domains) or "none",
            "update_period_s": meter.update_period_s,
            "energy_quantum_j": meter.energy_quantum_j,
            "devices": ", ".join(meter.devices),
            "selected_because": meter.selected_because or "",
            "details": sorted(meter.details.items()),
        }
        for case in record.cases
        for meter in case.meters
    )


def _baseline(record: RunRecord) -> list[tuple[str, str]]:
    """The idle baseline as label/value rows: per domain power, spread, source and meter."""
    baseline = record.baseline
    if baseline is None:
        return []
    rows = [
        (
            f"{domain} idle power",
            f"{d.idle_power_w:.4g} W ± {d.stdev_w or 0:.2g} W"
            + (f" ({d.relative_spread:.1%} spread)" if d.relative_spread is not None else "")
            + f", {d.source}, {d.meter}, {d.seconds:g} s in {d.windows} windows",
        )
        for domain, d in baseline.domains.items()
    ]
    rows.append(
        (
            "taken at",
            f"{baseline.taken_at:%Y-%m-%d %H:%M:%S} UTC"
            + (" (reused from the cache)" if baseline.cached else ""),
        )
    )
    rows.extend(
        (f"{label} idle temperature", f"{t:g} C")
        for label, t in baseline.idle_temperature_c.items()
    )
    rows.extend(("note", note) for note in baseline.notes)
    return rows


def _switch(value: bool | None) -> str:
    return "unknown" if value is None else ("on" if value else "off")


def _value(value: float | None, unit: str) -> str:
    return "unknown" if value is None else f"{value:g} {unit}"


def _gpu_row(gpu: GpuManifest) -> dict[str, str]:
    limit = _value(gpu.power_limit_w, "W")
    if gpu.default_power_limit_w is not None and gpu.default_power_limit_w != gpu.power_limit_w:
        limit += f" (default {gpu.default_power_limit_w:g} W)"
    return {
        "index": str(gpu.index),
        "name": gpu.name,
        "power_limit": limit,
        "clocks": f"{_value(gpu.application_sm_clock_mhz, 'MHz')} / "
        f"{_value(gpu.application_memory_clock_mhz, 'MHz')}",
        "ecc": _switch(gpu.ecc_enabled),
        "mig": _switch(gpu.mig_enabled),
        "persistence": _switch(gpu.persistence_mode),
        "unknown": "; ".join(f"{name}: {why}" for name, why in gpu.unknown.items()),
    }


def manifest_view(manifest: RunManifest | None) -> dict[str, Any] | None:
    """The manifest as key-value rows, a GPU table and the package list (None: no manifest)."""
    if manifest is None:
        return None
    container = manifest.container
    if container.detected:
        image = container.image or "image not named"
        digest = container.image_digest or f"no digest ({container.note or 'not given'})"
        where = f"{container.runtime or 'container'}: {image}, {digest}"
    else:
        where = "not in a container"
    git = manifest.git_commit or "n/a"
    rows = [
        ("NVIDIA driver", manifest.driver_version or "n/a"),
        ("CUDA (driver supports)", manifest.cuda_driver_version or "n/a"),
        ("CUDA (torch build)", manifest.cuda_runtime_version or "n/a"),
        ("container", where),
        ("python", f"{manifest.python.implementation} {manifest.python.version}"),
        (
            "packages",
            f"{len(manifest.python.packages)}, digest {manifest.python.packages_digest}",
        ),
        ("git", git + (" (uncommitted changes)" if manifest.git_dirty else "")),
        ("profile", manifest.profile or "n/a"),
    ]
    if manifest.gpu_note:
        rows.append(("GPUs", manifest.gpu_note))
    return {
        "rows": rows,
        "gpus": [_gpu_row(gpu) for gpu in manifest.gpus],
        "packages": sorted(manifest.python.packages.items()),
    }


def run_section(record: RunRecord) -> dict[str, Any]:
    """The template values of the run section."""
    machines = _machines(record)
    return {
        "machines": machines,
        "many_machines": len(machines) > 1,
        "engines": _engines(record),
        "meters": _meters(record),
        "baseline": _baseline(record),
        "options": kv(record.options),
        "manifest": manifest_view(record.manifest),
    }


def scorecard_section(record: RunRecord) -> dict[str, Any]:
    """The scorecard as the template's tables: headers with units, cells, footnotes."""
    card = build_scorecard(record)
    notes: dict[str, int] = {}
    tables = [
        {
            "title": table.title,
            "rows": [
                {
                    "workload": row_label(row),
                    "setting": row.setting,
                    "cells": [
                        {
                            # the cell's class marks an estimated figure "est."
                            "text": figure_text(row.figures[spec.key], notes, mark_estimated=False),
                            "estimated": row.figures[spec.key].estimated,
                        }
                        for spec in FIGURES
                    ],
                }
                for row in table.rows
            ],
        }
        for table in card.tables
    ]
    return {
        "headers": [{"label": spec.header, "unit": spec.unit} for spec in FIGURES],
        "tables": tables,
        "footer": footer_lines(card, notes),
    }

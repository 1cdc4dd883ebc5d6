"""The scorecard: one table per model, engine and hardware, one row per workload shape and
scenario, with the figures a model card or a pull request quotes, each with its interval and
source.

Built from the run record alone. Rows come from the cases' parameters: ``workload`` (the shape:
chat, summarisation, generation, fixed; a case without one is named by its test), ``scenario``
(offline per batch size, single stream, server per arrival rate). Figures:

- ``energy_per_1k_output_tokens_j``: 1000 x ``energy_per_output_token_j`` (median and interval
  scaled alike);
- ``output_tokens_per_j``: the record's own metric; for a record without it, the reciprocal of
  ``energy_per_output_token_j`` with the bounds swapped;
- ``output_tokens_per_s``, ``ttft_ms.p99`` and ``goodput_rps`` as recorded.

A figure the record lacks is missing with the reason the record gives (the summary's note, the
windows' ``missing``, the catalogue's reason, no SLO set, the case failed), never 0. The text,
Markdown and JSON renderings are in :mod:`pytest_llem.report.scorecard_format`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pytest_llem.report.tables import case_machine
from pytest_llem.results.catalogue import SLO_BOUNDS, lookup
from pytest_llem.results.models import CaseRecord, MetricSummary, RunRecord

__all__ = [
    "FIGURES",
    "WORKLOAD_ORDER",
    "Figure",
    "FigureSpec",
    "Scorecard",
    "ScorecardRow",
    "ScorecardTable",
    "build_scorecard",
]

#: Workload shapes in the order rows list them; other rows follow in the record's order.
WORKLOAD_ORDER: tuple[str, ...] = ("chat", "summarisation", "generation", "fixed")
_SCENARIO_ORDER: tuple[str, ...] = ("offline", "single_stream", "server")

Transform = Literal["same", "per_1k", "reciprocal"]


@dataclass(frozen=True)
class FigureSpec:
    """One column: its key, header, unit and the record metric it comes from."""

    key: str
    header: str
    unit: str
    metric: str
    transform: Transform = "same"
    better: str = "higher"


#: The scorecard's columns, in order.
FIGURES: tuple[FigureSpec, ...] = (
    FigureSpec(
        "energy_per_1k_output_tokens_j",
        "J/1k out tok",
        "J/1k tokens",
        "energy_per_output_token_j",
        "per_1k",
        "lower",
    ),
    FigureSpec("output_tokens_per_j", "out tok/J", "tokens/J", "output_tokens_per_j"),
    FigureSpec("output_tokens_per_s", "out tok/s", "tokens/s", "output_tokens_per_s"),
    FigureSpec("ttft_ms.p99", "TTFT p99 ms", "ms", "ttft_ms.p99", better="lower"),
    FigureSpec("goodput_rps", "goodput req/s", "requests/s", "goodput_rps"),
)


@dataclass(frozen=True)
class Figure:
    """A figure of a row: the median over the measured windows and the 95% bootstrap interval
    of the median (None with fewer than 3 windows), or why it is missing."""

    value: float | None
    low: float | None
    high: float | None
    unit: str
    source: str | None
    derived_from: str
    missing: str | None = None
    n: int = 0

    @property
    def estimated(self) -> bool:
        """Whether the figure rests on an estimate rather than a measurement."""
        return self.source == "estimated"


@dataclass(frozen=True)
class ScorecardRow:
    """One case as a row: its workload shape, scenario and figures."""

    workload: str
    shape: str | None
    scenario: str
    batch_size: int | None
    rate_rps: float | None
    case_id: str
    outcome: str
    figures: dict[str, Figure]

    @property
    def setting(self) -> str:
        """The scenario in words: ``offline bs 8``, ``single stream``, ``server 4 req/s``."""
        if self.scenario == "offline" and self.batch_size is not None:
            return f"offline bs {self.batch_size}"
        if self.scenario == "server" and self.rate_rps is not None:
            return f"server {self.rate_rps:g} req/s"
        return self.scenario.replace("_", " ")


@dataclass(frozen=True)
class ScorecardTable:
    """The rows of one model on one engine and one kind of hardware."""

    model: str
    backend: str
    engine_version: str | None
    hardware: str
    rows: list[ScorecardRow] = field(default_factory=list)

    @property
    def title(self) -> str:
        """``llem-tiny on transformers 5.0 (CPU: AMD EPYC)``."""
        engine = f"{self.backend} {self.engine_version}" if self.engine_version else self.backend
        return f"{self.model or 'unknown model'} on {engine or 'unknown engine'} ({self.hardware})"


@dataclass(frozen=True)
class Scorecard:
    """Every table of a run, the profile it ran under and the cases left out (skipped)."""

    run_id: str
    profile: str | None
    tables: list[ScorecardTable]
    skipped: list[str] = field(default_factory=list)


def _transformed(summary: MetricSummary, transform: Transform) -> tuple[float | None, ...]:
    """The median and interval bounds of ``summary`` under ``transform``: scaling keeps the
    order of the bounds, the reciprocal swaps them."""
    median, low, high = summary.median, summary.ci95_low, summary.ci95_high
    if transform == "per_1k":
        return tuple(None if v is None else 1000.0 * v for v in (median, low, high))
    if transform == "reciprocal":
        if median is None or median <= 0:
            return None, None, None
        if low is None or high is None or low <= 0:
            return 1.0 / median, None, None
        return 1.0 / median, 1.0 / high, 1.0 / low
    return median, low, high


def _case_failure(case: CaseRecord) -> str:
    if case.error is not None:
        return f"case {case.outcome}: {case.error.type}: {case.error.message}"
    return f"case {case.outcome}" + (f": {case.notes[0]}" if case.notes else "")


def _no_slo(case: CaseRecord) -> bool:
    slo = case.params.get("slo")
    return not isinstance(slo, Mapping) or all(slo.get(bound) is None for bound in SLO_BOUNDS)


def _why_missing(case: CaseRecord, metric: str) -> str:
    """Why a case has no value of ``metric``: what the record says, most specific first."""
    summary = case.metrics.get(metric)
    if summary is not None and summary.note:
        return summary.note
    if not case.metrics and case.outcome != "passed":
        return _case_failure(case)
    if metric == "goodput_rps" and _no_slo(case):
        return "no SLO set (slo.ttft_ms, slo.tpot_ms or slo.e2e_ms)"
    reasons = list(
        dict.fromkeys(r.missing[metric] for r in case.repetitions if metric in r.missing)
    )
    if reasons:
        return "; ".join(reasons)
    known = lookup(metric)
    if known is not None and known.missing:
        return known.missing
    return f"{metric} is not in the record"


def _figure(case: CaseRecord, spec: FigureSpec) -> Figure:
    metric, transform = spec.metric, spec.transform
    if spec.key == "output_tokens_per_j" and metric not in case.metrics:
        # A record without the metric of its own: the reciprocal of energy per token.
        metric, transform = "energy_per_output_token_j", "reciprocal"
    summary = case.metrics.get(metric)
    if summary is None or summary.median is None:
        return Figure(None, None, None, spec.unit, None, metric, _why_missing(case, metric))
    value, low, high = _transformed(summary, transform)
    if value is None:
        why = f"{metric} is not positive: no reciprocal"
        return Figure(None, None, None, spec.unit, summary.source, metric, why, summary.n)
    return Figure(value, low, high, spec.unit, summary.source, metric, None, summary.n)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _test_name(case: CaseRecord) -> str:
    return case.name.split("[", 1)[0] or "custom"


def _row(case: CaseRecord, workload: str) -> ScorecardRow:
    params = case.params
    scenario = str(params.get("scenario") or "offline")
    traffic = params.get("traffic")
    rate = _number(traffic.get("rate")) if isinstance(traffic, Mapping) else None
    batch = params.get("batch_size")
    shape = params.get("workload")
    return ScorecardRow(
        workload=workload,
        shape=shape if isinstance(shape, str) else None,
        scenario=scenario,
        batch_size=batch if isinstance(batch, int) and scenario == "offline" else None,
        rate_rps=rate if scenario == "server" else None,
        case_id=case.id,
        outcome=case.outcome,
        figures={spec.key: _figure(case, spec) for spec in FIGURES},
    )


def _hardware(record: RunRecord, case: CaseRecord) -> str:
    """The GPU model(s) a case ran on, or its CPU; an endpoint's server is not this machine."""
    device = str(case.backend_info.get("device") or case.params.get("device") or "")
    machine = case_machine(record, case)
    if case.backend == "endpoint":
        return "remote endpoint"
    if device.startswith("cuda") or (device not in ("cpu", "") and machine.gpus):
        names = sorted({gpu.name for gpu in machine.gpus})
        return ", ".join(names) if names else "GPU (model unknown)"
    return f"CPU: {machine.cpu_model}" if machine.cpu_model else "CPU"


def _workload_rows(cases: Sequence[CaseRecord]) -> list[ScorecardRow]:
    """Rows of one table, ordered by shape, scenario, batch size and rate; two cases that
    would share a row's name are named by their full test names instead."""
    rows = []
    for case in cases:
        shape = case.params.get("workload")
        rows.append(_row(case, shape if isinstance(shape, str) and shape else _test_name(case)))
    keys = [(row.workload, row.setting) for row in rows]
    rows = [
        row if keys.count((row.workload, row.setting)) == 1 else _renamed(row, case)
        for row, case in zip(rows, cases, strict=True)
    ]
    first_seen = {row.workload: i for i, row in reversed(list(enumerate(rows)))}

    def order(row: ScorecardRow) -> tuple[Any, ...]:
        shape = WORKLOAD_ORDER.index(row.shape) if row.shape in WORKLOAD_ORDER else None
        scenario = _SCENARIO_ORDER.index(row.scenario) if row.scenario in _SCENARIO_ORDER else 99
        return (
            (0, shape) if shape is not None else (1, first_seen[row.workload]),
            scenario,
            row.batch_size or 0,
            row.rate_rps or 0.0,
        )

    return sorted(rows, key=order)


def _renamed(row: ScorecardRow, case: CaseRecord) -> ScorecardRow:
    label = f"{row.shape} ({case.name})" if row.shape else case.name
    return ScorecardRow(
        label,
        row.shape,
        row.scenario,
        row.batch_size,
        row.rate_rps,
        row.case_id,
        row.outcome,
        row.figures,
    )


def _profile(record: RunRecord) -> str | None:
    """The profile's name: the record's ``profile`` where it has one, else the manifest's."""
    if record.profile is not None:
        return record.profile.name
    return record.manifest.profile if record.manifest is not None else None


def build_scorecard(record: RunRecord) -> Scorecard:
    """The scorecard of a run record.

    Cases are grouped by model, engine and hardware (one table each, in first-seen order);
    skipped cases, which measured nothing on purpose, are left out and listed.

    Args:
        record: The run record (nothing else is read).
    """
    groups: dict[tuple[str, str, str], list[CaseRecord]] = {}
    versions: dict[tuple[str, str, str], str | None] = {}
    skipped = []
    for case in record.cases:
        if case.outcome == "skipped":
            skipped.append(case.name)
            continue
        key = (case.model, case.backend, _hardware(record, case))
        groups.setdefault(key, []).append(case)
        version = case.backend_info.get("version")
        versions.setdefault(key, version if isinstance(version, str) else None)
    tables = [
        ScorecardTable(key[0], key[1], versions[key], key[2], _workload_rows(cases))
        for key, cases in groups.items()
    ]
    return Scorecard(record.run_id, _profile(record), tables, skipped)

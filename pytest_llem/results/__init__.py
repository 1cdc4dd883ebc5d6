"""Results: the models of metrics, cases and runs, and the run store on disk."""

from __future__ import annotations

from pytest_llem.results.models import (
    SCHEMA_VERSION,
    CaseRecord,
    CaseResult,
    MachineInfo,
    MetricSummary,
    RunRecord,
)
from pytest_llem.results.store import read_run_record, run_record_schema, write_run_record

__all__ = [
    "SCHEMA_VERSION",
    "CaseRecord",
    "CaseResult",
    "MachineInfo",
    "MetricSummary",
    "RunRecord",
    "read_run_record",
    "run_record_schema",
    "write_run_record",
]

"""The terminal summary: what it says about each case, from the run record alone."""

from __future__ import annotations

from datetime import datetime, timezone

from pytest_llem.report.terminal import summary_lines
from pytest_llem.results.models import (
    CaseRecord,
    MachineInfo,
    MetricSummary,
    RepetitionRecord,
    RunRecord,
    ServerLoadRecord,
)

EPT = "energy_per_output_token_j"


def _repetition(index: int, *, saturated: bool = False, negative: bool = False) -> RepetitionRecord:
    server = ServerLoadRecord(
        target_rate_rps=8.0,
        achieved_rate_rps=5.0 if saturated else 8.0,
        peak_concurrency=4,
        concurrency_bound_share=0.0,
        saturated=saturated,
        saturation_reason="the queueing delay kept growing" if saturated else None,
    )
    return RepetitionRecord(
        index=index,
        duration_s=1.0,
        requests=8,
        input_tokens=80,
        output_tokens=64,
        server=server,
        dynamic_energy_negative=negative,
    )


def _case(name: str, **fields: object) -> CaseRecord:
    return CaseRecord.model_validate(
        {
            "id": f"t.py::{name}",
            "name": name,
            "backend": "transformers",
            "metrics": {EPT: MetricSummary(n=3, median=0.5, unit="J/token")},
            **fields,
        }
    )


def _record(*cases: CaseRecord) -> RunRecord:
    return RunRecord(
        run_id="0123456789abcdef",
        created_at=datetime(2026, 11, 26, 10, 0, 0, tzinfo=timezone.utc),
        machine=MachineInfo(hostname="h", platform="p", python="3.11"),
        cases=list(cases),
    )


def _row(lines: list[str], name: str) -> str:
    (row,) = [line for line in lines[2:] if line.startswith(name + " ")]
    return row


def test_saturation_hot_and_negative_dynamic_energy_are_flagged_per_case() -> None:
    lines = summary_lines(
        _record(
            _case("test_plain", repetitions=[_repetition(0)]),
            _case(
                "test_server",
                repetitions=[_repetition(0, saturated=True), _repetition(1)],
            ),
            _case("test_warm", measured_hot=True),
            _case(
                "test_below_idle",
                repetitions=[_repetition(0, negative=True), _repetition(1, negative=True)],
            ),
        )
    )
    assert "(" not in _row(lines, "test_plain")
    assert _row(lines, "test_server").startswith("test_server (saturated)")
    assert _row(lines, "test_warm").startswith("test_warm (hot)")
    assert _row(lines, "test_below_idle").startswith("test_below_idle (dynamic<0)")
    after = lines[2 + 4 :]
    assert any(
        line.startswith("saturated")
        and "test_server (1 of 2 windows, first 5 of 8 requests/s)" in line
        for line in after
    )
    assert any(line.startswith("measured hot") and "test_warm" in line for line in after)
    assert any(
        line.startswith("negative dynamic energy") and "test_below_idle (2 of 2 windows)" in line
        for line in after
    )


def test_several_flags_share_one_mark() -> None:
    case = _case(
        "test_all",
        measured_hot=True,
        repetitions=[_repetition(0, saturated=True, negative=True)],
    )
    assert _row(summary_lines(_record(case)), "test_all").startswith(
        "test_all (hot, saturated, dynamic<0)"
    )


def test_a_skipped_case_shows_its_reason_shortened() -> None:
    reason = "invalid combination: min_new_tokens must not exceed max_new_tokens " + "x" * 200
    case = CaseRecord(
        id="t.py::test_lengths[out4-min8]",
        name="test_lengths[out4-min8]",
        backend="transformers",
        outcome="skipped",
        notes=[reason],
    )
    lines = summary_lines(_record(case))
    assert _row(lines, "test_lengths[out4-min8]").split()[-1] == "skipped"
    (line,) = [line for line in lines if line.startswith("skipped ")]
    assert line.startswith("skipped test_lengths[out4-min8]: invalid combination: min_new_tokens")
    assert line.endswith("...")
    assert len(line) <= 120

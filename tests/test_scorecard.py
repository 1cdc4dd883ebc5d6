"""The scorecard, on hand-built run records: grouping into tables and rows, the derived figures
and their intervals, missing figures with the record's reasons, each format, the terminal
summary, the HTML section and ``llem scorecard``'s exit codes."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from pytest_llem.cli import main
from pytest_llem.report.html import render_html
from pytest_llem.report.scorecard import FIGURES, build_scorecard
from pytest_llem.report.scorecard_format import (
    figure_text,
    render_scorecard,
    scorecard_json,
    scorecard_lines,
    scorecard_markdown,
)
from pytest_llem.results.models import (
    CaseError,
    CaseRecord,
    GpuInfo,
    MachineInfo,
    MetricSummary,
    RepetitionRecord,
    RunRecord,
)

UNITS = {
    "energy_per_output_token_j": "J/token",
    "output_tokens_per_j": "tokens/J",
    "output_tokens_per_s": "tokens/s",
    "ttft_ms.p99": "ms",
    "goodput_rps": "requests/s",
}


def summary(
    median: float | None,
    low: float | None = None,
    high: float | None = None,
    *,
    name: str = "energy_per_output_token_j",
    source: str = "measured",
    note: str | None = None,
) -> MetricSummary:
    return MetricSummary(
        n=3 if median is not None else 0,
        median=median,
        ci95_low=low,
        ci95_high=high,
        unit=UNITS[name],
        source=source,  # type: ignore[arg-type]
        note=note,
    )


def params(
    *,
    workload: str | None = None,
    scenario: str = "offline",
    batch_size: int = 1,
    rate: float = 4.0,
    slo_ttft: float | None = None,
) -> dict[str, Any]:
    found: dict[str, Any] = {
        "model": "m",
        "scenario": scenario,
        "batch_size": batch_size,
        "device": "cuda",
        "traffic": {"rate": rate, "arrival": "poisson"},
        "slo": {"ttft_ms": slo_ttft, "tpot_ms": None, "e2e_ms": None},
    }
    if workload is not None:
        found["workload"] = workload
    return found


def full_metrics(ept: float = 0.002, source: str = "measured") -> dict[str, MetricSummary]:
    return {
        "energy_per_output_token_j": summary(ept, ept * 0.9, ept * 1.2, source=source),
        "output_tokens_per_j": summary(
            1 / ept, 1 / (ept * 1.2), 1 / (ept * 0.9), name="output_tokens_per_j", source=source
        ),
        "output_tokens_per_s": summary(500.0, 480.0, 520.0, name="output_tokens_per_s"),
        "ttft_ms.p99": summary(120.0, 110.0, 150.0, name="ttft_ms.p99"),
    }


def case(
    case_id: str,
    *,
    model: str = "m",
    backend: str = "vllm",
    case_params: dict[str, Any] | None = None,
    metrics: dict[str, MetricSummary] | None = None,
    outcome: str = "passed",
    **extra: Any,
) -> CaseRecord:
    return CaseRecord(
        id=f"suites/test_x.py::{case_id}",
        name=case_id,
        outcome=outcome,  # type: ignore[arg-type]
        model=model,
        backend=backend,
        backend_info={"name": backend, "version": "0.9.1", "device": "cuda"},
        params=case_params if case_params is not None else params(),
        metrics=full_metrics() if metrics is None else metrics,
        **extra,
    )


def record(*cases: CaseRecord, gpus: tuple[str, ...] = ("NVIDIA H100 80GB HBM3",)) -> RunRecord:
    return RunRecord(
        run_id="run-1",
        created_at=datetime(2026, 1, 1, tzinfo=timezone.utc),
        machine=MachineInfo(
            hostname="h",
            platform="linux",
            python="3.11",
            cpu_model="AMD EPYC",
            gpus=[GpuInfo(index=i, name=name) for i, name in enumerate(gpus)],
        ),
        cases=list(cases),
    )


def test_one_table_per_model_engine_and_gpu_with_rows_per_shape_and_scenario() -> None:
    run = record(
        case(
            "test_chat[server-r8]", case_params=params(workload="chat", scenario="server", rate=8)
        ),
        case(
            "test_chat[server-r2]", case_params=params(workload="chat", scenario="server", rate=2)
        ),
        case("test_fixed[bs8]", case_params=params(workload="fixed", batch_size=8)),
        case("test_chat[bs16]", case_params=params(workload="chat", batch_size=16)),
        case("test_chat[bs1]", case_params=params(workload="chat", batch_size=1)),
        case("test_chat[single]", case_params=params(workload="chat", scenario="single_stream")),
        case("test_mine", case_params=params()),
        case("test_gen[bs4]", case_params=params(workload="generation", batch_size=4)),
        case("test_chat[bs1-tf]", backend="transformers", case_params=params(workload="chat")),
        case("test_chat[other]", model="other", case_params=params(workload="chat")),
    )

    card = build_scorecard(run)

    titles = [(t.model, t.backend, t.hardware) for t in card.tables]
    assert titles == [
        ("m", "vllm", "NVIDIA H100 80GB HBM3"),
        ("m", "transformers", "NVIDIA H100 80GB HBM3"),
        ("other", "vllm", "NVIDIA H100 80GB HBM3"),
    ]
    rows = [(r.workload, r.setting) for r in card.tables[0].rows]
    assert rows == [
        ("chat", "offline bs 1"),
        ("chat", "offline bs 16"),
        ("chat", "single stream"),
        ("chat", "server 2 req/s"),
        ("chat", "server 8 req/s"),
        ("generation", "offline bs 4"),
        ("fixed", "offline bs 8"),
        ("test_mine", "offline bs 1"),  # no workload shape: named by its test
    ]
    assert card.tables[0].engine_version == "0.9.1"
    assert "vllm 0.9.1" in card.tables[0].title


def test_cases_that_would_share_a_row_are_named_by_their_test() -> None:
    run = record(
        case("test_chat[bf16]", case_params=params(workload="chat")),
        case("test_chat[fp16]", case_params=params(workload="chat")),
    )

    rows = [r.workload for r in build_scorecard(run).tables[0].rows]

    assert rows == ["chat (test_chat[bf16])", "chat (test_chat[fp16])"]


def test_a_cpu_case_is_grouped_under_its_cpu_and_skipped_cases_are_listed() -> None:
    cpu = case("test_a", case_params={**params(), "device": "cpu"})
    cpu.backend_info["device"] = "cpu"
    skipped = case("test_b", outcome="skipped", metrics={}, notes=["needs a GPU"])

    card = build_scorecard(record(cpu, skipped, gpus=()))

    assert [t.hardware for t in card.tables] == ["CPU: AMD EPYC"]
    assert card.skipped == ["test_b"]
    assert "not in the scorecard (skipped): test_b" in scorecard_lines(card)


def test_energy_per_1k_tokens_scales_the_median_and_interval() -> None:
    run = record(
        case("test_a", metrics={"energy_per_output_token_j": summary(0.002, 0.0015, 0.003)})
    )

    figure = build_scorecard(run).tables[0].rows[0].figures["energy_per_1k_output_tokens_j"]

    assert (figure.value, figure.low, figure.high) == pytest.approx((2.0, 1.5, 3.0))
    assert figure.unit == "J/1k tokens"
    assert figure.derived_from == "energy_per_output_token_j"


def test_tokens_per_joule_is_the_records_own_metric_where_it_has_one() -> None:
    own = summary(480.0, 400.0, 700.0, name="output_tokens_per_j")
    run = record(
        case(
            "test_a",
            metrics={
                "energy_per_output_token_j": summary(0.002, 0.0015, 0.003),
                "output_tokens_per_j": own,
            },
        )
    )

    figure = build_scorecard(run).tables[0].rows[0].figures["output_tokens_per_j"]

    assert (figure.value, figure.low, figure.high) == (480.0, 400.0, 700.0)
    assert figure.derived_from == "output_tokens_per_j"


def test_tokens_per_joule_from_energy_per_token_swaps_the_bounds() -> None:
    run = record(
        case(
            "test_a",
            metrics={
                "energy_per_output_token_j": summary(0.002, 0.0016, 0.0025, source="estimated")
            },
        )
    )

    figure = build_scorecard(run).tables[0].rows[0].figures["output_tokens_per_j"]

    # Lower energy per token is more tokens per joule: the high bound comes from the low one.
    assert (figure.value, figure.low, figure.high) == pytest.approx((500.0, 400.0, 625.0))
    assert figure.low < figure.value < figure.high
    assert figure.derived_from == "energy_per_output_token_j"
    assert figure.source == "estimated"


def test_no_interval_under_3_windows_is_shown_without_brackets() -> None:
    run = record(case("test_a", metrics={"energy_per_output_token_j": summary(0.002)}))

    row = build_scorecard(run).tables[0].rows[0]

    assert row.figures["output_tokens_per_j"].low is None
    assert figure_text(row.figures["energy_per_1k_output_tokens_j"], {}) == "2"


def test_missing_figures_carry_the_records_reasons_never_zero() -> None:
    metrics = {
        "energy_per_output_token_j": summary(None, note="no energy domain measured (meter none)"),
        "output_tokens_per_s": summary(500.0, 480.0, 520.0, name="output_tokens_per_s"),
    }
    reps = [
        RepetitionRecord(
            index=i,
            duration_s=1.0,
            requests=4,
            input_tokens=10,
            output_tokens=40,
            missing={"ttft_ms.p99": "the endpoint streams no tokens"},
        )
        for i in range(3)
    ]
    with_slo = case("test_a", metrics=metrics, repetitions=reps, case_params=params(slo_ttft=100))
    no_slo = case("test_b", metrics=metrics)
    failed = case(
        "test_c",
        outcome="failed",
        metrics={},
        error=CaseError(type="BackendError", message="out of memory"),
    )

    card = build_scorecard(record(with_slo, no_slo, failed))
    rows = {r.case_id.rsplit("::", 1)[1]: r.figures for r in card.tables[0].rows}

    assert rows["test_a"]["energy_per_1k_output_tokens_j"].value is None
    assert rows["test_a"]["energy_per_1k_output_tokens_j"].missing == (
        "no energy domain measured (meter none)"
    )
    assert rows["test_a"]["output_tokens_per_j"].missing == "no energy domain measured (meter none)"
    assert rows["test_a"]["ttft_ms.p99"].missing == "the endpoint streams no tokens"
    assert rows["test_a"]["goodput_rps"].missing == "goodput_rps is not in the record"
    assert rows["test_b"]["goodput_rps"].missing.startswith("no SLO set")
    assert rows["test_c"]["output_tokens_per_s"].missing == (
        "case failed: BackendError: out of memory"
    )
    lines = scorecard_lines(card)
    text = "\n".join(lines)
    assert "n/a (1)" in text
    assert "(1) no energy domain measured (meter none)" in lines
    assert any(line.startswith("test_c [failed]") for line in lines)
    assert " 0 " not in text


def test_the_table_marks_estimates_and_gives_intervals() -> None:
    run = record(
        case(
            "test_a", case_params=params(workload="chat"), metrics=full_metrics(source="estimated")
        )
    )

    row_line = next(
        line for line in scorecard_lines(build_scorecard(run)) if line.startswith("chat")
    )

    assert "2 [1.8, 2.4] est." in row_line  # J/1k tokens
    assert "500 [480, 520]" in row_line  # throughput, measured: no mark
    assert "500 [480, 520] est." not in row_line


def test_markdown_is_a_pasteable_table_per_group() -> None:
    run = record(
        case("test_a|b", case_params=params(workload="chat")),
        case("test_c", backend="transformers", case_params=params(workload="chat")),
    )

    text = scorecard_markdown(build_scorecard(run))

    assert text.count("| workload | scenario | J/1k out tok |") == 2
    assert "#### m on vllm 0.9.1 (NVIDIA H100 80GB HBM3)" in text
    header = next(line for line in text.splitlines() if line.startswith("| workload"))
    separator = text.splitlines()[text.splitlines().index(header) + 1]
    assert separator.count("|") == header.count("|")
    assert "- (1) no SLO set" in text


def test_json_keeps_values_intervals_sources_and_reasons() -> None:
    run = record(case("test_a", case_params=params(workload="chat", scenario="server", rate=4)))

    data = json.loads(render_scorecard(run, "json"))

    assert data == scorecard_json(build_scorecard(run))
    assert [f["key"] for f in data["figures"]] == [spec.key for spec in FIGURES]
    row = data["tables"][0]["rows"][0]
    assert (row["workload"], row["scenario"], row["rate_rps"]) == ("chat", "server", 4.0)
    energy = row["figures"]["energy_per_1k_output_tokens_j"]
    assert energy["value"] == pytest.approx(2.0)
    assert energy["source"] == "measured"
    assert row["figures"]["goodput_rps"]["value"] is None
    assert row["figures"]["goodput_rps"]["missing"].startswith("no SLO set")


def test_a_record_without_measured_cases_says_so() -> None:
    assert scorecard_lines(build_scorecard(record()))[0] == "no measured case: no scorecard"


def test_the_html_report_has_the_scorecard() -> None:
    page = render_html(record(case("test_a", case_params=params(workload="chat"))))

    section = page.split('<section id="scorecard">', 1)[1].split("</section>", 1)[0]
    assert "m on vllm 0.9.1 (NVIDIA H100 80GB HBM3)" in section
    assert "J/1k out tok" in section
    assert '<td class="n">2 [1.8, 2.4]<' in section  # measured: no mark


def test_the_html_scorecard_marks_an_estimate_once() -> None:
    run = record(
        case(
            "test_a", case_params=params(workload="chat"), metrics=full_metrics(source="estimated")
        )
    )
    page = render_html(run)

    section = page.split('<section id="scorecard">', 1)[1].split("</section>", 1)[0]
    # the cell's class marks it (the page's CSS writes "est." after it), not its text too
    assert '<td class="n e">2 [1.8, 2.4]<' in section
    assert "2 [1.8, 2.4] est." not in section


def _write(tmp_path: Path, run: RunRecord) -> Path:
    path = tmp_path / "run.json"
    path.write_text(run.model_dump_json(), encoding="utf-8")
    return path


@pytest.mark.parametrize("fmt", ["table", "markdown", "json"])
def test_llem_scorecard_prints_each_format(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str
) -> None:
    run = record(case("test_a", case_params=params(workload="chat")))

    assert main(["scorecard", str(_write(tmp_path, run)), "--format", fmt]) == 0

    assert capsys.readouterr().out == render_scorecard(run, fmt)


def test_llem_scorecard_defaults_to_the_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = record(case("test_a", case_params=params(workload="chat")))

    assert main(["scorecard", str(_write(tmp_path, run))]) == 0
    assert capsys.readouterr().out.splitlines()[5].startswith("chat ")


def test_llem_scorecard_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema_version": "1.0"}', encoding="utf-8")

    assert main(["scorecard", str(tmp_path / "missing.json")]) == 2
    assert main(["scorecard", str(bad)]) == 2
    with pytest.raises(SystemExit) as exited:
        main(["scorecard", str(_write(tmp_path, record())), "--format", "html"])
    assert exited.value.code == 4
    err = capsys.readouterr().err
    assert "llem scorecard: error:" in err
    assert "Traceback" not in err


class _Reporter:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def write_sep(self, sep: str, title: str, **markup: bool) -> None:
        self.lines.append(f"--- {title}")

    def write_line(self, line: str, **markup: bool) -> None:
        self.lines.append(line)


def _summary_session(run: RunRecord) -> Any:
    from types import SimpleNamespace

    return SimpleNamespace(
        record=run, store_error=None, journal_error=None, finish=None, journal=None
    )


def test_the_end_of_run_summary_prints_the_scorecard_after_the_case_table() -> None:
    from pytest_llem.finish import write_summary

    run = record(case("test_a", case_params=params(workload="chat")))
    reporter = _Reporter()

    write_summary(reporter, _summary_session(run))

    at = reporter.lines.index("--- llem scorecard")
    assert reporter.lines.index("--- llem benchmark summary") < at
    assert reporter.lines[at + 1 :] == scorecard_lines(build_scorecard(run))


def test_the_end_of_run_summary_has_no_scorecard_without_a_measured_case() -> None:
    from pytest_llem.finish import write_summary

    reporter = _Reporter()
    skipped = case("test_b", outcome="skipped", metrics={}, notes=["needs a GPU"])

    write_summary(reporter, _summary_session(record(skipped)))

    assert "--- llem scorecard" not in reporter.lines

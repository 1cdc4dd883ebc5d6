"""The HTML report: rendered from a run record alone, self-contained, escaped, and small."""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from pytest_llem.report import svg
from pytest_llem.report.html import HTML_FILENAME, render_html, write_html
from pytest_llem.results.models import (
    CaseError,
    CaseRecord,
    DistributionSummary,
    GpuInfo,
    LoadRecord,
    MachineInfo,
    MeterRecord,
    MetricSummary,
    PromptsRecord,
    RepetitionRecord,
    RunRecord,
    ServerLoadRecord,
)
from pytest_llem.results.store import read_run_record

pytest_plugins = ["pytester"]

PAYLOAD = "<script>alert(1)</script>"

# The metric names and units a server case records, in the record's order.
METRIC_UNITS = {
    "duration_s": "s",
    "requests": "requests",
    "input_tokens": "tokens",
    "output_tokens": "tokens",
    "energy_j": "J",
    "gpu_energy_j": "J",
    "cpu_energy_j": "J",
    "dram_energy_j": "J",
    "avg_power_w": "W",
    "energy_per_output_token_j": "J/token",
    "energy_per_request_j": "J/request",
    "output_tokens_per_j": "tokens/J",
    "output_tokens_per_s": "tokens/s",
    "total_tokens_per_s": "tokens/s",
    "requests_per_s": "requests/s",
    **{
        f"{latency}.{stat}": "ms"
        for latency in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")
        for stat in ("mean", "p50", "p90", "p95", "p99", "max")
    },
    "peak_memory_mb": "MB",
    "flops_estimate": "FLOP",
}
SERVER_METRIC_UNITS = {
    "goodput_rps": "requests/s",
    "energy_per_good_request_j": "J/request",
    "slo_met_fraction": "fraction",
    "slo_ttft_ms_met_fraction": "fraction",
    "target_rate_rps": "requests/s",
    "achieved_rate_rps": "requests/s",
    "mean_concurrency": "requests",
    "peak_concurrency": "requests",
    "queue_wait_ms.mean": "ms",
    "queue_wait_ms.p99": "ms",
}


def machine(hostname: str = "node1", *, gpus: int = 1) -> MachineInfo:
    """A machine with ``gpus`` H100s."""
    return MachineInfo(
        hostname=hostname,
        platform="Linux-6.8-x86_64",
        cpu_model="AMD EPYC 9654",
        cpu_count=96,
        memory_total_gb=1024.0,
        gpus=[
            GpuInfo(index=i, name="NVIDIA H100 80GB HBM3", driver="560.35", power_limit_w=700.0)
            for i in range(gpus)
        ],
        python="3.11.7",
        libraries={"pytest-llem": "0.1.0", "torch": "2.13.0", "vllm": None},
        git_commit="b7ead388abc2fed644047636360d2d13fa5511f4",
        git_dirty=False,
    )


def _summary(value: float | None, unit: str, *, source: str = "measured") -> MetricSummary:
    if value is None:
        return MetricSummary(n=0, unit=unit, source=source, note="no energy meter")  # type: ignore[arg-type]
    return MetricSummary(
        n=3,
        median=value,
        mean=value * 1.01,
        stdev=value * 0.02,
        min=value * 0.97,
        max=value * 1.04,
        ci95_low=value * 0.97,
        ci95_high=value * 1.04,
        unit=unit,
        source=source,  # type: ignore[arg-type]
    )


def _distribution(p50: float, n: int = 48) -> DistributionSummary:
    return DistributionSummary(
        n=n,
        mean=p50 * 1.1,
        min=p50 * 0.8,
        max=p50 * 2,
        p50=p50,
        p90=p50 * 1.5,
        p95=p50 * 1.7,
        p99=p50 * 1.9,
    )


def make_case(
    index: int,
    *,
    test: str = "test_chat",
    sweep: dict[str, Any] | None = None,
    energy: bool = True,
    name: str | None = None,
    server: bool = False,
) -> CaseRecord:
    """A realistic case: full metric set, latencies, repetitions, meters, prompts and params."""
    sweep = {} if sweep is None else sweep
    batch = int(sweep.get("batch_size", 1 + index % 4))
    params: dict[str, Any] = {
        "model": "llem-tiny",
        "backend": "transformers",
        "device": "cuda",
        "dtype": sweep.get("dtype", "bfloat16"),
        "batch_size": batch,
        "max_new_tokens": int(sweep.get("max_new_tokens", 16)),
        "num_prompts": 16,
        "sampling": {"preset": "deterministic", "temperature": 1.0, "top_k": 0},
        "traffic": {"arrival": "poisson", "rate": 4.0, "num_requests": None},
        "slo": {"ttft_ms": 2000.0, "tpot_ms": None},
        "stop": ["</s>", "\n\n"],
    }
    base = 0.0312345 / batch + 0.00123456 * (index % 7)
    metrics = {}
    units = {**METRIC_UNITS, **(SERVER_METRIC_UNITS if server else {})}
    for metric, unit in units.items():
        energy_metric = "energy" in metric or metric.endswith(("_power_w", "_per_j"))
        # Figures with as many digits as real ones, so page sizes are realistic.
        value: float | None = (0.5 + index % 5) * (1 + len(metric) / 10) * 1.23456789
        if metric == "energy_per_output_token_j":
            value = base
        elif metric == "output_tokens_per_s":
            value = 812.345 * batch**0.6
        elif metric.startswith("ttft_ms"):
            value = 2.54321 * batch
        if energy_metric and not energy:
            value = None
        metrics[metric] = _summary(
            value, unit, source="estimated" if energy_metric and index % 2 else "measured"
        )
    suffix = "-".join(f"{k}{v}" for k, v in sweep.items())
    case_name = name or (f"{test}[{suffix}]" if sweep else f"{test}_{index}")
    return CaseRecord(
        id=f"suites/test_x.py::{case_name}",
        name=case_name,
        params=params,
        backend="transformers",
        model="llem-tiny",
        backend_info={"name": "transformers", "version": "5.24.0", "device": "cuda"},
        meters=[
            MeterRecord(
                name="nvml",
                domains=["gpu"],
                sources={"gpu": "measured"},
                update_period_s=0.1,
                devices=["0"],
                selected_because="auto: an NVIDIA GPU is visible",
            )
        ],
        metrics=metrics,
        latency={
            "ttft_ms": _distribution(2.5 * batch),
            "tpot_ms": _distribution(1.1),
            "itl_ms": _distribution(1.05, 720),
            "e2e_ms": _distribution(19.0 * batch),
        },
        repetitions=[
            RepetitionRecord(
                index=r,
                duration_s=0.33,
                requests=16,
                input_tokens=1185,
                output_tokens=256,
                energy_j=9.4 if energy else None,
                server=ServerLoadRecord(
                    target_rate_rps=4,
                    achieved_rate_rps=3.9,
                    mean_concurrency=0.6,
                    peak_concurrency=3,
                    concurrency_bound_share=0.0,
                    saturated=False,
                )
                if server
                else None,
                values={"energy_per_output_token_j": base, "output_tokens_per_s": 800.0},
            )
            for r in range(3)
        ],
        load=LoadRecord(reused=index > 0, seconds=0.0 if index else 1.8),
        prompts=PromptsRecord(
            source="default",
            requests=16,
            overflow="truncate",
            input_tokens=DistributionSummary(n=16, p50=34, p99=253, max=269, unit="tokens"),
        ),
        sweep=sweep,
        warmup=1,
        notes=["flops_estimate: attention FLOPs excluded"],
    )


def make_record(
    cases: list[CaseRecord] | None = None, *, host: str = "node1", run_id: str = "run-0001"
) -> RunRecord:
    """A run record on one machine; by default a 2 x 3 sweep and a plain case."""
    if cases is None:
        cases = [
            make_case(i, sweep={"batch_size": bs, "dtype": dt})
            for i, (bs, dt) in enumerate(
                (bs, dt) for dt in ("bfloat16", "float16") for bs in (1, 4, 16)
            )
        ]
        cases.append(make_case(len(cases), test="test_plain"))
    return RunRecord(
        run_id=run_id,
        created_at=datetime(2026, 11, 26, 10, 0, 0, tzinfo=timezone.utc),
        finished_at=datetime(2026, 11, 26, 10, 5, 0, tzinfo=timezone.utc),
        machine=machine(host),
        options={"meter": "auto", "command_line": {"repeat": "3"}, "shuffle_seed": None},
        cases=cases,
    )


def hostile_record() -> RunRecord:
    """Cases whose id, name, parameters, prompts source, notes and error carry markup."""
    evil = make_case(0, name=f"test_evil[{PAYLOAD}]", sweep={"batch_size": 1})
    evil = evil.model_copy(
        update={
            "params": {
                **evil.params,
                "prompt": PAYLOAD,
                "system": '"><img src=x onerror=alert(2)>',
            },
            "sweep": {"batch_size": 1, "tag": PAYLOAD},
            "notes": [f"model output: {PAYLOAD}"],
            "prompts": evil.prompts.model_copy(update={"source": f"prompts/{PAYLOAD}.jsonl"})
            if evil.prompts
            else None,
        }
    )
    failed = make_case(1, name="test_evil_error", sweep={"batch_size": 4, "tag": "x"})
    failed = failed.model_copy(
        update={
            "outcome": "failed",
            "error": CaseError(type="InferenceError", message=f"the model said {PAYLOAD}"),
        }
    )
    return make_record([evil, failed, make_case(2, test="test_plain")])


def _script_and_style(page: str) -> tuple[str, str]:
    script = re.search(r"<script>(.*?)</script>", page, re.S)
    style = re.search(r"<style>(.*?)</style>", page, re.S)
    assert script is not None
    assert style is not None
    return script.group(1), style.group(1)


def _hash(text: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


def test_page_has_every_section() -> None:
    page = render_html(make_record())
    for anchor in ('id="run"', 'id="case-table"', 'id="sweeps"', 'id="pareto"', 'id="details"'):
        assert anchor in page
    assert 'id="comparison"' not in page  # no comparison given
    assert "NVIDIA H100 80GB HBM3" in page
    assert "nvml" in page
    assert "measured" in page
    assert "No idle baseline in this record" in page
    # Units in the case table's headers.
    for unit in ("J/token", "tokens/s", "ms", "W"):
        assert f'<span class="unit">{unit}</span>' in page
    # One details block per case, with its metrics and their intervals.
    assert page.count('<details class="case"') == 7
    assert "95% interval" in page
    assert "no power timeline in this record" in page
    assert "ttft_ms" in page  # the latency distribution


def test_sweep_charts_per_swept_parameter() -> None:
    page = render_html(make_record())
    # test_chat swept batch_size (3 values) and dtype (2): two axes, two charts each.
    assert "test_chat: energy per output token vs batch_size" in page
    assert "test_chat: throughput vs batch_size" in page
    assert "test_chat: energy per output token vs dtype" in page
    assert "test_chat: throughput vs dtype" in page
    # Series are named by the other swept values.
    assert "dtype=float16" in page
    assert "batch_size=16" in page
    assert "test_plain" not in page.split('id="sweeps"')[1].split("</section>")[0]


def test_pareto_front_across_cases() -> None:
    page = render_html(make_record())
    pareto = page.split('id="pareto"')[1].split("</section>")[0]
    assert "Energy per output token vs ttft_ms.p50" in pareto
    assert "Energy per output token vs e2e_ms.p50" in pareto
    assert "Pareto front" in pareto
    assert 'href="#case-' in pareto


def test_no_energy_gives_placeholders_not_zeros() -> None:
    record = make_record(
        [make_case(i, energy=False, sweep={"batch_size": b}) for i, b in enumerate((1, 2, 4))]
    )
    page = render_html(record)
    assert "energy per output token vs batch_size: no values in this record" in page
    assert "throughput vs batch_size: no values" not in page


def test_comparison_deltas_with_verdicts() -> None:
    comparison = {
        "baseline": "baseline.json",
        "threshold": 0.05,
        "rows": [
            {
                "case": "test_chat[batch_size1-dtypebfloat16]",
                "metric": "energy_per_output_token_j",
                "baseline": 0.03,
                "current": 0.036,
                "ratio": 1.2,
                "low": 1.1,
                "high": 1.3,
                "verdict": "regressed",
            },
            {
                "case": PAYLOAD,
                "metric": "output_tokens_per_s",
                "baseline": 800.0,
                "current": 801.0,
                "ratio": 1.001,
                "low": None,
                "high": None,
                "verdict": "inconclusive",
            },
        ],
    }
    page = render_html(make_record(), comparison=comparison)
    section = page.split('id="comparison"')[1].split("</section>")[0]
    assert '<span class="badge regressed">regressed</span>' in section
    assert '<span class="badge inconclusive">inconclusive</span>' in section
    assert "baseline.json" in section
    assert "1.2" in section
    assert "1.1 \u2013 1.3" in section
    assert PAYLOAD not in page


def test_markup_in_ids_params_prompts_and_errors_is_escaped() -> None:
    page = render_html(hostile_record())
    assert "<script>alert" not in page
    assert "<img src=x" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    # Exactly one script element: the report's own, pinned by hash in the CSP.
    assert page.count("<script") == 1
    script, style = _script_and_style(page)
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', page)
    assert csp is not None
    policy = html.unescape(csp.group(1))
    assert f"script-src '{_hash(script)}'" in policy
    assert f"style-src '{_hash(style)}'" in policy
    assert "default-src 'none'" in policy


def test_page_is_self_contained() -> None:
    page = render_html(make_record())
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    assert "@import" not in page
    assert "url(" not in page
    assert "<link" not in page
    assert "<iframe" not in page


def test_rendering_is_deterministic_and_reads_only_the_record(tmp_path: Path) -> None:
    record = make_record()
    path = write_html(record, tmp_path / "out" / HTML_FILENAME)
    again = RunRecord.model_validate_json(record.model_dump_json())
    assert path.read_text(encoding="utf-8") == render_html(again)
    assert not list((tmp_path / "out").glob(".*.tmp"))


def test_fifty_cases_stay_under_300_kb() -> None:
    sweep = [
        make_case(i, sweep={"batch_size": b, "max_new_tokens": t, "dtype": d})
        for i, (b, t, d) in enumerate(
            (b, t, d)
            for b in (1, 2, 4, 8, 16)
            for t in (16, 32, 64, 128)
            for d in ("bfloat16", "float16")
        )
    ]
    others = [make_case(len(sweep) + i, test="test_server", server=True) for i in range(10)]
    page = render_html(make_record(sweep + others))
    size = len(page.encode("utf-8"))
    assert size < 300_000, size


def test_svg_text_is_escaped_and_output_deterministic() -> None:
    series = [svg.Series(PAYLOAD, [(1, 0.5), (4, 0.25), (16, None)])]
    drawing = svg.line_chart(series, title=PAYLOAD, x_label="<b>", y_label="&")
    assert "<script>" not in drawing
    assert "<b>" not in drawing
    assert drawing == svg.line_chart(series, title=PAYLOAD, x_label="<b>", y_label="&")
    scatter = svg.pareto_scatter(
        [svg.ScatterPoint(PAYLOAD, 1.0, 2.0, href='#"x'), svg.ScatterPoint("b", 2.0, 1.0)],
        title="t",
        x_label="x",
        y_label="y",
    )
    assert "<script>" not in scatter
    assert 'href="#&quot;x"' in scatter


def test_pareto_front_keeps_points_no_other_beats() -> None:
    points = [(1.0, 5.0), (2.0, 3.0), (3.0, 4.0), (4.0, 1.0), (2.0, 3.0), (5.0, 1.0)]
    assert svg.pareto_front(points) == [0, 1, 3]


def test_nice_ticks_cover_the_range() -> None:
    assert svg.nice_ticks(0, 0.0367) == [0.0, 0.01, 0.02, 0.03, 0.04]
    assert svg.nice_ticks(0, 2477) == [0.0, 500.0, 1000.0, 1500.0, 2000.0, 2500.0]
    assert svg.format_number(0.03513801) == "0.03514"
    assert svg.format_number(2477.4) == "2,477"
    assert svg.format_number(None) == "n/a"


def test_power_timeline_draws_a_series_when_there_is_one() -> None:
    assert "no power timeline in this record" in svg.power_timeline(None)
    drawn = svg.power_timeline([[(0.0, 300.0), (0.1, 420.0), (0.2, 415.0)]])
    assert "<path" in drawn
    assert "power (W)" in drawn


SWEEP_TEST = f"""
import pytest

@pytest.mark.llem(max_new_tokens=4, min_new_tokens=4, num_prompts=4)
@pytest.mark.llem_sweep(batch_size=[1, 2, 4])
def test_sweep(llem):
    llem.run()

@pytest.mark.llem(max_new_tokens=4, min_new_tokens=4, num_prompts=2)
@pytest.mark.parametrize("tag", [{PAYLOAD!r}])
def test_tagged(llem, tag):
    llem.run(prompts="synthetic", input_tokens=4)
"""


@pytest.mark.slow
def test_real_record_from_a_sweep_on_the_tiny_model(
    pytester: pytest.Pytester, tiny_model: Path
) -> None:
    pytester.makepyfile(SWEEP_TEST)
    result = pytester.runpytest(
        "--llem-meter=none", "--llem-repeat=2", "--llem-warmup=0", "-p", "no:cacheprovider"
    )
    result.assert_outcomes(passed=4)
    record = read_run_record(pytester.path / "reports" / "llem-report.json")
    page = render_html(record)
    assert page.count('<details class="case"') == 4
    assert "test_sweep: throughput vs batch_size" in page
    # --llem-meter=none: no energy, so the energy chart says so instead of drawing zeros.
    assert "test_sweep: energy per output token vs batch_size: no values in this record" in page
    assert "<script>alert" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert json.loads(record.model_dump_json())["cases"][0]["sweep"] == {"batch_size": 1}


def test_the_records_own_comparison_is_shown() -> None:
    comparison = {
        "baseline": {"label": "run base at 2026-11-25", "run_id": "base-1"},
        "rows": [
            {
                "case_id": "suites/test_x.py::test_plain_6",
                "metric": "output_tokens_per_s",
                "unit": "tokens/s",
                "baseline": 800.0,
                "current": 1000.0,
                "ratio": 1.25,
                "low": 1.2,
                "high": 1.3,
                "verdict": "improved",
            }
        ],
    }
    record = make_record().model_copy(update={"comparison": comparison})
    page = render_html(record)
    section = page.split('id="comparison"')[1].split("</section>")[0]
    assert "suites/test_x.py::test_plain_6" in section
    assert "baseline.label" in section
    assert '<span class="badge improved">improved</span>' in section
    # An explicit comparison wins over the record's.
    assert "base-1" not in render_html(record, comparison={"rows": []})


def test_empty_runs_and_cases_without_figures_render() -> None:
    bare = CaseRecord(
        id="t.py::test_broken",
        name="test_broken",
        outcome="error",
        error=CaseError(type="ModelLoadError", message="no such model"),
    )
    page = render_html(make_record([bare]))
    assert "ModelLoadError: no such model" in page
    assert "no latencies in this record" in page
    assert "no values in this record" in page
    empty = render_html(make_record([]))
    assert 'data-cases="0"' in empty


def test_attributed_energy_per_request_and_its_split_are_drawn() -> None:
    from pytest_llem.results.attribution import AttributionRecord, RequestEnergyRecord

    case = make_case(0)
    rep = case.repetitions[0]
    rep.per_request = [
        RequestEnergyRecord(
            index=i, input_tokens=20, output_tokens=n, energy_j=0.5 + 0.1 * n,
            prefill_energy_j=0.5, decode_energy_j=0.1 * n,
        )
        for i, n in enumerate((2, 24, 8))
    ]  # fmt: skip
    rep.unattributed_energy_j = 0.2
    rep.attribution = AttributionRecord(
        timeline="engine", power="cpu: <b>linear</b>", fit_r2=0.93, fit_steps=40
    )
    for name, value in (("prefill_energy_j", 1.5), ("decode_energy_j", 3.4)):
        case.metrics[name] = _summary(value, "J", source="attributed")
    page = render_html(make_record([case, make_case(1)]))
    assert page.count("Energy per request and per phase") == 1  # only the case that has it
    assert "Energy of each request against its output tokens" in page
    assert "20 in, 24 out: 2.9 J (prefill 0.5 J)" in page
    assert "prefill: 1.5 J (31%)" in page
    assert "decode: 3.4 J (69%)" in page
    assert "&lt;b&gt;linear&lt;/b&gt;" in page  # record text is escaped

"""Every METRICS.md figure on hand-computed examples: latency, energy, throughput, FLOPs."""

from __future__ import annotations

import pytest

from pytest_llem.backends.base import Generation, MemoryUsage
from pytest_llem.exceptions import InferenceError
from pytest_llem.harness.metrics import (
    LATENCY_METRICS,
    LATENCY_STATISTICS,
    METRIC_UNITS,
    WindowEnergy,
    combine_energy,
    metric_source,
    request_latency,
    window_values,
)
from pytest_llem.meters.base import DomainReading, EnergyReading

MEMORY = MemoryUsage(peak_mb=256.0, kind="cuda_allocated")


def gen(index: int, times: list[float], *, issued: float = 0.0, inputs: int = 1) -> Generation:
    return Generation(
        request_index=index,
        input_tokens=inputs,
        output_token_ids=list(range(len(times))),
        token_times=times,
        issued_at=issued,
    )


# --- per-request latency -------------------------------------------------------------------


def test_latency_one_token_per_chunk() -> None:
    lat = request_latency(gen(0, [10.1, 10.15, 10.25, 10.3], issued=10.0))
    assert lat.output_tokens == 4
    assert lat.ttft_ms == pytest.approx(100.0)  # 10.1 - 10.0 = 0.1 s
    assert lat.e2e_ms == pytest.approx(300.0)  # 10.3 - 10.0 = 0.3 s
    assert lat.tpot_ms == pytest.approx(200.0 / 3)  # (300 - 100) / (4 - 1)
    assert lat.itl_ms == pytest.approx([50.0, 100.0, 50.0])  # gaps 0.05, 0.10, 0.05 s


def test_latency_chunk_rule() -> None:
    # chunks: 3 tokens at 0.2, 2 tokens at 0.5, 1 token at 0.6
    lat = request_latency(gen(1, [0.2, 0.2, 0.2, 0.5, 0.5, 0.6]))
    assert lat.ttft_ms == pytest.approx(200.0)
    assert lat.e2e_ms == pytest.approx(600.0)
    assert lat.tpot_ms == pytest.approx(80.0)  # (600 - 200) / (6 - 1)
    # first token excluded; its 2 chunk-mates arrived with it: 0, 0;
    # gap 300 ms before the 2-token chunk: 150, 150; gap 100 ms before the last token: 100
    assert lat.itl_ms == pytest.approx([0.0, 0.0, 150.0, 150.0, 100.0])
    assert lat.e2e_ms is not None
    assert lat.ttft_ms is not None
    assert sum(lat.itl_ms) == pytest.approx(lat.e2e_ms - lat.ttft_ms)  # 400 = 600 - 200
    assert len(lat.itl_ms) == lat.output_tokens - 1
    assert sum(lat.itl_ms) / len(lat.itl_ms) == pytest.approx(lat.tpot_ms)  # mean ITL = TPOT


def test_latency_whole_output_in_one_chunk() -> None:
    lat = request_latency(gen(2, [0.5, 0.5, 0.5]))
    assert lat.ttft_ms == pytest.approx(500.0)
    assert lat.e2e_ms == pytest.approx(500.0)
    assert lat.tpot_ms == pytest.approx(0.0)  # (500 - 500) / 2
    assert lat.itl_ms == [0.0, 0.0]


def test_latency_one_token_has_no_tpot_or_itl() -> None:
    lat = request_latency(gen(3, [0.4], issued=0.0))
    assert lat.ttft_ms == pytest.approx(400.0)
    assert lat.e2e_ms == pytest.approx(400.0)  # last token is the first token
    assert lat.tpot_ms is None  # fewer than 2 output tokens: excluded from TPOT
    assert lat.itl_ms == []


def test_latency_no_token() -> None:
    lat = request_latency(gen(4, [], issued=3.0))
    assert (lat.ttft_ms, lat.e2e_ms, lat.tpot_ms, lat.itl_ms) == (None, None, None, [])


def test_latency_counts_from_scheduled_arrival() -> None:
    # issued at 10.0 but scheduled to arrive at 9.5: queueing counts
    lat = request_latency(gen(5, [10.1, 10.3], issued=10.0), arrival=9.5)
    assert lat.ttft_ms == pytest.approx(600.0)  # 10.1 - 9.5
    assert lat.e2e_ms == pytest.approx(800.0)  # 10.3 - 9.5
    assert lat.tpot_ms == pytest.approx(200.0)  # (800 - 600) / 1
    assert lat.itl_ms == pytest.approx([200.0])


def test_latency_rejects_missing_token_times() -> None:
    broken = Generation(
        request_index=0, input_tokens=1, output_token_ids=[1, 2], token_times=[0.1], issued_at=0
    )
    with pytest.raises(InferenceError, match="2 output tokens but 1 token times"):
        request_latency(broken)


# --- energy of a window ----------------------------------------------------------------------


def reading(meter: str, notes: tuple[str, ...] = (), emissions: float | None = None,
            **domains: tuple[float | None, str]) -> EnergyReading:  # fmt: skip
    return EnergyReading(
        meter=meter,
        duration_s=1.0,
        domains={
            d: DomainReading(d, j, src, reason=None if j is not None else f"{meter} cannot")  # type: ignore[arg-type]
            for d, (j, src) in domains.items()
        },
        emissions_kg=emissions,
        notes=notes,
    )


def test_combine_energy_takes_first_meter_per_domain() -> None:
    nvml = reading("nvml", gpu=(100.0, "measured"), cpu=(None, "measured"), emissions=0.001)
    codecarbon = reading(
        "codecarbon",
        notes=("TDP fallback",),
        gpu=(120.0, "estimated"),
        cpu=(30.0, "estimated"),
        dram=(None, "estimated"),
    )
    energy = combine_energy([nvml, codecarbon])
    # gpu from nvml (first that covers it); cpu from codecarbon (nvml has no number)
    assert energy.domains == {"gpu": 100.0, "cpu": 30.0, "dram": None}
    assert energy.total_j == pytest.approx(130.0)  # 100 + 30; dram uncovered, not 0
    assert energy.sources == {"gpu": "measured", "cpu": "estimated"}
    assert energy.meters == {"gpu": "nvml", "cpu": "codecarbon"}
    assert energy.covered == ["gpu", "cpu"]
    assert energy.notes == [
        "dram: not measured (codecarbon: codecarbon cannot)",
        "codecarbon: TDP fallback",
    ]
    assert energy.emissions_kg == pytest.approx(0.001)  # codecarbon has none; 0.001 + nothing


def test_combine_energy_sums_emissions() -> None:
    a = reading("a", gpu=(1.0, "measured"), emissions=0.25)
    b = reading("b", cpu=(2.0, "measured"), emissions=0.5)
    assert combine_energy([a, b]).emissions_kg == pytest.approx(0.75)  # 0.25 + 0.5


def test_combine_energy_without_meters_is_none_not_zero() -> None:
    energy = combine_energy([])
    assert energy.total_j is None
    assert energy.domains == {"gpu": None, "cpu": None, "dram": None}
    assert energy.sources == {}
    assert energy.emissions_kg is None
    assert energy.notes == [
        f"{d}: not measured (no meter covers it)" for d in ("gpu", "cpu", "dram")
    ]


# --- every scalar metric of a window ---------------------------------------------------------

# r0: 3 tokens, one per chunk.  ttft 100, e2e 300, tpot 200/2 = 100, itl [100, 100]
# r1: 4 tokens, chunk of 3 then 1.  ttft 250, e2e 550, tpot 300/3 = 100, itl [0, 0, 300]
# r2: 1 token.  ttft 400, e2e 400, no tpot, no itl
WINDOW = [
    gen(0, [0.1, 0.2, 0.3], inputs=5),
    gen(1, [0.25, 0.25, 0.25, 0.55], inputs=7),
    gen(2, [0.4], inputs=8),
]
ENERGY = WindowEnergy(
    total_j=200.0,
    domains={"gpu": 150.0, "cpu": 50.0, "dram": None},
    sources={"gpu": "measured", "cpu": "estimated"},
)


def test_window_values_by_hand() -> None:
    v = window_values(
        generations=WINDOW,
        duration_s=2.0,
        energy=ENERGY,
        non_embedding_parameters=1000,
        peak_memory=MEMORY,
    )
    expected = {
        "duration_s": 2.0,
        "requests": 3.0,
        "input_tokens": 20.0,  # 5 + 7 + 8
        "output_tokens": 8.0,  # 3 + 4 + 1
        "energy_j": 200.0,
        "gpu_energy_j": 150.0,
        "cpu_energy_j": 50.0,
        "dram_energy_j": None,  # uncovered: None, never 0
        "avg_power_w": 100.0,  # 200 J / 2 s
        "energy_per_output_token_j": 25.0,  # 200 J / 8 tokens
        "energy_per_request_j": 200.0 / 3,  # 200 J / 3 requests = 66.67
        "output_tokens_per_j": 0.04,  # 8 / 200
        "idle_power_w": None,  # no baseline given
        "dynamic_energy_j": None,
        "dynamic_energy_per_output_token_j": None,
        "output_tokens_per_s": 4.0,  # 8 / 2
        "total_tokens_per_s": 14.0,  # (20 + 8) / 2
        "requests_per_s": 1.5,  # 3 / 2
        # ttft [100, 250, 400]: p90 rank 1.8 -> 250 + 0.8*150 = 370; p95 rank 1.9 -> 385;
        # p99 rank 1.98 -> 397
        "ttft_ms.mean": 250.0,  # 750 / 3
        "ttft_ms.p50": 250.0,
        "ttft_ms.p90": 370.0,
        "ttft_ms.p95": 385.0,
        "ttft_ms.p99": 397.0,
        "ttft_ms.max": 400.0,
        # tpot [100, 100] (r2 has 1 token and is excluded)
        "tpot_ms.mean": 100.0,
        "tpot_ms.p50": 100.0,
        "tpot_ms.p90": 100.0,
        "tpot_ms.p95": 100.0,
        "tpot_ms.p99": 100.0,
        "tpot_ms.max": 100.0,
        # itl sorted [0, 0, 100, 100, 300]: mean 500/5 = 100; p50 rank 2 -> 100;
        # p90 rank 3.6 -> 100 + 0.6*200 = 220; p95 rank 3.8 -> 260; p99 rank 3.96 -> 292
        "itl_ms.mean": 100.0,
        "itl_ms.p50": 100.0,
        "itl_ms.p90": 220.0,
        "itl_ms.p95": 260.0,
        "itl_ms.p99": 292.0,
        "itl_ms.max": 300.0,
        # e2e sorted [300, 400, 550]: mean 1250/3; p50 400; p90 rank 1.8 -> 400 + 0.8*150 = 520;
        # p95 rank 1.9 -> 535; p99 rank 1.98 -> 547
        "e2e_ms.mean": 1250.0 / 3,
        "e2e_ms.p50": 400.0,
        "e2e_ms.p90": 520.0,
        "e2e_ms.p95": 535.0,
        "e2e_ms.p99": 547.0,
        "e2e_ms.max": 550.0,
        "peak_memory_mb": 256.0,
        "flops_estimate": 56_000.0,  # 2 * 1000 params * (20 + 8) tokens
    }
    assert set(v) == set(expected)
    assert set(v) <= set(METRIC_UNITS)  # every figure has a unit
    for name, want in expected.items():
        assert v[name] == (None if want is None else pytest.approx(want)), name


def test_window_values_per_round() -> None:
    # the same requests, counted as 2 rounds of a workload inside one 2 s window
    v = window_values(
        generations=WINDOW,
        duration_s=2.0,
        energy=ENERGY,
        rounds=2,
        non_embedding_parameters=1000,
        peak_memory=MEMORY,
    )
    assert v["duration_s"] == pytest.approx(1.0)  # 2 s / 2
    assert v["requests"] == pytest.approx(1.5)  # 3 / 2
    assert v["input_tokens"] == pytest.approx(10.0)  # 20 / 2
    assert v["output_tokens"] == pytest.approx(4.0)  # 8 / 2
    assert v["energy_j"] == pytest.approx(100.0)  # 200 J / 2
    assert v["gpu_energy_j"] == pytest.approx(75.0)  # 150 / 2
    assert v["cpu_energy_j"] == pytest.approx(25.0)  # 50 / 2
    assert v["dram_energy_j"] is None
    assert v["flops_estimate"] == pytest.approx(28_000.0)  # 2 * 1000 * (10 + 4)
    # rates and ratios do not change with rounds
    assert v["avg_power_w"] == pytest.approx(100.0)  # 100 J / 1 s
    assert v["energy_per_output_token_j"] == pytest.approx(25.0)  # 100 J / 4
    assert v["energy_per_request_j"] == pytest.approx(200.0 / 3)  # 100 J / 1.5
    assert v["output_tokens_per_j"] == pytest.approx(0.04)  # 4 / 100
    assert v["output_tokens_per_s"] == pytest.approx(4.0)  # 4 / 1
    assert v["total_tokens_per_s"] == pytest.approx(14.0)  # 14 / 1
    assert v["requests_per_s"] == pytest.approx(1.5)  # 1.5 / 1
    assert v["ttft_ms.p90"] == pytest.approx(370.0)  # latencies are per request


def test_window_values_rejects_zero_rounds() -> None:
    with pytest.raises(ValueError, match="rounds"):
        window_values(
            generations=WINDOW, duration_s=1.0, energy=ENERGY, rounds=0,
            non_embedding_parameters=None, peak_memory=MEMORY,
        )  # fmt: skip


def test_energy_metrics_are_none_without_energy() -> None:
    v = window_values(
        generations=WINDOW,
        duration_s=2.0,
        energy=combine_energy([]),
        non_embedding_parameters=None,
        peak_memory=MemoryUsage(peak_mb=None, kind="unavailable"),
    )
    for name in (
        "energy_j", "gpu_energy_j", "cpu_energy_j", "dram_energy_j", "avg_power_w",
        "energy_per_output_token_j", "energy_per_request_j", "output_tokens_per_j",
    ):  # fmt: skip
        assert v[name] is None, name
    assert v["flops_estimate"] is None  # parameter count unknown
    assert v["peak_memory_mb"] is None
    assert v["output_tokens_per_s"] == pytest.approx(4.0)  # clock metrics still measured


def test_division_by_zero_gives_none() -> None:
    empty = [gen(0, [], inputs=3)]
    v = window_values(
        generations=empty,
        duration_s=0.0,
        energy=WindowEnergy(total_j=0.0, domains={"gpu": 0.0}, sources={"gpu": "measured"}),
        non_embedding_parameters=10,
        peak_memory=MEMORY,
    )
    assert v["energy_j"] == 0.0  # a measured 0 J stays 0
    assert v["avg_power_w"] is None  # 0 J / 0 s
    assert v["energy_per_output_token_j"] is None  # 0 J / 0 tokens
    assert v["output_tokens_per_j"] is None  # 0 tokens / 0 J
    assert v["energy_per_request_j"] == 0.0  # 0 J / 1 request
    assert v["output_tokens_per_s"] is None  # 0 s
    assert v["requests_per_s"] is None
    assert v["flops_estimate"] == pytest.approx(60.0)  # 2 * 10 * (3 + 0)
    for name in LATENCY_METRICS:
        for stat in LATENCY_STATISTICS:
            assert v[f"{name}.{stat}"] is None  # no token, no latency


def test_metric_units() -> None:
    assert METRIC_UNITS["energy_j"] == "J"
    assert METRIC_UNITS["avg_power_w"] == "W"
    assert METRIC_UNITS["output_tokens_per_j"] == "tokens/J"
    assert METRIC_UNITS["output_tokens_per_s"] == "tokens/s"
    assert METRIC_UNITS["requests_per_s"] == "requests/s"
    assert METRIC_UNITS["ttft_ms.p99"] == "ms"
    assert METRIC_UNITS["peak_memory_mb"] == "MB"
    assert METRIC_UNITS["flops_estimate"] == "FLOP"
    assert METRIC_UNITS["duration_s"] == "s"
    assert METRIC_UNITS["output_tokens"] == "tokens"
    assert METRIC_UNITS["requests"] == "requests"


def test_metric_source() -> None:
    mixed = {"gpu": "measured", "cpu": "estimated"}
    assert metric_source("energy_j", mixed) == "estimated"  # one covered domain estimated
    assert metric_source("energy_per_output_token_j", mixed) == "estimated"
    assert metric_source("gpu_energy_j", mixed) == "measured"  # its own domain
    assert metric_source("cpu_energy_j", mixed) == "estimated"
    assert metric_source("energy_j", {"gpu": "measured"}) == "measured"
    assert metric_source("avg_power_w", {"gpu": "measured", "cpu": "measured"}) == "measured"
    assert metric_source("flops_estimate", {"gpu": "measured"}) == "estimated"
    assert metric_source("output_tokens_per_s", mixed) == "measured"
    assert metric_source("ttft_ms.p99", mixed) == "measured"


def _energy(total: float) -> WindowEnergy:
    return WindowEnergy(
        total_j=total,
        domains={"gpu": total, "cpu": None, "dram": None},
        sources={"gpu": "measured"},
    )


def test_dynamic_energy_by_hand() -> None:
    # 2 rounds in a 4 s window, 900 J, idle 150 W: dynamic = 900 - 150 * 4 = 300 J in all,
    # 150 J per round; 12 output tokens in all: 300 / 12 = 25 J/token
    gens = [
        Generation(0, 3, [1] * 6, [0.1 * k for k in range(1, 7)], 0.0),
        Generation(1, 3, [1] * 6, [0.1 * k for k in range(1, 7)], 0.0),
    ]
    v = window_values(
        generations=gens,
        duration_s=4.0,
        energy=_energy(900.0),
        rounds=2,
        non_embedding_parameters=None,
        peak_memory=MemoryUsage(None, "unavailable"),
        idle_power_w=150.0,
    )
    assert v["idle_power_w"] == 150.0
    assert v["dynamic_energy_j"] == pytest.approx(150.0)
    assert v["dynamic_energy_per_output_token_j"] == pytest.approx(25.0)
    assert v["energy_j"] == pytest.approx(450.0)


def test_dynamic_energy_is_not_clamped() -> None:
    gens = [Generation(0, 3, [1, 1], [0.1, 0.2], 0.0)]
    v = window_values(
        generations=gens,
        duration_s=2.0,
        energy=_energy(100.0),
        non_embedding_parameters=None,
        peak_memory=MemoryUsage(None, "unavailable"),
        idle_power_w=80.0,
    )
    assert v["dynamic_energy_j"] == pytest.approx(-60.0)  # 100 - 80 * 2
    assert v["dynamic_energy_per_output_token_j"] == pytest.approx(-30.0)

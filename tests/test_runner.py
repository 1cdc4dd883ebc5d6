"""The runner on a fake backend and fake meters: window edges, order of calls, batches, records.

The fake backend takes 0.125 s to a batch's first token and 0.03125 s per further token, and
``synchronize`` takes 0.0625 s; these are exact in binary so the expected figures are exact.
"""

from __future__ import annotations

import pytest

from pytest_llem.backends.base import GenerateParams, Request
from pytest_llem.config.models import CaseConfig
from pytest_llem.exceptions import ConfigurationError, EnergyMeterError, InferenceError
from pytest_llem.harness.metrics import FLOPS_METHOD
from pytest_llem.harness.runner import CaseMeasurement, measure_window, run_case
from pytest_llem.harness.scenarios import build_workload, split_batches
from pytest_llem.results.stats import FEWER_THAN_3_NOTE
from tests.fakes.fake_backend import FakeBackend, FakeClock
from tests.fakes.fake_meter import FakeMeter, no_dram_meter

# prompt i has i+1 words, so input tokens are 1..10 (sum 55)
PROMPTS = [" ".join(["word"] * (i + 1)) for i in range(10)]
BATCHES = ["generate:4", "generate:4", "generate:2"]  # 10 prompts in batches of 4


class Rig:
    """A fake clock, backend and two meters sharing one event log."""

    def __init__(self, **backend_options: object) -> None:
        self.clock = FakeClock()
        self.events: list[str] = []
        self.backend = FakeBackend(self.clock, self.events, sync_s=0.0625, **backend_options)  # type: ignore[arg-type]
        self.gpu = FakeMeter("gpu-fake", self.clock, self.events, power_w={"gpu": 200.0})
        self.cc = FakeMeter(
            "cc",
            self.clock,
            self.events,
            power_w={"cpu": 50.0},
            sources={"cpu": "estimated"},
            missing={"dram": "no DRAM counter"},
        )

    def run(self, meters: list[FakeMeter] | None = None, **config: object) -> CaseMeasurement:
        case = CaseConfig.model_validate({"batch_size": 4, "max_new_tokens": 5, **config})
        return run_case(
            backend=self.backend,
            meters=[self.gpu, self.cc] if meters is None else meters,
            config=case,
            prompts=PROMPTS,
            clock=self.clock,
            non_embedding_parameters=1000,
        )


WINDOW_EVENTS = [
    "reset_peak_memory",
    "synchronize",
    "start:gpu-fake",
    "start:cc",
    *BATCHES,
    "synchronize",
    "stop:cc",
    "stop:gpu-fake",
    "peak_memory",
]


def test_order_of_calls_with_warmup_outside_windows() -> None:
    rig = Rig()
    rig.run(warmup=1, repeat=3)
    # warmup runs the whole workload before the first window opens
    assert rig.events == [*BATCHES, *WINDOW_EVENTS, *WINDOW_EVENTS, *WINDOW_EVENTS]
    assert not rig.gpu.running
    assert not rig.cc.running


def test_batches_split_in_order() -> None:
    rig = Rig()
    rig.run(warmup=0, repeat=1)
    assert rig.backend.batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


@pytest.mark.parametrize(
    ("n", "size", "sizes"),
    [(10, 4, [4, 4, 2]), (10, 1, [1] * 10), (10, 10, [10]), (3, 8, [3])],
)
def test_split_batches(n: int, size: int, sizes: list[int]) -> None:
    requests = [Request(i, "p") for i in range(n)]
    batches = split_batches(requests, size)
    assert [len(b) for b in batches] == sizes
    assert [r.index for b in batches for r in b] == list(range(n))


@pytest.mark.parametrize(("warmup", "repeat"), [(0, 1), (2, 5)])
def test_repeat_windows_count(warmup: int, repeat: int) -> None:
    rig = Rig()
    m = rig.run(warmup=warmup, repeat=repeat)
    assert len(m.repetitions) == repeat
    assert [r.index for r in m.repetitions] == list(range(repeat))
    assert m.warmup == warmup
    assert rig.gpu.windows == repeat
    assert rig.events.count("generate:2") == warmup + repeat  # one last batch per workload run
    assert rig.events[: 3 * warmup] == BATCHES * warmup


def test_repetition_record_by_hand() -> None:
    rig = Rig()
    m = rig.run(warmup=1, repeat=3)
    rep = m.repetitions[1]
    # window: 3 batches * (0.125 + 4 * 0.03125 = 0.25 s) + final synchronize 0.0625 = 0.8125 s;
    # the synchronize before the meters start is outside the window
    assert rep.duration_s == 0.8125
    assert rep.rounds == 1
    assert (rep.requests, rep.input_tokens, rep.output_tokens) == (10, 55, 50)  # 55 = 1+..+10
    assert rep.gpu_energy_j == pytest.approx(162.5)  # 200 W * 0.8125 s
    assert rep.cpu_energy_j == pytest.approx(40.625)  # 50 W * 0.8125 s
    assert rep.dram_energy_j is None
    assert rep.energy_j == pytest.approx(203.125)  # 162.5 + 40.625, dram not covered
    assert rep.energy_sources == {"gpu": "measured", "cpu": "estimated"}
    assert rep.energy_notes == [
        "dram: not measured (cc: no DRAM counter)",
        "dynamic: no idle baseline (disabled with --llem-baseline-s=0, or no meter)",
    ]
    assert (rep.peak_memory_mb, rep.peak_memory_kind) == (512.0, "process_rss")
    v = rep.values
    assert v["avg_power_w"] == pytest.approx(250.0)  # 203.125 J / 0.8125 s
    assert v["energy_per_output_token_j"] == pytest.approx(4.0625)  # 203.125 / 50
    assert v["energy_per_request_j"] == pytest.approx(20.3125)  # 203.125 / 10
    assert v["output_tokens_per_j"] == pytest.approx(50 / 203.125)  # 0.24615
    assert v["output_tokens_per_s"] == pytest.approx(50 / 0.8125)  # 61.538
    assert v["total_tokens_per_s"] == pytest.approx(105 / 0.8125)  # (55 + 50) / 0.8125 = 129.23
    assert v["requests_per_s"] == pytest.approx(10 / 0.8125)  # 12.308
    assert v["ttft_ms.p50"] == pytest.approx(125.0)  # prefill, from the batch's issue time
    assert v["e2e_ms.p99"] == pytest.approx(250.0)  # 125 + 4 * 31.25
    assert v["tpot_ms.mean"] == pytest.approx(31.25)  # (250 - 125) / (5 - 1)
    assert v["itl_ms.max"] == pytest.approx(31.25)
    assert v["flops_estimate"] == pytest.approx(210_000.0)  # 2 * 1000 * (55 + 50)
    assert v["peak_memory_mb"] == 512.0


def test_case_summaries() -> None:
    m = Rig().run(warmup=1, repeat=3)
    energy = m.metrics["energy_j"]
    assert energy.n == 3
    assert energy.median == pytest.approx(203.125)  # every window measured 203.125 J
    assert energy.stdev == 0.0
    assert energy.ci95_low == pytest.approx(203.125)
    assert energy.ci95_high == pytest.approx(203.125)
    assert energy.unit == "J"
    assert energy.source == "estimated"  # cpu came from an estimating meter
    assert m.metrics["gpu_energy_j"].source == "measured"
    assert m.metrics["cpu_energy_j"].source == "estimated"
    dram = m.metrics["dram_energy_j"]
    assert dram.n == 0
    assert dram.median is None
    assert dram.note == "dram: not measured (cc: no DRAM counter)"
    assert m.metrics["output_tokens_per_s"].unit == "tokens/s"
    assert m.metrics["output_tokens_per_s"].source == "measured"
    flops = m.metrics["flops_estimate"]
    assert (flops.source, flops.note, flops.unit) == ("estimated", FLOPS_METHOD, "FLOP")
    assert m.metrics["ttft_ms.p99"].median == pytest.approx(125.0)
    # latencies pooled over the 3 measured windows only: 10 requests each, 4 gaps per request
    assert m.latency["ttft_ms"].n == 30
    assert m.latency["e2e_ms"].n == 30
    assert m.latency["tpot_ms"].n == 30
    assert m.latency["itl_ms"].n == 120  # 30 * (5 - 1)
    assert m.latency["itl_ms"].p50 == pytest.approx(31.25)
    assert m.latency["e2e_ms"].p99 == pytest.approx(250.0)
    assert len(m.latencies) == 30
    assert m.notes == [
        "dram: not measured (cc: no DRAM counter)",
        "dynamic: no idle baseline (disabled with --llem-baseline-s=0, or no meter)",
        f"flops_estimate: {FLOPS_METHOD}",
    ]


def test_fewer_than_three_repetitions_has_no_interval() -> None:
    m = Rig().run(warmup=0, repeat=2)
    energy = m.metrics["energy_j"]
    assert energy.n == 2
    assert energy.ci95_low is None
    assert energy.note == FEWER_THAN_3_NOTE


def test_no_meter_gives_none_never_zero() -> None:
    rig = Rig()
    m = rig.run(meters=[], warmup=0, repeat=3)
    rep = m.repetitions[0]
    assert rep.energy_j is None
    assert rep.values["energy_per_output_token_j"] is None
    assert rep.values["avg_power_w"] is None
    summary = m.metrics["energy_per_output_token_j"]
    assert summary.n == 0
    assert summary.median is None
    assert summary.note is not None
    assert summary.note.startswith("no energy domain measured: gpu: not measured")
    assert m.metrics["output_tokens_per_s"].median == pytest.approx(50 / 0.8125)
    assert m.notes[0] == "no energy meter: energy figures are not measured"


def test_rapl_like_meter_without_dram() -> None:
    rig = Rig()
    rapl = no_dram_meter(rig.clock, rig.events, cpu_w=40.0)
    m = rig.run(meters=[rapl], warmup=0, repeat=1)
    rep = m.repetitions[0]
    assert rep.cpu_energy_j == pytest.approx(32.5)  # 40 W * 0.8125 s
    assert rep.energy_j == pytest.approx(32.5)  # gpu and dram uncovered
    assert rep.values["gpu_energy_j"] is None
    assert rep.energy_sources == {"cpu": "measured"}
    assert m.metrics["energy_j"].source == "measured"


def test_meter_stop_failure_stops_every_meter_and_reraises() -> None:
    rig = Rig()
    rig.cc.fail_on = ("stop", 2)
    with pytest.raises(EnergyMeterError, match="scripted stop failure"):
        rig.run(warmup=0, repeat=3)
    assert not rig.gpu.running
    assert not rig.cc.running
    # window 2 still stopped gpu-fake after cc failed; no window 3 was opened
    assert rig.events[-3:] == ["synchronize", "stop:cc", "stop:gpu-fake"]
    assert rig.gpu.windows == 2


def test_meter_start_failure_stops_started_meters_and_runs_nothing() -> None:
    rig = Rig()
    rig.cc.fail_on = ("start", 1)
    with pytest.raises(EnergyMeterError, match="scripted start failure"):
        rig.run(warmup=0, repeat=3)
    assert rig.events == [
        "reset_peak_memory", "synchronize", "start:gpu-fake", "start:cc", "stop:gpu-fake",
    ]  # fmt: skip
    assert not rig.gpu.running
    assert not rig.cc.running


def test_backend_failure_inside_window_stops_meters() -> None:
    rig = Rig(fail_on_call=2)
    with pytest.raises(InferenceError, match="scripted failure"):
        rig.run(warmup=0, repeat=1)
    assert rig.events[-3:] == ["generate:4", "stop:cc", "stop:gpu-fake"]
    assert not rig.gpu.running
    assert not rig.cc.running


def test_measure_window_with_rounds() -> None:
    rig = Rig()
    case = CaseConfig.model_validate({"batch_size": 4, "max_new_tokens": 5})
    requests = [Request(i, p) for i, p in enumerate(PROMPTS)]
    workload = build_workload(
        "offline",
        backend=rig.backend,
        requests=requests,
        params=GenerateParams.from_case(case),
        config=case,
    )
    window = measure_window(
        backend=rig.backend, meters=[rig.gpu], workload=workload, clock=rig.clock, rounds=2
    )
    assert window.duration_s == 1.5625  # 2 rounds * 0.75 s + final synchronize 0.0625 s
    assert len(window.generations) == 20
    assert window.rounds == 2
    assert window.readings[0].domains["gpu"].energy_j == pytest.approx(312.5)  # 200 W * 1.5625
    assert rig.events.count("synchronize") == 2


def test_no_prompts_and_unknown_scenario_are_configuration_errors() -> None:
    rig = Rig()
    case = CaseConfig.model_validate({})
    with pytest.raises(ConfigurationError, match="at least one prompt"):
        run_case(backend=rig.backend, meters=[], config=case, prompts=[], clock=rig.clock)
    with pytest.raises(ConfigurationError, match="unknown scenario 'batch'"):
        run_case(
            backend=rig.backend,
            meters=[],
            config=case,
            prompts=PROMPTS,
            clock=rig.clock,
            scenario="batch",
        )


def test_fake_backend_chunks_and_callback() -> None:
    clock = FakeClock(0.0)
    backend = FakeBackend(clock, chunk=2)
    seen: list[tuple[int, int, float]] = []
    params = GenerateParams(max_new_tokens=5)
    (g,) = backend.generate(
        [Request(3, "two words")], params=params, on_token=lambda i, t, s: seen.append((i, t, s))
    )
    # token i is produced at 0.125 + i * 0.03125 and delivered with the last of its chunk of 2
    assert g.token_times == [0.15625, 0.15625, 0.21875, 0.21875, 0.25]
    assert g.input_tokens == 2
    assert g.output_token_ids == [3000, 3001, 3002, 3003, 3004]
    assert clock() == 0.25
    assert [s for _, _, s in seen] == g.token_times

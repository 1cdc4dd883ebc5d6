"""Load scenarios on a fake backend with scripted timings: every figure worked out by hand.

The fake backend takes 0.125 s to a batch's first token and 0.03125 s per further token; with
max_new_tokens=3 a batch takes 0.1875 s. synchronize takes 0.0625 s. All exact in binary.
"""

from __future__ import annotations

import numpy as np
import pytest

from pytest_llem.config.models import CaseConfig, TrafficConfig
from pytest_llem.exceptions import ConfigurationError
from pytest_llem.harness.runner import WindowPolicy, run_case
from pytest_llem.harness.traffic import arrival_offsets
from tests.fakes.fake_backend import FakeBackend, FakeClock
from tests.fakes.fake_meter import FakeMeter

PROMPTS = ["one two three"] * 8


def _run(policy: WindowPolicy | None = None, **config: object):
    clock = FakeClock()
    backend = FakeBackend(clock, sync_s=0.0625)
    meter = FakeMeter("gpu", clock, power_w={"gpu": 200.0})
    case = CaseConfig.model_validate(
        {"max_new_tokens": 3, "min_new_tokens": 3, "warmup": 0, "repeat": 1, **config}
    )
    measured = run_case(
        backend=backend,
        meters=[meter],
        config=case,
        prompts=PROMPTS,
        clock=clock,
        sleep=clock.advance,
        policy=policy,
    )
    return measured, backend


# -- arrival schedules ------------------------------------------------------------------------


def test_poisson_schedule_has_the_rate_and_exponential_dispersion():
    gaps = np.diff(arrival_offsets(TrafficConfig(rate=8.0, seed=1), count=20_000))
    assert gaps.mean() == pytest.approx(1 / 8, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)  # CV of an exponential


def test_gamma_burstiness_sets_the_dispersion():
    traffic = TrafficConfig(arrival="gamma", rate=8.0, burstiness=0.25, seed=3)
    gaps = np.diff(arrival_offsets(traffic, count=20_000))
    assert gaps.mean() == pytest.approx(1 / 8, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(2.0, rel=0.08)  # CV = 1/sqrt(shape)


def test_constant_schedule_and_duration_mode():
    assert arrival_offsets(TrafficConfig(arrival="constant", rate=4.0), count=4) == [
        0.0,
        0.25,
        0.5,
        0.75,
    ]
    offsets = arrival_offsets(
        TrafficConfig(arrival="constant", rate=4.0, duration_s=1.0), count=None
    )
    assert offsets == [0.0, 0.25, 0.5, 0.75]  # every arrival before 1 s


def test_schedules_are_reproducible_by_seed():
    a = arrival_offsets(TrafficConfig(rate=5.0, seed=7), count=50)
    assert a == arrival_offsets(TrafficConfig(rate=5.0, seed=7), count=50)
    assert a != arrival_offsets(TrafficConfig(rate=5.0, seed=8), count=50)
    assert a[0] == 0.0
    assert a == sorted(a)


def test_poisson_with_other_burstiness_is_rejected():
    with pytest.raises(ValueError, match="arrival=gamma"):
        CaseConfig.model_validate({"traffic": {"arrival": "poisson", "burstiness": 2.0}})


# -- the server scenario ----------------------------------------------------------------------


def test_server_keeping_up_has_no_queueing():
    # arrivals every 0.25 s; each request is served alone in 0.1875 s, before the next arrives
    measured, backend = _run(
        scenario="server",
        batch_size=4,
        traffic={"arrival": "constant", "rate": 4.0, "num_requests": 4},
    )
    assert backend.batches == [[0], [1], [2], [3]]
    values = measured.repetitions[0].values
    assert values["ttft_ms.p50"] == pytest.approx(125.0)  # prefill only
    assert values["e2e_ms.max"] == pytest.approx(187.5)  # 125 + 2 * 31.25
    assert values["tpot_ms.mean"] == pytest.approx(31.25)
    assert values["queue_wait_ms.mean"] == pytest.approx(0.0)
    server = measured.repetitions[0].server
    assert server is not None
    assert server.saturated is False
    assert server.achieved_rate_rps == pytest.approx(4.0)  # 3 gaps of 0.25 s
    assert server.peak_concurrency == 1


def test_server_overloaded_queues_and_is_flagged_saturated():
    # arrivals every 0.0625 s (16/s), one at a time (batch 1), service 0.1875 s:
    # request k is issued at k * 0.1875 and waits k * 0.125 s
    measured, _ = _run(
        scenario="server",
        batch_size=1,
        traffic={"arrival": "constant", "rate": 16.0, "num_requests": 8},
        slo={"ttft_ms": 300.0},
    )
    rep = measured.repetitions[0]
    values = rep.values
    # ttft_k = 125 + 125 k ms: 125, 250, ..., 1000
    assert values["ttft_ms.max"] == pytest.approx(1000.0)
    assert values["e2e_ms.max"] == pytest.approx(1062.5)  # 875 ms wait + 187.5 ms service
    assert values["queue_wait_ms.mean"] == pytest.approx(437.5)  # 125 * mean(0..7)
    # window: last finish at 8 * 0.1875 = 1.5 s, plus the final synchronize (0.0625 s)
    assert rep.duration_s == pytest.approx(1.5625)
    # good requests (ttft <= 300 ms): k = 0, 1
    assert values["slo_met_fraction"] == pytest.approx(2 / 8)
    assert values["slo_ttft_ms_met_fraction"] == pytest.approx(2 / 8)
    assert values["goodput_rps"] == pytest.approx(2 / 1.5625)
    assert values["energy_per_good_request_j"] == pytest.approx(200.0 * 1.5625 / 2)
    server = rep.server
    assert server is not None
    assert server.target_rate_rps == 16.0
    assert server.achieved_rate_rps == pytest.approx(7 / (7 * 0.1875))  # 5.33 requests/s
    # in flight: sum of e2e (8 * 0.1875 + 0.125 * 28 = 5.0 s) over 1.5 s
    assert server.mean_concurrency == pytest.approx(5.0 / 1.5)
    assert server.peak_concurrency == 6  # at 0.4375 s: 8 arrived, 2 finished
    assert server.saturated is True
    assert "queue kept growing" in (server.saturation_reason or "")
    assert any("saturated in 1 of 1" in note for note in measured.notes)


def test_max_concurrency_binding_is_reported():
    measured, backend = _run(
        scenario="server",
        batch_size=4,
        traffic={"arrival": "constant", "rate": 16.0, "num_requests": 8, "max_concurrency": 1},
    )
    assert all(len(batch) == 1 for batch in backend.batches)
    server = measured.repetitions[0].server
    assert server is not None
    assert server.concurrency_bound_share > 0.5
    assert "max_concurrency=1 was the binding limit" in (server.saturation_reason or "")


def test_server_batches_whatever_has_arrived():
    # arrivals every 0.0625 s, batch up to 4: first batch [0]; by 0.1875 s requests 1-3 wait
    _, backend = _run(
        scenario="server",
        batch_size=4,
        traffic={"arrival": "constant", "rate": 16.0, "num_requests": 8},
    )
    assert backend.batches[:2] == [[0], [1, 2, 3]]
    assert sum(len(b) for b in backend.batches) == 8


def test_server_request_count_cycles_prompts():
    measured, backend = _run(
        scenario="server",
        batch_size=8,
        traffic={"arrival": "constant", "rate": 1000.0, "num_requests": 20},
    )
    assert measured.repetitions[0].requests == 20
    assert sorted(i for b in backend.batches for i in b) == list(range(20))


# -- single stream and offline report the same names -----------------------------------------


def test_single_stream_one_at_a_time():
    measured, backend = _run(scenario="single_stream", batch_size=1)
    assert backend.batches == [[i] for i in range(8)]
    assert measured.repetitions[0].values["ttft_ms.p50"] == pytest.approx(125.0)
    assert measured.repetitions[0].server is None


def test_single_stream_with_a_batch_is_invalid():
    with pytest.raises(ValueError, match="single_stream"):
        CaseConfig.model_validate({"scenario": "single_stream", "batch_size": 4})


def test_every_scenario_reports_the_same_latency_names():
    names = {}
    for scenario, extra in (
        ("offline", {"batch_size": 4}),
        ("single_stream", {}),
        ("server", {"traffic": {"rate": 100.0, "num_requests": 8}}),
    ):
        measured, _ = _run(scenario=scenario, **extra)
        names[scenario] = {n for n in measured.metrics if n.split(".")[0].endswith("_ms")}
    assert names["offline"] == names["single_stream"]
    assert names["offline"] <= names["server"]
    assert {"ttft_ms.p99", "tpot_ms.p50", "itl_ms.p50", "e2e_ms.p99"} <= names["offline"]


def test_no_slo_no_goodput():
    measured, _ = _run(scenario="offline", batch_size=8)
    assert "goodput_rps" not in measured.metrics


def test_server_needs_requests():
    with pytest.raises(ConfigurationError, match="at least one request"):
        arrival_offsets(TrafficConfig(), count=0)


STEADY_TRAFFIC = {
    "arrival": "constant",
    "rate": 16.0,
    "num_requests": 8,
    "steady_state": True,
    "ramp_up_fraction": 0.25,
}


def test_steady_state_excludes_ramp_up_and_drain():
    # 8 requests every 0.0625 s, one at a time, ramp-up 25 %: the steady state runs from the
    # issue of request 2 (2 * 0.1875 = 0.375 s) to the issue of request 7 (1.3125 s)
    measured, _ = _run(scenario="server", batch_size=1, traffic=STEADY_TRAFFIC)
    values = measured.repetitions[0].values
    assert values["steady_state.duration_s"] == pytest.approx(0.9375)
    assert values["steady_state.energy_j"] == pytest.approx(200.0 * 0.9375)  # read mid-window
    # tokens finished in (0.375, 1.3125]: all 3 of requests 2..6
    assert values["steady_state.output_tokens"] == 15
    assert values["steady_state.energy_per_output_token_j"] == pytest.approx(187.5 / 15)
    assert values["steady_state.output_tokens_per_s"] == pytest.approx(15 / 0.9375)
    assert values["steady_state.requests"] == 6  # requests 2..7
    assert values["steady_state.ttft_ms.mean"] == pytest.approx(687.5)  # mean of 375..1000
    # the whole run is still reported beside it
    assert values["energy_j"] == pytest.approx(200.0 * 1.5625)
    assert measured.metrics["steady_state.energy_j"].unit == "J"


def test_steady_state_is_per_round_when_the_window_repeats_the_workload():
    # A 3 s target makes the window hold 3 rounds (ceil(1.2 * 3 / 1.5625)); each round has its
    # own steady span, identical to the single round above, so the per-round figures are too.
    measured, _ = _run(
        WindowPolicy(target_s=3.0), scenario="server", batch_size=1, traffic=STEADY_TRAFFIC
    )
    rep = measured.repetitions[0]
    assert rep.rounds == 3
    values = rep.values
    assert values["requests"] == 8  # per round
    assert values["steady_state.requests"] == 6  # requests 2..7 of each round, per round
    assert values["steady_state.duration_s"] == pytest.approx(0.9375)
    assert values["steady_state.output_tokens"] == 15
    assert values["steady_state.energy_j"] == pytest.approx(187.5)
    assert values["steady_state.avg_power_w"] == pytest.approx(200.0)
    assert values["steady_state.energy_per_output_token_j"] == pytest.approx(187.5 / 15)
    assert values["steady_state.output_tokens_per_s"] == pytest.approx(16.0)
    # latency statistics pool every round's steady requests, like the whole window's
    assert values["steady_state.ttft_ms.mean"] == pytest.approx(687.5)


def test_steady_span_shorter_than_the_meter_floor_has_no_energy():
    # The whole window (1.5625 s) clears a 1 s floor; its 0.9375 s steady span does not.
    policy = WindowPolicy(target_s=0.0, floor_s=1.0, update_period_s=0.05)
    measured, _ = _run(policy, scenario="server", batch_size=1, traffic=STEADY_TRAFFIC)
    values = measured.repetitions[0].values
    assert values["energy_j"] == pytest.approx(200.0 * 1.5625)
    for name in ("energy_j", "avg_power_w", "energy_per_output_token_j"):
        assert values[f"steady_state.{name}"] is None, name
    assert values["steady_state.duration_s"] == pytest.approx(0.9375)  # time figures stay
    note = measured.metrics["steady_state.energy_j"].note or ""
    assert "steady span of 0.938 s per round is shorter than 20 x the meter's 0.05 s" in note
    # just above the floor it is measured again
    policy = WindowPolicy(target_s=0.0, floor_s=0.9, update_period_s=0.045)
    measured, _ = _run(policy, scenario="server", batch_size=1, traffic=STEADY_TRAFFIC)
    assert measured.repetitions[0].values["steady_state.energy_j"] == pytest.approx(187.5)


def test_steady_state_without_a_mid_window_reading_says_why():
    clock = FakeClock()
    backend = FakeBackend(clock)

    class NoLap:
        name = "nolap"

        def __init__(self) -> None:
            self.inner = FakeMeter("nolap", clock, power_w={"gpu": 100.0})

        def info(self):
            return self.inner.info()

        def start(self) -> None:
            self.inner.start()

        def stop(self):
            return self.inner.stop()

        def close(self) -> None:
            self.inner.close()

    case = CaseConfig.model_validate(
        {
            "scenario": "server",
            "max_new_tokens": 3,
            "warmup": 0,
            "repeat": 1,
            "traffic": {"rate": 16.0, "num_requests": 8, "steady_state": True},
        }
    )
    measured = run_case(
        backend=backend,
        meters=[NoLap()],
        config=case,
        prompts=PROMPTS,
        clock=clock,
        sleep=clock.advance,
    )
    summary = measured.metrics["steady_state.energy_j"]
    assert summary.median is None
    assert "cannot read energy mid-window" in (summary.note or "")
    assert measured.metrics["steady_state.ttft_ms.p50"].median is not None


# -- an engine with its own scheduler (real clock) ---------------------------------------------


def _submitting(**traffic: object):
    from tests.fakes.fake_backend import SchedulingFakeBackend

    backend = SchedulingFakeBackend(prefill_s=0.05, step_s=0.01)
    case = CaseConfig.model_validate(
        {
            "scenario": "server",
            "max_new_tokens": 3,
            "warmup": 0,
            "repeat": 1,
            "traffic": {"arrival": "constant", "rate": 50.0, "num_requests": 10, **traffic},
        }
    )
    return run_case(backend=backend, meters=[], config=case, prompts=PROMPTS), backend


def test_scheduling_engine_gets_each_request_at_its_arrival():
    # arrivals every 20 ms, each request takes ~70 ms: the engine runs several at once
    measured, backend = _submitting()
    assert backend.submitted == list(range(10))
    assert backend.peak_running >= 2
    values = measured.repetitions[0].values
    assert values["ttft_ms.p50"] < 100  # ~50 ms of prefill, no queueing in front of it
    assert values["queue_wait_ms.mean"] < 10
    server = measured.repetitions[0].server
    assert server is not None
    assert server.peak_concurrency >= 2
    assert not server.saturated


def test_scheduling_engine_respects_max_concurrency():
    measured, backend = _submitting(max_concurrency=1)
    assert backend.peak_running == 1
    server = measured.repetitions[0].server
    assert server is not None
    assert server.concurrency_bound_share > 0.5
    assert server.saturated
    # requests now queue behind each other: the last one waits for most of the others
    assert measured.repetitions[0].values["ttft_ms.max"] > 300

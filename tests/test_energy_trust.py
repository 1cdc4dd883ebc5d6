"""Short-window extension, the idle baseline and dynamic energy, combined meters and cooldown,
on the fake backend, fake meters and a fake clock (exact binary fractions, hand-computed)."""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from pytest_llem.config.models import CaseConfig
from pytest_llem.exceptions import EnergyMeterError
from pytest_llem.harness.baseline import (
    idle_power,
    load_cached_baseline,
    measure_baseline,
    store_baseline,
)
from pytest_llem.harness.deadline import CaseTimeoutError
from pytest_llem.harness.runner import QUANTISATION_PERIODS, WindowPolicy, run_case
from pytest_llem.harness.thermal import COOLDOWN_MARGIN_C, cool_down, measured_hot
from pytest_llem.meters.base import DeviceState, DomainReading, EnergyReading, reading_between
from pytest_llem.meters.registry import DomainAssignment
from pytest_llem.options import EnergyOptions
from pytest_llem.results.models import (
    BaselineDomain,
    BaselineRecord,
    DeviceStateRecord,
    RepetitionRecord,
)
from pytest_llem.session import BaselineState, meter_record
from tests.fakes.fake_backend import FakeBackend, FakeClock
from tests.fakes.fake_meter import FakeMeter

PROMPTS = [" ".join(["word"] * (i + 1)) for i in range(10)]
# One round: 3 batches x (0.125 + 4 x 0.03125) = 0.75 s; a window adds the final 0.0625 s sync.
ROUND_S = 0.75
SYNC_S = 0.0625


def _rig() -> tuple[FakeClock, FakeBackend, FakeMeter, FakeMeter]:
    clock = FakeClock()
    backend = FakeBackend(clock, [], sync_s=SYNC_S)
    gpu = FakeMeter("gpu-fake", clock, power_w={"gpu": 200.0})
    cpu = FakeMeter("cpu-fake", clock, power_w={"cpu": 50.0})
    return clock, backend, gpu, cpu


def _run(policy: WindowPolicy, *, warmup: int, repeat: int = 1, **kwargs: object):  # type: ignore[no-untyped-def]
    clock, backend, gpu, cpu = _rig()
    case = CaseConfig.model_validate(
        {"batch_size": 4, "max_new_tokens": 5, "warmup": warmup, "repeat": repeat}
    )
    return run_case(
        backend=backend,
        meters=[gpu, cpu],
        config=case,
        prompts=PROMPTS,
        clock=clock,
        policy=policy,
        **kwargs,  # type: ignore[arg-type]
    )


def test_policy_is_twenty_update_periods_or_the_minimum() -> None:
    policy = WindowPolicy.for_meters(min_window_s=1.0, update_periods=[0.1, None, 0.001])
    assert policy.target_s == pytest.approx(QUANTISATION_PERIODS * 0.1)  # 2 s beats 1 s
    assert policy.floor_s == pytest.approx(2.0)
    assert WindowPolicy.for_meters(min_window_s=3.0, update_periods=[0.1]).target_s == 3.0
    assert WindowPolicy.for_meters(min_window_s=0.5, update_periods=[None]).floor_s == 0.0


def test_warmup_sizes_the_rounds() -> None:
    # warmup took 0.75 s per round; target 2 s with 20% headroom: ceil(2.4 / 0.75) = 4 rounds
    m = _run(WindowPolicy(target_s=2.0), warmup=1)
    rep = m.repetitions[0]
    assert rep.rounds == 4
    assert rep.duration_s == 4 * ROUND_S + SYNC_S  # 3.0625 s, one window
    assert rep.requests == 40
    assert rep.values["requests"] == 10  # per round
    assert rep.values["duration_s"] == pytest.approx(3.0625 / 4)
    assert rep.values["gpu_energy_j"] == pytest.approx(200.0 * 3.0625 / 4)
    assert rep.values["avg_power_w"] == pytest.approx(250.0)  # rates unchanged by rounds
    assert any("ran 4 times per window" in note for note in m.notes)


def test_short_window_is_measured_again_with_more_rounds() -> None:
    # no warmup: the first window (0.8125 s) is too short; ceil(2.4 / 0.8125) = 3 rounds
    m = _run(WindowPolicy(target_s=2.0), warmup=0, repeat=2)
    assert [rep.rounds for rep in m.repetitions] == [3, 3]
    assert all(rep.duration_s >= 2.0 for rep in m.repetitions)
    assert m.repetitions[0].duration_s == 3 * ROUND_S + SYNC_S


def test_no_policy_means_one_round() -> None:
    m = _run(WindowPolicy(), warmup=1)
    assert m.repetitions[0].rounds == 1
    assert not any("per window" in note for note in m.notes)


def test_window_shorter_than_the_meter_resolves_has_no_energy() -> None:
    # target already met, but 20 update periods (5 s) are longer than the window
    m = _run(WindowPolicy(target_s=0.5, floor_s=5.0, update_period_s=0.25), warmup=0)
    rep = m.repetitions[0]
    assert rep.energy_j is None
    assert rep.gpu_energy_j is None
    assert rep.values["energy_per_output_token_j"] is None
    assert any("shorter than 20 x the meter's 0.25 s update period" in n for n in rep.energy_notes)
    summary = m.metrics["energy_j"]
    assert summary.median is None
    assert "shorter than" in (summary.note or "")
    assert m.metrics["output_tokens_per_s"].median is not None  # time figures stay


def _baseline(gpu_w: float = 120.0, cpu_w: float = 30.0) -> BaselineRecord:
    def domain(watts: float, meter: str) -> BaselineDomain:
        return BaselineDomain(
            idle_power_w=watts, seconds=5.0, windows=5, source="measured", meter=meter
        )

    return BaselineRecord(
        domains={"gpu": domain(gpu_w, "gpu-fake"), "cpu": domain(cpu_w, "cpu-fake")},
        taken_at=datetime.now(timezone.utc),
        seconds=5.0,
        cached=False,
        idle_temperature_c={"gpu0": 35.0},
    )


def test_dynamic_energy_against_the_baseline() -> None:
    m = _run(WindowPolicy(), warmup=0, repeat=3, baseline=_baseline())
    rep = m.repetitions[0]
    duration = ROUND_S + SYNC_S  # 0.8125 s
    # (200 + 50) W measured, (120 + 30) W idle: dynamic = 100 W x 0.8125 s = 81.25 J
    assert rep.values["idle_power_w"] == 150.0
    assert rep.values["dynamic_energy_j"] == pytest.approx(100.0 * duration)
    assert rep.values["dynamic_energy_per_output_token_j"] == pytest.approx(81.25 / 50)
    assert not rep.dynamic_energy_negative
    summary = m.metrics["dynamic_energy_per_output_token_j"]
    assert summary.unit == "J/token"
    assert summary.source == "measured"
    assert summary.median == pytest.approx(1.625)


def test_negative_dynamic_energy_is_reported_and_flagged() -> None:
    m = _run(WindowPolicy(), warmup=0, baseline=_baseline(gpu_w=300.0))
    rep = m.repetitions[0]
    assert rep.values["dynamic_energy_j"] == pytest.approx(-80.0 * (ROUND_S + SYNC_S))
    assert rep.dynamic_energy_negative
    assert any("reported unclamped" in note for note in m.notes)


def test_a_domain_without_baseline_gives_no_dynamic_energy() -> None:
    baseline = _baseline()
    del baseline.domains["cpu"]
    m = _run(WindowPolicy(), warmup=0, baseline=baseline)
    assert m.repetitions[0].values["dynamic_energy_j"] is None
    assert m.metrics["dynamic_energy_j"].note == "no idle baseline for cpu"
    assert idle_power(None, ["gpu"])[0] is None


def test_assignment_takes_a_domain_from_one_meter_only() -> None:
    clock, backend, gpu, _ = _rig()
    estimate = FakeMeter(
        "cc", clock, power_w={"gpu": 999.0, "cpu": 40.0}, sources={"cpu": "estimated"}
    )
    case = CaseConfig.model_validate({"batch_size": 4, "max_new_tokens": 5, "warmup": 0})
    m = run_case(
        backend=backend,
        meters=[estimate, gpu],
        config=case,
        prompts=PROMPTS,
        clock=clock,
        assignment={"gpu": "gpu-fake", "cpu": "cc"},
    )
    rep = m.repetitions[0]
    assert rep.gpu_energy_j == pytest.approx(200.0 * (ROUND_S + SYNC_S))  # not 999 W, not both
    assert rep.energy_sources == {"gpu": "measured", "cpu": "estimated"}


def test_baseline_measures_each_domain_with_its_spread() -> None:
    clock = FakeClock()
    gpu = FakeMeter("gpu-fake", clock, power_w={"gpu": 70.0})
    cpu = FakeMeter("cpu-fake", clock, power_w={"cpu": 20.0}, missing={"dram": "no counter"})
    record = measure_baseline(
        [gpu, cpu],
        seconds=5.0,
        assignment={"gpu": "gpu-fake", "cpu": "cpu-fake", "dram": "cpu-fake"},
        sleep=clock.advance,
    )
    assert record.domains["gpu"].idle_power_w == pytest.approx(70.0)
    assert record.domains["gpu"].seconds == pytest.approx(5.0)
    assert record.domains["gpu"].windows == 5
    assert record.domains["gpu"].stdev_w == pytest.approx(0.0)
    assert record.domains["cpu"].idle_power_w == pytest.approx(20.0)
    assert "dram" not in record.domains
    assert record.notes == ["dram: no idle power (cpu-fake: no counter)"]
    assert gpu.windows == 1  # one window read at five laps: no edges between sub-windows


class _NoLap(FakeMeter):
    lap = None  # type: ignore[assignment]


def test_baseline_uses_separate_windows_for_meters_without_laps() -> None:
    clock = FakeClock()
    meter = _NoLap("estimate", clock, power_w={"cpu": 40.0}, sources={"cpu": "estimated"})
    record = measure_baseline(
        [meter], seconds=2.0, assignment={"cpu": "estimate"}, sleep=clock.advance
    )
    assert meter.windows == 5
    assert record.domains["cpu"].idle_power_w == pytest.approx(40.0)
    assert record.domains["cpu"].source == "estimated"
    assert record.domains["cpu"].windows == 5


def test_baseline_cache_expires(tmp_path: Path) -> None:
    path = tmp_path / "baselines" / "key.json"
    record = _baseline()
    store_baseline(path, record)
    cached = load_cached_baseline(path)
    assert cached is not None
    assert cached.cached
    assert cached.domains["gpu"].idle_power_w == 120.0
    later = record.taken_at + timedelta(hours=2)
    assert load_cached_baseline(path, now=later) is None
    path.write_text("{broken", encoding="utf-8")
    assert load_cached_baseline(path) is None


class _Warm:
    """A meter whose device cools by 2 C per poll, reporting its temperature."""

    name = "thermo"

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature

    def device_states(self) -> dict[str, DeviceState]:
        self.temperature -= 2.0
        return {"gpu0": DeviceState(temperature_c=self.temperature)}


def test_cooldown_waits_until_near_idle_temperature() -> None:
    clock = FakeClock()
    meter = _Warm(52.0)
    record = cool_down(
        [meter],  # type: ignore[list-item]
        mode="temperature",
        idle_temperatures={"gpu0": 35.0},
        sleep=clock.advance,
        clock=clock,
    )
    assert record is not None
    assert record.reached
    assert record.start_temperature_c == 50.0
    assert record.end_temperature_c is not None
    assert record.end_temperature_c <= 35.0 + COOLDOWN_MARGIN_C
    assert record.waited_s > 0


def test_cooldown_is_bounded_and_says_so() -> None:
    clock = FakeClock()
    record = cool_down(
        [_Warm(500.0)],  # type: ignore[list-item]
        mode="temperature",
        idle_temperatures={"gpu0": 35.0},
        sleep=clock.advance,
        clock=clock,
        max_wait_s=3.0,
    )
    assert record is not None
    assert not record.reached
    assert record.waited_s == pytest.approx(3.0)
    assert "measured warm" in (record.note or "")


def test_cooldown_without_temperatures_is_not_applied() -> None:
    record = cool_down([], mode="temperature", idle_temperatures={})
    assert record is not None
    assert not record.reached
    assert "not applied" in (record.note or "")
    assert cool_down([], mode="off", idle_temperatures={}) is None


def test_measured_hot_compares_window_start_with_idle() -> None:
    def rep(temperature: float) -> RepetitionRecord:
        return RepetitionRecord(
            index=0,
            duration_s=1.0,
            requests=1,
            input_tokens=1,
            output_tokens=1,
            device_states={"start": {"gpu0": DeviceStateRecord(temperature_c=temperature)}},
        )

    assert measured_hot([rep(41.0)], {"gpu0": 35.0})
    assert not measured_hot([rep(39.0)], {"gpu0": 35.0})
    assert not measured_hot([rep(80.0)], {})
    assert math.isclose(COOLDOWN_MARGIN_C, 3.0)


def _lap(seconds: float, **domains: DomainReading) -> EnergyReading:
    return EnergyReading(meter="m", duration_s=seconds, domains=dict(domains))


def test_a_counter_that_did_not_advance_between_laps_is_not_measured() -> None:
    first = _lap(1.0, gpu=DomainReading("gpu", 50.0, "measured"))
    same = _lap(1.25, gpu=DomainReading("gpu", 50.0, "measured"))
    later = _lap(2.0, gpu=DomainReading("gpu", 80.0, "measured"))
    still = reading_between(first, same).domains["gpu"]
    assert still.energy_j is None  # never 0 J
    assert "did not advance" in (still.reason or "")
    assert "0.250 s" in (still.reason or "")
    moved = reading_between(first, later)
    assert moved.duration_s == pytest.approx(1.0)
    assert moved.domains["gpu"].energy_j == pytest.approx(30.0)


def _gpus(total: float | None, **devices: float) -> DomainReading:
    return DomainReading("gpu", total, "measured", devices=devices)


def test_laps_compare_device_by_device() -> None:
    # gpu1 had not advanced at the first lap (0 J since start, not unknown); at the second
    # both advanced. A device that then stands still makes the domain not measured.
    early = DomainReading(
        "gpu", None, "measured", reason="gpu1 still", devices={"gpu0": 4.0}, not_advanced=("gpu1",)
    )
    first = _lap(0.05, gpu=early)
    second = _lap(1.0, gpu=_gpus(90.0, gpu0=50.0, gpu1=40.0))
    third = _lap(1.05, gpu=_gpus(95.0, gpu0=55.0, gpu1=40.0))
    between = reading_between(first, second).domains["gpu"]
    assert between.energy_j == pytest.approx(86.0)
    assert between.devices == pytest.approx({"gpu0": 46.0, "gpu1": 40.0})
    stuck = reading_between(second, third).domains["gpu"]
    assert stuck.energy_j is None
    assert "gpu1" in (stuck.reason or "")
    assert "did not advance" in (stuck.reason or "")


# The idle baseline's failures and floor ---------------------------------------------------------


def test_baseline_on_a_gpu_without_energy_counter_integrates_power(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pytest_llem.meters.nvml import NvmlMeter
    from tests.fakes.fake_pynvml import FakeGpu, install

    install(monkeypatch, [FakeGpu(power_w=80.0, energy_counter_supported=False)])
    meter = NvmlMeter()
    try:
        record = measure_baseline([meter], seconds=0.5, assignment={"gpu": "nvml"})
    finally:
        meter.close()
    gpu = record.domains["gpu"]
    assert gpu.windows == 5  # separate windows, each of integrated power
    assert gpu.idle_power_w == pytest.approx(80.0, rel=0.2)
    assert record.notes == []


@pytest.mark.parametrize("lapped", [True, False], ids=["lapped", "separate"])
def test_a_meter_failing_at_the_end_of_the_baseline_leaves_no_window_open(lapped: bool) -> None:
    clock = FakeClock()
    kind = FakeMeter if lapped else _NoLap
    gpu = kind("gpu-fake", clock, power_w={"gpu": 70.0})
    cpu = kind("cpu-fake", clock, power_w={"cpu": 20.0}, fail_on=("stop", 1))
    with pytest.raises(EnergyMeterError, match="scripted stop failure"):
        measure_baseline(
            [gpu, cpu],
            seconds=5.0,
            assignment={"gpu": "gpu-fake", "cpu": "cpu-fake"},
            sleep=clock.advance,
        )
    assert not gpu.running
    assert not cpu.running
    backend = FakeBackend(clock, [], sync_s=SYNC_S)
    case = CaseConfig.model_validate({"batch_size": 4, "max_new_tokens": 5, "warmup": 0})
    measured = run_case(
        backend=backend, meters=[gpu, cpu], config=case, prompts=PROMPTS, clock=clock
    )  # later cases are measured: no "window already open"
    assert measured.repetitions[0].gpu_energy_j == pytest.approx(70.0 * (ROUND_S + SYNC_S))


def _baseline_state(
    meters: list[FakeMeter], sleep: Callable[[float], None], seconds: float = 5.0
) -> tuple[BaselineState, Callable[[], BaselineRecord | None]]:
    state = BaselineState(
        EnergyOptions(baseline_s=seconds, baseline_forced=True), lambda _: None, sleep=sleep
    )
    records = [meter_record(m.info()).model_copy(update={"used_for": ["gpu"]}) for m in meters]
    assignment = DomainAssignment(meters={"gpu": meters[0].name})
    return state, lambda: state.get(meters, records, assignment)


def test_a_failed_baseline_says_why_in_every_later_case() -> None:
    clock = FakeClock()
    meter = FakeMeter("gpu-fake", clock, power_w={"gpu": 70.0}, fail_on=("stop", 1))
    state, get = _baseline_state([meter], clock.advance)
    assert get() is None
    assert state.problem is not None
    assert "scripted stop failure" in state.problem
    assert not meter.running
    case = CaseConfig.model_validate({"batch_size": 4, "max_new_tokens": 5, "warmup": 0})
    measured = run_case(
        backend=FakeBackend(clock, [], sync_s=SYNC_S),
        meters=[meter],
        config=case,
        prompts=PROMPTS,
        clock=clock,
        baseline=get(),
        baseline_problem=state.problem,
    )
    note = measured.metrics["dynamic_energy_j"].note or ""
    assert "scripted stop failure" in note  # not "disabled with --llem-baseline-s=0"
    assert measured.metrics["energy_j"].median is not None


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, CaseTimeoutError])
def test_an_interrupted_baseline_is_noted_and_taken_again(
    interruption: type[BaseException],
) -> None:
    clock = FakeClock()
    meter = FakeMeter("gpu-fake", clock, power_w={"gpu": 70.0})
    calls = 0

    def sleep(seconds: float) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise interruption("interrupted mid-baseline")
        clock.advance(seconds)

    state, get = _baseline_state([meter], sleep)
    with pytest.raises(interruption):
        get()
    assert not meter.running
    assert state.problem is not None
    assert "interrupted" in state.problem
    record = get()  # the next case measures it again instead of going without
    assert record is not None
    assert record.domains["gpu"].idle_power_w == pytest.approx(70.0)
    assert state.problem is None


def test_a_baseline_shorter_than_the_meter_floor_is_lengthened() -> None:
    # 20 x a 0.5 s update period is 10 s: a 2 s baseline would be quantised to 25% per edge
    clock = FakeClock()
    meter = FakeMeter("gpu-fake", clock, power_w={"gpu": 70.0})
    record = measure_baseline(
        [meter], seconds=2.0, assignment={"gpu": "gpu-fake"}, sleep=clock.advance, floor_s=10.0
    )
    assert record.seconds == pytest.approx(10.0)
    assert record.domains["gpu"].seconds == pytest.approx(10.0)
    assert any("lengthened from 2 s to 10 s" in note for note in record.notes)
    # meters that cannot lap measure separate windows, each of which needs the floor
    separate = _NoLap("cc", clock, power_w={"gpu": 70.0})
    record = measure_baseline(
        [separate], seconds=2.0, assignment={"gpu": "cc"}, sleep=clock.advance, floor_s=10.0
    )
    assert record.domains["gpu"].seconds == pytest.approx(50.0)
    assert any("each of its 5 windows" in note for note in record.notes)


def test_the_session_baseline_gets_the_floor_of_the_slowest_meter() -> None:
    clock = FakeClock()
    meter = FakeMeter("gpu-fake", clock, power_w={"gpu": 70.0})
    state = BaselineState(
        EnergyOptions(baseline_s=1.0, baseline_forced=True), lambda _: None, sleep=clock.advance
    )
    record = meter_record(meter.info()).model_copy(
        update={"used_for": ["gpu"], "update_period_s": 0.25}
    )
    got = state.get([meter], [record], DomainAssignment(meters={"gpu": "gpu-fake"}))
    assert got is not None
    assert got.seconds == pytest.approx(QUANTISATION_PERIODS * 0.25)


def test_update_period_from_irregular_changes_is_their_median_interval() -> None:
    from pytest_llem.meters.base import update_period_from_changes

    # intervals 0.02, 0.12, 0.12, 0.02, 0.12: median 0.12 (the smallest would be 0.02)
    changes = [0.0, 0.02, 0.14, 0.26, 0.28, 0.40]
    assert update_period_from_changes(changes) == pytest.approx(0.12)
    assert update_period_from_changes([0.0, 1.5]) == pytest.approx(1.5)
    assert update_period_from_changes([3.0]) is None


def test_a_window_between_half_the_floor_and_the_floor_has_no_energy() -> None:
    # the 0.8125 s window clears half of a 1 s floor but not the floor itself
    m = _run(WindowPolicy(target_s=0.5, floor_s=1.0, update_period_s=0.05), warmup=0)
    assert m.repetitions[0].duration_s == pytest.approx(0.8125)
    assert m.repetitions[0].energy_j is None
    m = _run(WindowPolicy(target_s=0.5, floor_s=0.8, update_period_s=0.04), warmup=0)
    assert m.repetitions[0].energy_j == pytest.approx(250.0 * 0.8125)

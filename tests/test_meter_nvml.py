"""Tests of the NVML meter against the fake pynvml (no GPU needed)."""

from __future__ import annotations

import threading
import time

import pytest

from pytest_llem.exceptions import ConfigurationError, EnergyMeterError, MeterUnavailableError
from pytest_llem.meters.base import DeviceState, EnergyMeter, EnergyReading, ProcessesUnknown
from pytest_llem.meters.inventory import gpu_inventory as nvml_gpus
from pytest_llem.meters.nvml import (
    NvmlMeter,
    decode_clock_event_reasons,
    downsample_power,
    integrate_power,
    parse_cuda_visible_devices,
    sample_period_s,
)
from tests.fakes.fake_pynvml import NVML_VALUE_TYPE_DOUBLE, FakeGpu, FakeNvml, install

UUIDS = [
    "GPU-aaaaaaaa-1111-1111-1111-111111111111",
    "GPU-bbbbbbbb-2222-2222-2222-222222222222",
    "GPU-cccccccc-3333-3333-3333-333333333333",
]


def _gpus(*watts: float) -> list[FakeGpu]:
    return [FakeGpu(uuid=UUIDS[i], power_w=w) for i, w in enumerate(watts)]


def _window(meter: NvmlMeter, seconds: float) -> tuple[float, float | None, dict[str, float]]:
    meter.start()
    time.sleep(seconds)
    reading = meter.stop()
    gpu = reading.domains["gpu"]
    return reading.duration_s, gpu.energy_j, gpu.devices


@pytest.fixture
def one_gpu(monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    return install(monkeypatch, _gpus(200.0))


def test_window_at_200w_reads_power_times_time(one_gpu: FakeNvml) -> None:
    meter = NvmlMeter()
    try:
        duration, energy, devices = _window(meter, 0.5)
    finally:
        meter.close()
    assert energy is not None
    step_j = 200.0 * 0.1
    assert abs(energy - 200.0 * duration) <= step_j + 1e-6
    assert energy > 0
    assert devices == {"gpu0": energy}


def test_meter_satisfies_protocol_and_describes_itself(one_gpu: FakeNvml) -> None:
    meter = NvmlMeter()
    try:
        assert isinstance(meter, EnergyMeter)
        info = meter.info()
    finally:
        meter.close()
    assert info.name == "nvml"
    assert info.domains == ("gpu",)
    assert info.sources == {"gpu": "measured"}
    assert info.resolution.energy_quantum_j == pytest.approx(0.001)
    assert info.devices[0].startswith("gpu0: NVIDIA H100 80GB HBM3")
    assert info.details["gpu0.method"] == "energy counter"
    assert info.details["gpu0.power_samples"] == "NVML_FI_DEV_POWER_INSTANT"
    assert info.details["driver_version"] == "580.159.04"
    assert "gpu0.mig" not in info.details


def test_two_gpus_are_summed_with_per_device_values(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, _gpus(100.0, 300.0))
    meter = NvmlMeter()
    try:
        duration, energy, devices = _window(meter, 0.5)
    finally:
        meter.close()
    assert set(devices) == {"gpu0", "gpu1"}
    assert energy == pytest.approx(devices["gpu0"] + devices["gpu1"])
    assert abs(devices["gpu0"] - 100.0 * duration) <= 10.0 + 1e-6
    assert abs(devices["gpu1"] - 300.0 * duration) <= 30.0 + 1e-6


def test_gpu_indices_select_a_subset(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, _gpus(100.0, 300.0))
    meter = NvmlMeter(gpu_indices=[1])
    try:
        assert meter.info().devices[0].startswith("gpu1:")
        _, energy, devices = _window(meter, 0.25)
    finally:
        meter.close()
    assert list(devices) == ["gpu1"]
    assert energy == devices["gpu1"]


@pytest.mark.parametrize(
    ("env", "expected_uuids"),
    [
        ("2", [UUIDS[2]]),
        ("2,0", [UUIDS[2], UUIDS[0]]),
        (UUIDS[1], [UUIDS[1]]),
        ("GPU-cccccccc", [UUIDS[2]]),
        (f" {UUIDS[1]} , 0", [UUIDS[1], UUIDS[0]]),
        ("1,7,0", [UUIDS[1]]),
    ],
)
def test_cuda_visible_devices_selects_the_right_devices(
    monkeypatch: pytest.MonkeyPatch, env: str, expected_uuids: list[str]
) -> None:
    install(monkeypatch, _gpus(100.0, 200.0, 300.0))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", env)
    meter = NvmlMeter()
    try:
        devices = meter.info().devices
    finally:
        meter.close()
    assert [d.split(": ")[0] for d in devices] == [f"gpu{i}" for i in range(len(expected_uuids))]
    assert [d.split(", ")[-1].rstrip(")") for d in devices] == expected_uuids


def test_cuda_visible_devices_index_maps_energy_to_the_right_gpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    install(monkeypatch, _gpus(100.0, 200.0, 300.0))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    meter = NvmlMeter()
    try:
        duration, energy, _ = _window(meter, 0.3)
    finally:
        meter.close()
    assert energy is not None
    assert abs(energy - 300.0 * duration) <= 30.0 + 1e-6


@pytest.mark.parametrize("env", ["", "-1", "5", "GPU-ffff"])
def test_cuda_visible_devices_hiding_every_gpu_is_unavailable(
    monkeypatch: pytest.MonkeyPatch, env: str
) -> None:
    fake = install(monkeypatch, _gpus(100.0))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", env)
    with pytest.raises(MeterUnavailableError, match="no NVIDIA GPU visible") as info:
        NvmlMeter()
    assert info.value.meter == "nvml"
    assert fake.init_count == fake.shutdown_count == 1


def test_parse_cuda_visible_devices_maps_mig_through_the_resolver() -> None:
    with pytest.raises(MeterUnavailableError, match="MIG"):
        parse_cuda_visible_devices("MIG-1234", UUIDS)
    assert parse_cuda_visible_devices(None, UUIDS) == [0, 1, 2]
    parents = {"MIG-1234": 2, "MIG-5678": 2}
    assert parse_cuda_visible_devices("MIG-1234", UUIDS, mig_parent=parents.__getitem__) == [2]
    # A second instance on the same GPU is the same measured device: the list ends there.
    found = parse_cuda_visible_devices("MIG-1234,MIG-5678", UUIDS, mig_parent=parents.__getitem__)
    assert found == [2]


def test_counter_unsupported_falls_back_to_power_integration(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gpus = _gpus(250.0)
    gpus[0].energy_counter_supported = False
    fake = install(monkeypatch, gpus)
    meter = NvmlMeter()
    try:
        info = meter.info()
        meter.start()
        time.sleep(0.5)
        reading = meter.stop()
    finally:
        meter.close()
    gpu = reading.domains["gpu"]
    assert gpu.energy_j is not None
    assert gpu.source == "measured"
    assert gpu.energy_j == pytest.approx(250.0 * reading.duration_s, rel=0.05)
    assert any("energy is power integration" in note for note in reading.notes)
    assert info.details["gpu0.method"].startswith("power integration")
    assert 0.005 <= float(info.details["power_sample_period_s"]) < 0.05
    assert fake.field_calls >= 10
    assert reading.cross_check == {}
    assert not info.resolution.update_period_measured
    assert info.resolution.note is not None
    assert "no measured GPU has an energy counter" in info.resolution.note
    assert not [t for t in threading.enumerate() if t.name == "pytest-llem-nvml-power"]


def test_power_integration_follows_a_power_change(monkeypatch: pytest.MonkeyPatch) -> None:
    gpus = _gpus(100.0)
    gpus[0].energy_counter_supported = False
    fake = install(monkeypatch, gpus)
    meter = NvmlMeter()
    try:
        meter.start()
        time.sleep(0.2)
        fake.set_power(0, 300.0)
        time.sleep(0.2)
        reading = meter.stop()
    finally:
        meter.close()
    energy = reading.domains["gpu"].energy_j
    assert energy is not None
    # ~0.2 s at 100 W then ~0.2 s at 300 W, against 40 J if power had stayed at 100 W.
    assert 70.0 < energy < 100.0


def test_library_missing_is_unavailable_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, library_found=False)
    with pytest.raises(MeterUnavailableError) as info:
        NvmlMeter()
    assert info.value.meter == "nvml"
    assert info.value.reason == "NVML library not found (no NVIDIA driver)"


def test_no_device_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = install(monkeypatch, [])
    with pytest.raises(MeterUnavailableError, match="no NVIDIA GPU visible"):
        NvmlMeter()
    assert not fake.initialised


def test_gpu_index_out_of_range_is_unavailable(one_gpu: FakeNvml) -> None:
    with pytest.raises(MeterUnavailableError, match="GPU index 3 requested"):
        NvmlMeter(gpu_indices=[3])
    assert not one_gpu.initialised


def test_empty_gpu_indices_is_a_configuration_error(one_gpu: FakeNvml) -> None:
    with pytest.raises(ConfigurationError, match="empty"):
        NvmlMeter(gpu_indices=[])
    assert not one_gpu.initialised


def test_window_shorter_than_a_counter_step_is_never_zero_joules(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = install(monkeypatch, [FakeGpu(counter_step_s=3600.0)])
    meter = NvmlMeter(update_period_probe_s=0.1)
    try:
        reading = _window(meter, 0.01)
    finally:
        meter.close()
    _, energy, devices = reading
    assert energy is None
    assert devices == {}
    assert fake.energy_calls >= 2


def test_counter_going_backwards_is_an_error(one_gpu: FakeNvml) -> None:
    meter = NvmlMeter()
    try:
        meter.start()
        one_gpu.gpus[0].counter_mj = 0
        with pytest.raises(EnergyMeterError, match="went backwards"):
            meter.stop()
    finally:
        meter.close()


@pytest.mark.parametrize("counter", [True, False])
def test_gpu_lost_mid_window_is_an_error(monkeypatch: pytest.MonkeyPatch, counter: bool) -> None:
    gpus = _gpus(200.0)
    gpus[0].energy_counter_supported = counter
    install(monkeypatch, gpus)
    meter = NvmlMeter()
    try:
        meter.start()
        gpus[0].lost = True
        time.sleep(0.05)
        with pytest.raises(EnergyMeterError, match="GPU is lost") as info:
            meter.stop()
        assert info.value.__cause__ is not None
    finally:
        meter.close()
    assert not [t for t in threading.enumerate() if t.name == "pytest-llem-nvml-power"]


def test_window_misuse_is_an_error(one_gpu: FakeNvml) -> None:
    meter = NvmlMeter()
    try:
        with pytest.raises(EnergyMeterError, match="without start"):
            meter.stop()
        meter.start()
        with pytest.raises(EnergyMeterError, match="already open"):
            meter.start()
    finally:
        meter.close()
    with pytest.raises(EnergyMeterError, match="closed"):
        meter.start()


def test_close_shuts_nvml_down_once(one_gpu: FakeNvml) -> None:
    meter = NvmlMeter()
    meter.close()
    meter.close()
    assert one_gpu.init_count == one_gpu.shutdown_count == 1


def test_nvml_gpus_describes_visible_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = install(monkeypatch, _gpus(100.0, 200.0))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    gpus, reason = nvml_gpus()
    assert reason is None
    assert len(gpus) == 1
    gpu = gpus[0]
    assert (gpu.index, gpu.uuid, gpu.driver) == (0, UUIDS[1], "580.159.04")
    assert gpu.name == "NVIDIA H100 80GB HBM3"
    assert gpu.power_limit_w == pytest.approx(700.0)
    assert gpu.memory_total_mb == pytest.approx(81559.0)
    assert not fake.initialised


def test_nvml_gpus_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, library_found=False)
    assert nvml_gpus() == ([], "NVML library not found (no NVIDIA driver)")


def test_lap_reads_mid_window_and_leaves_it_open(one_gpu: FakeNvml) -> None:
    meter = NvmlMeter()
    try:
        meter.start()
        time.sleep(0.3)
        lap = meter.lap()
        time.sleep(0.3)
        final = meter.stop()
    finally:
        meter.close()
    step_j = 200.0 * 0.1
    lap_j = lap.domains["gpu"].energy_j
    final_j = final.domains["gpu"].energy_j
    assert lap_j is not None
    assert final_j is not None
    assert abs(lap_j - 200.0 * lap.duration_s) <= step_j + 1e-6
    assert final_j > lap_j
    with pytest.raises(EnergyMeterError, match="without start"):
        meter.lap()


# The counter's update period ----------------------------------------------------------------


def test_update_period_is_measured_at_construction(one_gpu: FakeNvml) -> None:
    meter = NvmlMeter()
    try:
        info = meter.info()
    finally:
        meter.close()
    resolution = info.resolution
    assert resolution.update_period_s is not None
    assert 0.05 < resolution.update_period_s < 0.2
    assert resolution.update_period_measured
    assert resolution.note is not None
    assert "polled the energy counter of gpu0" in resolution.note
    assert 0.05 < float(info.details["gpu0.update_period_s"]) < 0.2
    intervals = [float(i) for i in info.details["gpu0.update_intervals_s"].split(", ")]
    assert len(intervals) == 3
    assert all(0.05 < i < 0.2 for i in intervals)
    # Power is sampled at a twentieth of the period, clamped to 5 ms (more if reads are slow).
    assert 0.005 <= float(info.details["power_sample_period_s"]) < 0.05


def test_update_period_is_the_largest_over_the_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    gpus = _gpus(100.0, 100.0)
    gpus[0].counter_step_s = 0.02
    gpus[1].counter_step_s = 0.05
    install(monkeypatch, gpus)
    meter = NvmlMeter()
    try:
        info = meter.info()
    finally:
        meter.close()
    assert 0.01 < float(info.details["gpu0.update_period_s"]) < 0.035
    period = info.resolution.update_period_s
    assert period is not None
    assert 0.035 < period < 0.08
    assert info.resolution.update_period_measured


def test_a_slow_counter_is_probed_until_it_changes_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    # A 0.6 s counter changes at most once in a 0.3 s probe: the probe goes on until it has an
    # interval instead of assuming the nominal 0.1 s (which would make windows 6 x too short).
    install(monkeypatch, [FakeGpu(counter_step_s=0.6)])
    meter = NvmlMeter(update_period_probe_s=0.3)
    try:
        resolution = meter.info().resolution
    finally:
        meter.close()
    assert resolution.update_period_s == pytest.approx(0.6, rel=0.15)
    assert resolution.update_period_measured


def test_a_counter_that_never_changes_is_assumed_as_slow_as_the_probe(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    install(monkeypatch, [FakeGpu(counter_step_s=3600.0)])
    meter = NvmlMeter(update_period_probe_s=0.1, update_period_probe_max_s=0.3)
    try:
        resolution = meter.info().resolution
    finally:
        meter.close()
    assert resolution.update_period_s is not None
    assert resolution.update_period_s >= 0.3  # at least the probe's length, never 0.1 s
    assert not resolution.update_period_measured
    assert resolution.note is not None
    assert "gpu0 changed fewer than twice" in resolution.note
    assert "assumed" in resolution.note


# Power samples: timeline and cross-check ------------------------------------------------------


def _timed_window(meter: NvmlMeter, seconds: float) -> EnergyReading:
    meter.start()
    time.sleep(seconds)
    return meter.stop()


def test_window_has_a_power_timeline(one_gpu: FakeNvml) -> None:
    meter = NvmlMeter()
    try:
        reading = _timed_window(meter, 0.4)
    finally:
        meter.close()
    (timeline,) = reading.timelines
    assert timeline.domain == "gpu"
    assert timeline.method == "NVML_FI_DEV_POWER_INSTANT"
    assert 0.005 <= timeline.period_s < 0.05
    assert 2 <= len(timeline.watts) <= 200
    assert len(timeline.times_s) == len(timeline.watts) == min(200, timeline.samples)
    assert all(0.0 <= t <= reading.duration_s for t in timeline.times_s)
    assert list(timeline.times_s) == sorted(timeline.times_s)
    assert sum(timeline.watts) / len(timeline.watts) == pytest.approx(200.0, rel=0.02)
    assert one_gpu.field_calls >= timeline.samples


def test_timeline_sums_the_gpus_and_is_downsampled(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, _gpus(100.0, 300.0))
    meter = NvmlMeter(poll_period_s=0.001)
    try:
        reading = _timed_window(meter, 0.4)
    finally:
        meter.close()
    (timeline,) = reading.timelines
    assert len(timeline.watts) == min(200, timeline.samples)
    assert timeline.samples > 50
    assert min(timeline.watts) == pytest.approx(400.0, rel=0.01)
    assert max(timeline.watts) == pytest.approx(400.0, rel=0.01)


def test_cross_check_is_small_for_steady_power(monkeypatch: pytest.MonkeyPatch) -> None:
    # A fine-stepped counter, so the counter's own quantisation stays below 3% of the window.
    install(monkeypatch, [FakeGpu(power_w=250.0, counter_step_s=0.01)])
    meter = NvmlMeter()
    try:
        reading = _timed_window(meter, 0.4)
    finally:
        meter.close()
    assert set(reading.cross_check) == {"gpu"}
    assert abs(reading.cross_check["gpu"]) < 0.05


def test_cross_check_follows_a_power_change(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = install(monkeypatch, [FakeGpu(power_w=100.0, counter_step_s=0.01)])
    meter = NvmlMeter()
    try:
        meter.start()
        time.sleep(0.2)
        fake.set_power(0, 400.0)
        time.sleep(0.2)
        reading = meter.stop()
    finally:
        meter.close()
    assert abs(reading.cross_check["gpu"]) < 0.05
    (timeline,) = reading.timelines
    assert min(timeline.watts) == pytest.approx(100.0, rel=0.01)
    assert max(timeline.watts) == pytest.approx(400.0, rel=0.01)


def test_power_field_unsupported_falls_back_to_power_usage(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gpus = _gpus(200.0)
    gpus[0].unsupported = {"NVML_FI_DEV_POWER_INSTANT"}
    fake = install(monkeypatch, gpus)
    meter = NvmlMeter()
    try:
        assert meter.info().details["gpu0.power_samples"] == "nvmlDeviceGetPowerUsage"
        reading = _timed_window(meter, 0.3)
    finally:
        meter.close()
    (timeline,) = reading.timelines
    assert timeline.method == "nvmlDeviceGetPowerUsage"
    assert fake.power_calls >= timeline.samples


def test_old_pynvml_without_the_power_field_constant_uses_power_usage(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    install(monkeypatch, _gpus(200.0), missing={"NVML_FI_DEV_POWER_INSTANT"})
    meter = NvmlMeter()
    try:
        reading = _timed_window(meter, 0.2)
    finally:
        meter.close()
    assert reading.timelines[0].method == "nvmlDeviceGetPowerUsage"


def test_power_field_answered_as_a_double_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    gpus = _gpus(123.5)
    gpus[0].power_field_value_type = NVML_VALUE_TYPE_DOUBLE
    install(monkeypatch, gpus)
    meter = NvmlMeter()
    try:
        reading = _timed_window(meter, 0.2)
    finally:
        meter.close()
    assert reading.timelines[0].watts[0] == pytest.approx(123.5)


def test_failing_power_samples_on_a_counter_gpu_keep_the_counter_energy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gpus = _gpus(200.0)
    install(monkeypatch, gpus)
    meter = NvmlMeter()
    try:
        meter.start()
        time.sleep(0.05)
        gpus[0].unsupported = {"NVML_FI_DEV_POWER_INSTANT"}
        time.sleep(0.25)
        reading = meter.stop()
    finally:
        meter.close()
    assert reading.domains["gpu"].energy_j is not None
    assert reading.timelines == ()
    assert reading.cross_check == {}
    assert any("no power timeline" in note for note in reading.notes)
    assert not [t for t in threading.enumerate() if t.name == "pytest-llem-nvml-power"]


def test_failing_power_samples_without_a_counter_are_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gpus = _gpus(200.0)
    gpus[0].energy_counter_supported = False
    install(monkeypatch, gpus)
    meter = NvmlMeter()
    try:
        meter.start()
        time.sleep(0.05)
        gpus[0].unsupported = {"NVML_FI_DEV_POWER_INSTANT"}
        time.sleep(0.05)
        with pytest.raises(EnergyMeterError, match="reading GPU power failed"):
            meter.stop()
    finally:
        meter.close()


def test_a_gpu_with_neither_counter_nor_power_is_unavailable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gpus = _gpus(200.0)
    gpus[0].energy_counter_supported = False
    gpus[0].unsupported = {"NVML_FI_DEV_POWER_INSTANT", "nvmlDeviceGetPowerUsage"}
    fake = install(monkeypatch, gpus)
    with pytest.raises(MeterUnavailableError, match="neither the energy counter nor power"):
        NvmlMeter()
    assert not fake.initialised


def test_counter_gpu_without_power_readings_measures_without_timeline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gpus = _gpus(200.0)
    gpus[0].unsupported = {"NVML_FI_DEV_POWER_INSTANT", "nvmlDeviceGetPowerUsage"}
    install(monkeypatch, gpus)
    meter = NvmlMeter()
    try:
        assert meter.info().details["gpu0.power_samples"].startswith("none (")
        reading = _timed_window(meter, 0.3)
    finally:
        meter.close()
    assert reading.domains["gpu"].energy_j is not None
    assert reading.timelines == ()
    assert reading.cross_check == {}


def test_lap_carries_no_timeline_and_the_window_still_gets_one(one_gpu: FakeNvml) -> None:
    meter = NvmlMeter()
    try:
        meter.start()
        time.sleep(0.2)
        lap = meter.lap()
        time.sleep(0.1)
        final = meter.stop()
    finally:
        meter.close()
    assert lap.timelines == ()
    assert len(final.timelines) == 1


# Pure functions -------------------------------------------------------------------------------


def test_integrate_power_by_hand() -> None:
    # 0..1 s at 100 -> 300 W (200 J), then 1..3 s at 300 W (600 J).
    assert integrate_power([0.0, 1.0, 3.0], [100.0, 300.0, 300.0]) == pytest.approx(800.0)
    assert integrate_power([0.5], [100.0]) == 0.0
    with pytest.raises(ValueError, match="length"):
        integrate_power([0.0, 1.0], [1.0])


def _step_energy(start: float, times: tuple[float, ...], watts: tuple[float, ...]) -> float:
    edges = (start, *times)
    return sum(w * (edges[i + 1] - edges[i]) for i, w in enumerate(watts))


def test_downsample_power_preserves_energy() -> None:
    times = [0.001 * k + 0.0003 * (k % 3) for k in range(1000)]
    watts = [100.0 + 50.0 * ((k * 7919) % 13) for k in range(1000)]
    down_t, down_w = downsample_power(times, watts)
    assert len(down_t) == len(down_w) == 200
    assert down_t[-1] == pytest.approx(times[-1])
    assert list(down_t) == sorted(down_t)
    assert _step_energy(times[0], down_t, down_w) == pytest.approx(
        integrate_power(times, watts), rel=1e-9
    )
    assert min(watts) <= min(down_w) <= max(down_w) <= max(watts)


def test_downsample_power_of_a_ramp_gives_bucket_means() -> None:
    times = [k / 100 for k in range(101)]  # 0..1 s
    watts = [100.0 * t for t in times]  # a ramp, 0..100 W
    down_t, down_w = downsample_power(times, watts, max_points=4)
    assert down_t == pytest.approx((0.25, 0.5, 0.75, 1.0))
    assert down_w == pytest.approx((12.5, 37.5, 62.5, 87.5))


def test_downsample_power_leaves_short_series_alone() -> None:
    assert downsample_power([0.0, 0.1], [5.0, 6.0]) == ((0.0, 0.1), (5.0, 6.0))
    with pytest.raises(ValueError, match="max_points"):
        downsample_power([0.0], [1.0], max_points=0)
    with pytest.raises(ValueError, match="length"):
        downsample_power([0.0], [1.0, 2.0])


@pytest.mark.parametrize(
    ("update", "cost", "expected"),
    [(0.1, 0.0, 0.005), (1.0, 0.0, 0.05), (10.0, 0.0, 0.1), (0.1, 0.001, 0.05), (0.1, 0.01, 0.5)],
)
def test_sample_period(update: float, cost: float, expected: float) -> None:
    assert sample_period_s(update, cost) == pytest.approx(expected)


def test_decode_clock_event_reasons() -> None:
    assert decode_clock_event_reasons(0) == ()
    assert decode_clock_event_reasons(0x1 | 0x4 | 0x40) == (
        "GpuIdle",
        "SwPowerCap",
        "HwThermalSlowdown",
    )
    assert decode_clock_event_reasons(0x8 | 0x80 | 0x10) == (
        "HwSlowdown",
        "SyncBoost",
        "HwPowerBrakeSlowdown",
    )
    assert decode_clock_event_reasons(0x20 | 0x2 | 0x100) == (
        "ApplicationsClocksSetting",
        "SwThermalSlowdown",
        "DisplayClockSetting",
    )
    assert decode_clock_event_reasons(0x1 | 0x1000) == ("GpuIdle", "0x1000")


# Device states and processes ------------------------------------------------------------------


def test_window_edges_record_device_states(one_gpu: FakeNvml) -> None:
    gpu = one_gpu.gpus[0]
    meter = NvmlMeter()
    try:
        meter.start()
        time.sleep(0.05)
        gpu.temperature_c, gpu.sm_clock_mhz, gpu.clock_reasons = 67, 1755, 0x4
        reading = meter.stop()
        now = meter.device_states()
    finally:
        meter.close()
    assert reading.start_states == {
        "gpu0": DeviceState(
            temperature_c=41.0,
            sm_clock_mhz=1980.0,
            memory_clock_mhz=2619.0,
            power_limit_w=700.0,
            throttle_reasons=("GpuIdle",),
        )
    }
    end = reading.end_states["gpu0"]
    assert (end.temperature_c, end.sm_clock_mhz, end.throttle_reasons) == (
        67.0,
        1755.0,
        ("SwPowerCap",),
    )
    assert now == reading.end_states


def test_unsupported_state_queries_give_none(monkeypatch: pytest.MonkeyPatch) -> None:
    gpus = _gpus(200.0)
    gpus[0].unsupported = {
        "nvmlDeviceGetTemperature",
        "nvmlDeviceGetClockInfo",
        "nvmlDeviceGetEnforcedPowerLimit",
        "nvmlDeviceGetPowerManagementLimit",
        "nvmlDeviceGetCurrentClocksEventReasons",
        "nvmlDeviceGetCurrentClocksThrottleReasons",
        "nvmlDeviceGetComputeRunningProcesses",
        "nvmlDeviceGetMigMode",
    }
    install(monkeypatch, gpus)
    meter = NvmlMeter()
    try:
        reading = _timed_window(meter, 0.2)
        processes = meter.running_processes()
    finally:
        meter.close()
    assert reading.start_states == reading.end_states == {"gpu0": DeviceState()}
    assert processes == {
        "gpu0": ProcessesUnknown(
            "cannot list its compute processes: nvmlDeviceGetComputeRunningProcesses: Not Supported"
        )
    }


def test_old_pynvml_reads_throttle_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    gpus = _gpus(200.0)
    gpus[0].clock_reasons = 0x20
    install(monkeypatch, gpus, missing={"nvmlDeviceGetCurrentClocksEventReasons"})
    meter = NvmlMeter()
    try:
        states = meter.device_states()
    finally:
        meter.close()
    assert states["gpu0"].throttle_reasons == ("SwThermalSlowdown",)


def test_running_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    gpus = _gpus(200.0, 200.0)
    gpus[0].processes = [(1234, 512 * 2**20), (99, None)]
    install(monkeypatch, gpus)
    meter = NvmlMeter()
    try:
        processes = meter.running_processes()
    finally:
        meter.close()
    assert processes == {"gpu0": [(1234, 512.0), (99, None)], "gpu1": []}
    with pytest.raises(EnergyMeterError, match="closed"):
        meter.running_processes()
    with pytest.raises(EnergyMeterError, match="closed"):
        meter.device_states()


# MIG ------------------------------------------------------------------------------------------

MIG_UUID = "MIG-0e5a8c7e-aaaa-5555-9999-000000000001"


def _mig_gpus() -> list[FakeGpu]:
    gpus = _gpus(100.0, 300.0)
    gpus[1].mig_mode = 1
    gpus[1].mig_devices = [MIG_UUID, "MIG-0e5a8c7e-aaaa-5555-9999-000000000002"]
    return gpus


@pytest.mark.parametrize("entry", [MIG_UUID, f"MIG-{UUIDS[1]}/1/0"])
def test_mig_instance_is_measured_at_its_parent(
    monkeypatch: pytest.MonkeyPatch, entry: str
) -> None:
    install(monkeypatch, _mig_gpus())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", entry)
    meter = NvmlMeter()
    try:
        info = meter.info()
        duration, energy, _ = _window(meter, 0.3)
    finally:
        meter.close()
    assert info.devices == (f"gpu0: NVIDIA H100 80GB HBM3 (nvml index 1, {UUIDS[1]})",)
    assert info.details["gpu0.mig"] == (
        f"MIG instance {entry} measured at its parent GPU {UUIDS[1]}: the energy includes "
        "every instance on that GPU"
    )
    assert energy is not None
    assert abs(energy - 300.0 * duration) <= 30.0 + 1e-6


def test_mig_parent_not_found_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = install(
        monkeypatch, _mig_gpus(), missing={"nvmlDeviceGetDeviceHandleFromMigDeviceHandle"}
    )
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", MIG_UUID)
    with pytest.raises(MeterUnavailableError, match=f"MIG instance {MIG_UUID}") as info:
        NvmlMeter()
    assert "cannot find the GPU holding it" in info.value.reason
    assert not fake.initialised


def test_unknown_mig_instance_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, _mig_gpus())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-ffffffff-0000-0000-0000-000000000000")
    with pytest.raises(MeterUnavailableError, match="cannot find the GPU holding it"):
        NvmlMeter()


def test_mig_mode_enabled_is_noted(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, _mig_gpus())
    meter = NvmlMeter()
    try:
        details = meter.info().details
    finally:
        meter.close()
    assert "gpu0.mig" not in details
    assert details["gpu1.mig"] == (
        f"MIG mode is enabled on {UUIDS[1]}: the energy includes every MIG instance on that GPU"
    )


def test_nvml_gpus_describes_the_parent_of_a_mig_instance(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    install(monkeypatch, _mig_gpus())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", MIG_UUID)
    gpus, reason = nvml_gpus()
    assert reason is None
    assert [(g.index, g.uuid) for g in gpus] == [(0, UUIDS[1])]


# Exact figures: unit conversion, cross-check, update period ---------------------------------


def test_millijoules_are_converted_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    # The counter moves only by hand here, so the expected joules are exact.
    fake = install(monkeypatch, [FakeGpu(counter_step_s=3600.0)])
    meter = NvmlMeter(update_period_probe_s=0.02, update_period_probe_max_s=0.02)
    try:
        meter.start()
        fake.add_energy(0, 123_456)
        lap = meter.lap()
        fake.add_energy(0, 1_000)
        reading = meter.stop()
    finally:
        meter.close()
    assert lap.domains["gpu"].energy_j == pytest.approx(123.456, rel=1e-12)
    assert reading.domains["gpu"].energy_j == pytest.approx(124.456, rel=1e-12)
    assert reading.domains["gpu"].devices == pytest.approx({"gpu0": 124.456}, rel=1e-12)


def test_cross_check_is_counter_minus_power_over_power(monkeypatch: pytest.MonkeyPatch) -> None:
    # The counter counts 300 W, the power sensor reads 200 W: (300 - 200) / 200 = +0.5.
    # A flipped sign gives -0.5; dividing by the counter's energy gives +0.33.
    gpu = FakeGpu(power_w=300.0, power_reading_w=200.0, counter_step_s=0.01)
    install(monkeypatch, [gpu])
    meter = NvmlMeter()
    try:
        reading = _timed_window(meter, 1.0)
    finally:
        meter.close()
    assert reading.cross_check["gpu"] == pytest.approx(0.5, abs=0.06)


def test_update_period_is_the_median_interval_not_the_smallest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Irregular updates 20 ms, 120 ms, 120 ms, ...: any three consecutive intervals have the
    # median 120 ms and the minimum 20 ms.
    install(monkeypatch, [FakeGpu(counter_steps_s=(0.02, 0.12, 0.12))])
    meter = NvmlMeter()
    try:
        resolution = meter.info().resolution
    finally:
        meter.close()
    assert resolution.update_period_s is not None
    assert 0.08 < resolution.update_period_s < 0.2

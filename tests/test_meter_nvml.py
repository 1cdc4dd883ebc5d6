"""Tests of the NVML meter against the fake pynvml (no GPU needed)."""

from __future__ import annotations

import threading
import time

import pytest

from pytest_llem.exceptions import ConfigurationError, EnergyMeterError, MeterUnavailableError
from pytest_llem.meters.base import EnergyMeter
from pytest_llem.meters.nvml import NvmlMeter, nvml_gpus, parse_cuda_visible_devices
from tests.fakes.fake_pynvml import FakeGpu, FakeNvml, install

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
    assert info.resolution.update_period_s == pytest.approx(0.1)
    assert info.resolution.energy_quantum_j == pytest.approx(0.001)
    assert info.devices[0].startswith("gpu0: NVIDIA H100 80GB HBM3")
    assert info.details["gpu0.method"] == "energy counter"
    assert info.details["driver_version"] == "580.159.04"


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


def test_parse_cuda_visible_devices_rejects_mig() -> None:
    with pytest.raises(MeterUnavailableError, match="MIG"):
        parse_cuda_visible_devices("MIG-1234", UUIDS)
    assert parse_cuda_visible_devices(None, UUIDS) == [0, 1, 2]


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
    assert any("power integration" in note for note in reading.notes)
    assert info.details["gpu0.method"].startswith("power integration")
    assert "power_poll_period_s" in info.details
    assert fake.power_calls >= 10
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
    meter = NvmlMeter()
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

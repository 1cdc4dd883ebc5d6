"""Tests of the Zeus meter against the fake Zeus package (no Zeus, no GPU needed)."""

from __future__ import annotations

import sys
import time

import pytest

from pytest_llem.exceptions import ConfigurationError, EnergyMeterError, MeterUnavailableError
from pytest_llem.meters.base import EnergyMeter, EnergyReading
from pytest_llem.meters.zeus import INSTALL_HINT, ZeusMeter, zeus_unavailable_reason
from tests.fakes.fake_zeus import FakeZeus, FakeZeusCpu, FakeZeusGpu, install

STEP_J = 200.0 * 0.1  # one 100 ms counter step at 200 W


def _window(meter: ZeusMeter, seconds: float) -> EnergyReading:
    meter.start()
    time.sleep(seconds)
    return meter.stop()


def _energy(reading: EnergyReading, domain: str) -> float:
    energy = reading.domains[domain].energy_j
    assert energy is not None, reading.domains[domain].reason
    return energy


@pytest.fixture
def zeus(monkeypatch: pytest.MonkeyPatch) -> FakeZeus:
    return install(monkeypatch)


def test_window_reads_gpu_cpu_and_dram(zeus: FakeZeus) -> None:
    meter = ZeusMeter()
    try:
        reading = _window(meter, 0.5)
    finally:
        meter.close()
    gpu = _energy(reading, "gpu")
    assert abs(gpu - 200.0 * reading.duration_s) <= STEP_J + 1e-6
    assert reading.domains["gpu"].devices == {"gpu0": gpu}
    assert _energy(reading, "cpu") / reading.duration_s == pytest.approx(50.0, rel=0.05)
    assert _energy(reading, "dram") / reading.duration_s == pytest.approx(5.0, rel=0.05)
    assert reading.domains["cpu"].devices.keys() == {"cpu0"}
    assert reading.domains["dram"].devices.keys() == {"dram0"}
    assert all(d.source == "measured" for d in reading.domains.values())
    assert zeus.sync_calls == 0  # the runner synchronises; Zeus's torch sync stays off


def test_meter_satisfies_protocol_and_describes_itself(zeus: FakeZeus) -> None:
    meter = ZeusMeter()
    try:
        assert isinstance(meter, EnergyMeter)
        info = meter.info()
    finally:
        meter.close()
    assert info.name == "zeus"
    assert info.domains == ("gpu", "cpu", "dram")
    assert info.sources == dict.fromkeys(("gpu", "cpu", "dram"), "measured")
    assert info.devices == ("gpu0", "cpu0 (RAPL package 0)")
    assert info.resolution.update_period_s == pytest.approx(0.1)
    assert info.resolution.energy_quantum_j == pytest.approx(0.001)
    assert not info.resolution.update_period_measured
    assert info.details["zeus_version"] == "0.16.0"


def test_not_installed_is_unavailable_with_the_install_hint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "zeus", None)
    reason = zeus_unavailable_reason()
    assert reason is not None
    assert INSTALL_HINT in reason
    with pytest.raises(MeterUnavailableError) as info:
        ZeusMeter()
    assert info.value.meter == "zeus"
    assert INSTALL_HINT in info.value.reason


def test_installed_zeus_is_available(zeus: FakeZeus) -> None:
    assert zeus_unavailable_reason() is None


def test_window_shorter_than_a_gpu_counter_step_is_not_zero_joules(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    install(monkeypatch, [FakeZeusGpu(counter_step_s=3600.0)])
    meter = ZeusMeter()
    try:
        reading = _window(meter, 0.01)  # Zeus warns; filterwarnings=error would fail here
    finally:
        meter.close()
    gpu = reading.domains["gpu"]
    assert gpu.energy_j is None
    assert gpu.reason is not None
    assert gpu.reason.startswith("Zeus reported 0 J for gpu0")
    assert gpu.devices == {}
    assert _energy(reading, "cpu") > 0


def test_lap_reads_mid_window_and_leaves_it_open(zeus: FakeZeus) -> None:
    meter = ZeusMeter()
    try:
        meter.start()
        time.sleep(0.3)
        lap = meter.lap()
        time.sleep(0.3)
        final = meter.stop()
        open_windows = zeus.monitors[0].measurement_states
        assert open_windows == {}
    finally:
        meter.close()
    assert abs(_energy(lap, "gpu") - 200.0 * lap.duration_s) <= STEP_J + 1e-6
    assert abs(_energy(final, "gpu") - 200.0 * final.duration_s) <= STEP_J + 1e-6
    assert _energy(final, "cpu") / final.duration_s == pytest.approx(50.0, rel=0.05)
    assert final.notes[0].startswith("zeus: 2 Zeus window(s)")
    with pytest.raises(EnergyMeterError, match="without start"):
        meter.lap()


def test_two_gpus_and_a_subset(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, [FakeZeusGpu(power_w=100.0), FakeZeusGpu(power_w=300.0)])
    meter = ZeusMeter(gpu_indices=[1])
    try:
        reading = _window(meter, 0.3)
        devices = meter.info().devices
    finally:
        meter.close()
    assert devices[0] == "gpu1"
    assert list(reading.domains["gpu"].devices) == ["gpu1"]
    assert abs(_energy(reading, "gpu") - 300.0 * reading.duration_s) <= 30.0 + 1e-6


def test_cpu_only_when_zeus_finds_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, gpus=[], cpus=[FakeZeusCpu(dram_w=None)])
    meter = ZeusMeter()
    try:
        info = meter.info()
        reading = _window(meter, 0.2)
    finally:
        meter.close()
    assert info.domains == ("cpu",)
    assert info.resolution.update_period_s == pytest.approx(0.001)
    assert info.details["gpu"] == "not covered: Zeus found no GPU"
    assert reading.domains["gpu"].energy_j is None
    assert reading.domains["gpu"].reason == "Zeus found no GPU"
    assert reading.domains["dram"].energy_j is None
    assert "no dram" in (reading.domains["dram"].reason or "")
    assert _energy(reading, "cpu") / reading.duration_s == pytest.approx(50.0, rel=0.05)


def test_root_only_rapl_leaves_cpu_uncovered(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, cpu_permission_denied=True)
    meter = ZeusMeter()
    try:
        reading = _window(meter, 0.2)
    finally:
        meter.close()
    assert reading.domains["gpu"].energy_j is not None
    assert reading.domains["cpu"].energy_j is None
    assert reading.domains["cpu"].reason == "Zeus found no readable RAPL package"


def test_root_only_rapl_with_named_cpus_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, cpu_permission_denied=True)
    with pytest.raises(MeterUnavailableError, match="ZeusMonitor failed to start: Permission"):
        ZeusMeter(cpu_indices=[0])


def test_nothing_to_measure_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, gpus=[], cpu_permission_denied=True)
    with pytest.raises(MeterUnavailableError, match="neither a GPU nor"):
        ZeusMeter()


def test_bad_gpu_index_is_unavailable(zeus: FakeZeus) -> None:
    with pytest.raises(MeterUnavailableError, match="warm-up window failed"):
        ZeusMeter(gpu_indices=[3])


def test_empty_gpu_indices_is_a_configuration_error(zeus: FakeZeus) -> None:
    with pytest.raises(ConfigurationError, match="empty"):
        ZeusMeter(gpu_indices=[])


def test_gpu_lost_mid_window_is_an_energy_meter_error(zeus: FakeZeus) -> None:
    meter = ZeusMeter()
    try:
        meter.start()
        zeus.gpus[0].lost = True
        with pytest.raises(EnergyMeterError, match="end_window failed: GPU is lost") as info:
            meter.stop()
        assert info.value.__cause__ is not None
    finally:
        meter.close()


def test_gpu_counter_going_backwards_is_an_error(zeus: FakeZeus) -> None:
    meter = ZeusMeter()
    try:
        meter.start()
        zeus.gpus[0].counter_mj = 0
        with pytest.raises(EnergyMeterError, match="went backwards"):
            meter.stop()
    finally:
        meter.close()


def test_window_misuse_is_an_error_and_close_cancels(zeus: FakeZeus) -> None:
    meter = ZeusMeter()
    try:
        with pytest.raises(EnergyMeterError, match="without start"):
            meter.stop()
        meter.start()
        with pytest.raises(EnergyMeterError, match="already open"):
            meter.start()
    finally:
        meter.close()
    assert zeus.monitors[0].measurement_states == {}
    with pytest.raises(EnergyMeterError, match="closed"):
        meter.start()

"""Meter capabilities (Protocols checked with isinstance), the window-guard base shared by every
meter, and the device inventory (against the fake pynvml)."""

from __future__ import annotations

import pytest

from pytest_llem.exceptions import EnergyMeterError
from pytest_llem.harness.baseline import measure_baseline
from pytest_llem.harness.isolation import check_isolation
from pytest_llem.harness.runner import Lap, _lapper
from pytest_llem.harness.thermal import device_temperatures
from pytest_llem.meters import CodeCarbonMeter, NoneMeter, NvmlMeter, RaplMeter, ZeusMeter
from pytest_llem.meters.base import DeviceState, EnergyReading, ProcessesUnknown
from pytest_llem.meters.capabilities import (
    DeviceProcesses,
    LapsMidWindow,
    ListsProcesses,
    ReportsDeviceStates,
    reads_mid_window,
)
from pytest_llem.meters.inventory import gpu_inventory
from pytest_llem.meters.window import WindowedMeter
from pytest_llem.results.models import GpuInfo, MachineInfo
from tests.fakes.fake_backend import FakeClock
from tests.fakes.fake_meter import FakeMeter
from tests.fakes.fake_pynvml import FakeGpu, install

UUIDS = ["GPU-aaaaaaaa-1111-1111-1111-111111111111", "GPU-bbbbbbbb-2222-2222-2222-222222222222"]


class _StartStopOnly(FakeMeter):
    """A meter that has only the EnergyMeter methods: ``lap`` blocked as Protocols allow."""

    lap = None  # type: ignore[assignment]


class _LapsSometimes(FakeMeter):
    """A meter with ``lap()`` whose instance says it cannot use it (as NVML without counter)."""

    reads_mid_window = False


class _Thermo(FakeMeter):
    """A fake meter that reports its devices' states and lists their processes."""

    def __init__(self, clock: FakeClock, temperatures: dict[str, float | None]) -> None:
        super().__init__("thermo", clock, power_w={"gpu": 100.0})
        self.temperatures = temperatures
        self.processes: DeviceProcesses = {}

    def device_states(self) -> dict[str, DeviceState]:
        return {label: DeviceState(temperature_c=t) for label, t in self.temperatures.items()}

    def running_processes(self) -> DeviceProcesses:
        return self.processes


# Capabilities ----------------------------------------------------------------------------------


def test_a_meter_without_lap_is_not_treated_as_lapping() -> None:
    clock = FakeClock()
    plain = _StartStopOnly("plain", clock, power_w={"cpu": 10.0})
    assert not isinstance(plain, LapsMidWindow)
    assert not reads_mid_window(plain)
    marks: dict[str, Lap] = {}
    plain.start()
    _lapper([plain], clock, marks)("steady")
    plain.stop()
    assert marks["steady"].readings is None
    assert marks["steady"].error == "plain: cannot read energy mid-window"
    assert not any(event.startswith("lap:") for event in plain.events)


def test_a_lapping_meter_is_read_mid_window() -> None:
    clock = FakeClock()
    meter = FakeMeter("lapper", clock, power_w={"cpu": 10.0})
    assert isinstance(meter, LapsMidWindow)
    assert reads_mid_window(meter)
    marks: dict[str, Lap] = {}
    meter.start()
    clock.advance(2.0)
    _lapper([meter], clock, marks)("steady")
    meter.stop()
    readings = marks["steady"].readings
    assert readings is not None
    assert readings[0].domains["cpu"].energy_j == pytest.approx(20.0)


def test_an_instance_that_says_it_cannot_lap_gets_separate_baseline_windows() -> None:
    clock = FakeClock()
    meter = _LapsSometimes("sometimes", clock, power_w={"cpu": 40.0})
    assert isinstance(meter, LapsMidWindow)
    assert not reads_mid_window(meter)
    record = measure_baseline(
        [meter], seconds=2.0, assignment={"cpu": "sometimes"}, sleep=clock.advance
    )
    assert meter.windows == 5
    assert not any(event.startswith("lap:") for event in meter.events)
    assert record.domains["cpu"].idle_power_w == pytest.approx(40.0)


def test_device_states_are_read_from_meters_that_report_them() -> None:
    clock = FakeClock()
    thermo = _Thermo(clock, {"gpu0": 41.0, "gpu1": None})
    plain = FakeMeter("plain", clock, power_w={"cpu": 10.0})
    assert isinstance(thermo, ReportsDeviceStates)
    assert not isinstance(plain, ReportsDeviceStates)
    assert device_temperatures([plain, thermo]) == {"gpu0": 41.0}
    assert device_temperatures([plain]) == {}


def test_isolation_asks_only_meters_that_list_processes() -> None:
    clock = FakeClock()
    plain = FakeMeter("plain", clock, power_w={"cpu": 10.0})
    assert not isinstance(plain, ListsProcesses)
    assert check_isolation([plain], mode="warn") is None
    thermo = _Thermo(clock, {"gpu0": 40.0})
    thermo.processes = {"gpu0": [(1, 10.0), (4242, 512.0)], "gpu1": ProcessesUnknown("no rights")}
    assert isinstance(thermo, ListsProcesses)
    record = check_isolation([plain, thermo], mode="warn", ours={1})
    assert record is not None
    assert [(p.device, p.pid) for p in record.foreign] == [("gpu0", 4242)]
    assert not record.checked
    assert [u.device for u in record.unchecked] == ["gpu1"]


@pytest.mark.parametrize(
    ("meter", "laps", "states", "processes"),
    [
        (NvmlMeter, True, True, True),
        (RaplMeter, True, False, False),
        (ZeusMeter, True, False, False),
        (CodeCarbonMeter, False, False, False),
        (NoneMeter, True, False, False),
    ],
)
def test_each_built_in_meter_states_its_capabilities(
    meter: type[object], laps: bool, states: bool, processes: bool
) -> None:
    assert issubclass(meter, WindowedMeter)
    assert issubclass(meter, LapsMidWindow) is laps
    assert issubclass(meter, ReportsDeviceStates) is states
    assert issubclass(meter, ListsProcesses) is processes


# The window-guard base -------------------------------------------------------------------------


class _Counting(WindowedMeter[list[int]]):
    """The least a meter built on the base does: open, lap, stop, close."""

    name = "counting"

    def __init__(self) -> None:
        super().__init__()
        self.released: list[list[int]] = []

    def start(self) -> None:
        self._check_can_start()
        self._opened([], started_at=100.0)

    def lap(self) -> list[int]:
        window = self._current_window("lap")
        window.state.append(1)
        return window.state

    def stop(self) -> list[int]:
        return self._take_window().state

    def close(self) -> None:
        window = self._shut()
        if window is not None:
            self.released.append(window.state)


def test_window_guards_raise_the_same_words_for_every_meter() -> None:
    meter = _Counting()
    with pytest.raises(EnergyMeterError, match=r"^counting: stop\(\) without start\(\)$"):
        meter.stop()
    with pytest.raises(EnergyMeterError, match=r"^counting: lap\(\) without start\(\)$"):
        meter.lap()
    meter.start()
    assert meter.window_open
    with pytest.raises(EnergyMeterError, match=r"^counting: a window is already open$"):
        meter.start()
    assert meter.lap() == [1]
    assert meter.stop() == [1]
    assert not meter.window_open
    meter.start()  # a closed window can be followed by a new one
    meter.lap()
    meter.close()
    assert meter.closed
    assert meter.released == [[1]]
    with pytest.raises(EnergyMeterError, match=r"^counting: the meter is closed$"):
        meter.start()
    with pytest.raises(EnergyMeterError, match=r"^counting: stop\(\) without start\(\)$"):
        meter.stop()


def test_the_open_window_keeps_its_start_time() -> None:
    meter = _Counting()
    meter.start()
    window = meter._current_window("lap")
    assert window.started_at == 100.0
    assert window.elapsed_s() > 0


def test_none_meter_stays_usable_after_close() -> None:
    meter = NoneMeter()
    meter.start()
    meter.close()
    meter.start()
    reading = meter.stop()
    assert isinstance(reading, EnergyReading)


# The device inventory --------------------------------------------------------------------------


def test_inventory_lists_the_visible_gpus_as_gpu_info(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = install(
        monkeypatch,
        [FakeGpu(uuid=UUIDS[0], power_w=100.0), FakeGpu(uuid=UUIDS[1], power_w=200.0)],
    )
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-bbbb,0")
    gpus, note = gpu_inventory()
    assert note is None
    assert all(isinstance(gpu, GpuInfo) for gpu in gpus)
    assert [(gpu.index, gpu.uuid) for gpu in gpus] == [(0, UUIDS[1]), (1, UUIDS[0])]
    assert gpus[0].memory_total_mb == pytest.approx(fake.gpus[1].memory_total_mb)
    assert not fake.initialised
    machine = MachineInfo(hostname="h", platform="p", python="3", gpus=gpus)
    assert machine.gpus[1].uuid == UUIDS[0]


def test_inventory_says_why_it_lists_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, [FakeGpu(uuid=UUIDS[0])])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    gpus, note = gpu_inventory()
    assert gpus == []
    assert note is not None
    assert "hides all 1" in note
    install(monkeypatch, [])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert gpu_inventory() == ([], "no NVIDIA GPU visible")

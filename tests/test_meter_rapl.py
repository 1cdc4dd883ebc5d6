"""Tests of the RAPL meter against a fake powercap tree whose counters advance in real time."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pytest_llem.exceptions import ConfigurationError, EnergyMeterError, MeterUnavailableError
from pytest_llem.meters.base import EnergyMeter, EnergyReading
from pytest_llem.meters.rapl import ROOT_ENV_VAR, RaplMeter, rapl_unavailable_reason
from tests.fakes.fake_rapl import FakeRaplTree, FakeZone, amd_zones, intel_zones

INTEL = "GenuineIntel"
POLL_THREAD = "pytest-llem-rapl-poll"


@pytest.fixture
def intel(tmp_path: Path) -> Iterator[FakeRaplTree]:
    """One Intel package at 10 W, its core at 6 W and its dram at 2 W."""
    with FakeRaplTree(tmp_path / "powercap", intel_zones()) as tree:
        yield tree


#: Time an edge's own reads may take beyond the counter's lag (a loaded machine).
EDGE_S = 0.005


def _window(meter: RaplMeter, seconds: float, tree: FakeRaplTree | None = None) -> EnergyReading:
    if tree is not None:
        tree.reset_tick_gap()
    meter.start()
    time.sleep(seconds)
    return meter.stop()


def _assert_watts(reading: EnergyReading, domain: str, watts: float, tree: FakeRaplTree) -> None:
    """The domain's energy is ``watts`` x the window within 5%, or within what the fake's own
    lag allows when a loaded machine delays its writer (a read lags the true energy by at most
    the interval between two writes, at each edge)."""
    energy = _energy(reading, domain)
    expected = watts * reading.duration_s
    slack = max(0.05 * expected, watts * (2 * tree.max_tick_gap_s + EDGE_S))
    assert abs(energy - expected) <= slack, (energy, expected, slack, tree.max_tick_gap_s)


def _energy(reading: EnergyReading, domain: str) -> float:
    energy = reading.domains[domain].energy_j
    assert energy is not None, reading.domains[domain].reason
    return energy


def _poll_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == POLL_THREAD]


def test_10w_package_reads_10w_and_dram_2w(intel: FakeRaplTree) -> None:
    meter = RaplMeter(intel.root, cpu_vendor=INTEL)
    try:
        reading = _window(meter, 0.5, intel)
    finally:
        meter.close()
    cpu, dram = reading.domains["cpu"], reading.domains["dram"]
    _assert_watts(reading, "cpu", 10.0, intel)
    _assert_watts(reading, "dram", 2.0, intel)
    assert (cpu.source, dram.source) == ("measured", "measured")
    assert list(cpu.devices) == ["package-0"]
    assert list(dram.devices) == ["dram-0"]


def test_the_pollers_reads_give_a_power_timeline_per_domain(intel: FakeRaplTree) -> None:
    meter = RaplMeter(intel.root, poll_s=0.05, cpu_vendor=INTEL)
    try:
        reading = _window(meter, 0.5, intel)
    finally:
        meter.close()
    timelines = {t.domain: t for t in reading.timelines}
    assert set(timelines) == {"cpu", "dram"}
    cpu = timelines["cpu"]
    assert cpu.samples == len(cpu.times_s) >= 3
    assert list(cpu.times_s) == sorted(cpu.times_s)
    assert cpu.times_s[-1] == pytest.approx(reading.duration_s, abs=0.05)
    assert cpu.period_s == 0.05
    assert "polled" in cpu.method
    # the mean power between reads integrates back to the counter's energy
    edges = [0.0, *cpu.times_s]
    integral = sum(w * (b - a) for w, a, b in zip(cpu.watts, edges, edges[1:], strict=False))
    assert integral == pytest.approx(_energy(reading, "cpu"), rel=1e-6)


def test_meter_satisfies_protocol_and_describes_itself(intel: FakeRaplTree) -> None:
    meter = RaplMeter(intel.root, cpu_vendor=INTEL)
    try:
        assert isinstance(meter, EnergyMeter)
        info = meter.info()
    finally:
        meter.close()
    assert info.name == "rapl"
    assert info.domains == ("cpu", "dram")
    assert info.sources == {"cpu": "measured", "dram": "measured"}
    assert info.devices == ("package-0 (intel-rapl:0)", "dram-0 (intel-rapl:0:1)")
    assert info.details["root"] == str(intel.root)
    assert "core (intel-rapl:0:0)" in info.details["zones_not_added"]
    resolution = info.resolution
    assert resolution.update_period_measured
    assert resolution.update_period_s is not None
    # The fake writes every 2 ms; sleeping and scheduling only lengthen the interval.
    assert 0.001 <= resolution.update_period_s <= 0.02
    assert resolution.energy_quantum_j == pytest.approx(1e-6)


def test_packages_are_summed_and_core_psys_and_mmio_are_not_added(tmp_path: Path) -> None:
    zones = intel_zones(2, package_w=10.0, core_w=8.0, dram_w=None, psys_w=50.0)
    zones.append(FakeZone("intel-rapl-mmio:0", "package-0", 10.0))
    with FakeRaplTree(tmp_path / "powercap", zones) as tree:
        meter = RaplMeter(tree.root, cpu_vendor=INTEL)
        try:
            reading = _window(meter, 0.5, tree)
            details = meter.info().details
        finally:
            meter.close()
    _assert_watts(reading, "cpu", 20.0, tree)
    assert set(reading.domains["cpu"].devices) == {"package-0", "package-1"}
    assert "psys (intel-rapl:2)" in details["zones_not_added"]
    assert "intel-rapl-mmio" not in " ".join(meter.info().devices)


def test_amd_has_no_dram_zone_so_dram_is_not_measured(tmp_path: Path) -> None:
    with FakeRaplTree(tmp_path / "powercap", amd_zones()) as tree:
        meter = RaplMeter(tree.root, cpu_vendor="AuthenticAMD")
        try:
            reading = _window(meter, 0.3, tree)
            info = meter.info()
        finally:
            meter.close()
    _assert_watts(reading, "cpu", 10.0, tree)
    dram = reading.domains["dram"]
    assert dram.energy_j is None
    assert dram.reason == "no dram RAPL zone"
    assert info.domains == ("cpu",)
    assert info.details["dram"] == "not covered: no dram RAPL zone"


@pytest.mark.parametrize(("vendor", "watts"), [("AuthenticAMD", 10.0), (INTEL, 20.0)])
def test_per_die_package_zones_count_once_per_socket_on_amd_only(
    tmp_path: Path, vendor: str, watts: float
) -> None:
    zones = [
        FakeZone("intel-rapl:0", "package-0-die-0", 10.0),
        FakeZone("intel-rapl:1", "package-0-die-1", 10.0),
    ]
    with FakeRaplTree(tmp_path / "powercap", zones) as tree:
        meter = RaplMeter(tree.root, cpu_vendor=vendor)
        try:
            reading = _window(meter, 0.3, tree)
            details = meter.info().details
        finally:
            meter.close()
    _assert_watts(reading, "cpu", watts, tree)
    if vendor == INTEL:
        assert set(reading.domains["cpu"].devices) == {"package-0-die-0", "package-0-die-1"}
    else:
        assert "repeats package-0-die-0" in details["zones_not_added"]


def test_nested_layout_is_found(tmp_path: Path) -> None:
    with FakeRaplTree(tmp_path / "powercap", intel_zones(), nested=True) as tree:
        meter = RaplMeter(tree.root, cpu_vendor=INTEL)
        try:
            reading = _window(meter, 0.2)
        finally:
            meter.close()
    assert set(reading.domains) == {"cpu", "dram"}
    assert _energy(reading, "dram") > 0


def test_counter_wrapping_several_times_in_one_window_is_counted(tmp_path: Path) -> None:
    # A 1 J range at 10 W wraps every 0.1 s: five times in the window.
    zones = intel_zones(dram_w=None, core_w=None, max_energy_range_uj=1_000_000)
    with FakeRaplTree(tmp_path / "powercap", zones) as tree:
        meter = RaplMeter(tree.root, max_power_w=40.0, cpu_vendor=INTEL)
        try:
            assert meter.info().details["poll_s"] == "0.00625"
            wraps_before = tree.zones["intel-rapl:0"].wraps
            reading = _window(meter, 0.5, tree)
            wraps = tree.zones["intel-rapl:0"].wraps - wraps_before
        finally:
            meter.close()
    assert wraps >= 3
    _assert_watts(reading, "cpu", 10.0, tree)
    assert any("wrap-around(s) counted" in note for note in reading.notes)


def test_single_wrap_between_the_edge_reads_adds_the_range(tmp_path: Path) -> None:
    range_uj = 5_000_000
    zones = intel_zones(dram_w=None, core_w=None, max_energy_range_uj=range_uj)
    with FakeRaplTree(tmp_path / "powercap", zones) as tree:
        meter = RaplMeter(tree.root, poll_s=60.0, cpu_vendor=INTEL)
        try:
            tree.set_energy("intel-rapl:0", range_uj - 500_000)
            wraps_before = tree.zones["intel-rapl:0"].wraps
            reading = _window(meter, 0.3, tree)
            assert tree.zones["intel-rapl:0"].wraps - wraps_before == 1
        finally:
            meter.close()
    _assert_watts(reading, "cpu", 10.0, tree)
    assert "1 wrap-around(s) counted" in reading.notes[0]


def test_a_counter_reset_is_an_error_not_a_huge_energy(intel: FakeRaplTree) -> None:
    meter = RaplMeter(intel.root, poll_s=60.0, cpu_vendor=INTEL)
    try:
        meter.start()
        time.sleep(0.05)
        intel.set_energy("intel-rapl:0", 0)
        with pytest.raises(EnergyMeterError, match="counter reset"):
            meter.stop()
    finally:
        meter.close()


def test_lap_reads_mid_window_and_leaves_it_open(intel: FakeRaplTree) -> None:
    meter = RaplMeter(intel.root, cpu_vendor=INTEL)
    try:
        intel.reset_tick_gap()
        meter.start()
        time.sleep(0.3)
        lap = meter.lap()
        assert _poll_threads()
        time.sleep(0.2)
        final = meter.stop()
    finally:
        meter.close()
    _assert_watts(lap, "cpu", 10.0, intel)
    assert _energy(final, "cpu") > _energy(lap, "cpu")
    assert final.duration_s > lap.duration_s
    assert not _poll_threads()
    with pytest.raises(EnergyMeterError, match="without start"):
        meter.lap()


def test_a_slow_counter_is_not_taken_for_a_fast_one(tmp_path: Path) -> None:
    # A counter updated every 0.15 s changes at most twice in the 0.3 s probe; today's RAPL
    # is ~1 ms, but assuming that here would make windows 150 x too short.
    with FakeRaplTree(tmp_path / "powercap", intel_zones(), update_period_s=0.15) as tree:
        meter = RaplMeter(tree.root, cpu_vendor=INTEL)
        try:
            resolution = meter.info().resolution
        finally:
            meter.close()
    assert resolution.update_period_s is not None
    # the writer only ever runs late; a late poll of the probe may shorten one interval
    assert resolution.update_period_s >= 0.075


def test_window_shorter_than_an_update_is_never_zero_joules(tmp_path: Path) -> None:
    with FakeRaplTree(tmp_path / "powercap", intel_zones(), update_period_s=3600.0) as tree:
        meter = RaplMeter(
            tree.root, cpu_vendor=INTEL, update_period_probe_s=0.05, update_period_probe_max_s=0.2
        )
        try:
            resolution = meter.info().resolution
            reading = _window(meter, 0.01)
        finally:
            meter.close()
    assert not resolution.update_period_measured
    assert resolution.update_period_s is not None
    assert resolution.update_period_s >= 0.2  # as slow as the probe at least
    assert resolution.note is not None
    assert "assumed" in resolution.note
    for domain in ("cpu", "dram"):
        assert reading.domains[domain].energy_j is None
        assert "did not advance" in (reading.domains[domain].reason or "")
        assert reading.domains[domain].devices == {}


def test_garbage_read_is_retried(intel: FakeRaplTree, monkeypatch: pytest.MonkeyPatch) -> None:
    meter = RaplMeter(intel.root, cpu_vendor=INTEL)
    real_sleep = time.sleep
    sleeps: list[float] = []

    def sleep_then_repair(seconds: float) -> None:
        if not sleeps:
            intel.resume()  # the file was being rewritten; the next read sees a number
        sleeps.append(seconds)
        real_sleep(seconds)

    try:
        intel.write_raw("intel-rapl:0", "")  # as a file caught while being rewritten
        monkeypatch.setattr(time, "sleep", sleep_then_repair)
        meter.start()
        monkeypatch.undo()
        reading = _window_end(meter, 0.1)
    finally:
        meter.close()
    assert len(sleeps) == 1
    assert _energy(reading, "cpu") > 0


def _window_end(meter: RaplMeter, seconds: float) -> EnergyReading:
    time.sleep(seconds)
    return meter.stop()


def test_persistent_garbage_is_an_error(intel: FakeRaplTree) -> None:
    meter = RaplMeter(intel.root, cpu_vendor=INTEL)
    try:
        intel.write_raw("intel-rapl:0", "garbage\n")
        with pytest.raises(EnergyMeterError, match=r"failed 5 times .*unexpected content"):
            meter.start()
    finally:
        meter.close()
        intel.resume()
    intel.write_raw("intel-rapl:0", "")
    with pytest.raises(MeterUnavailableError, match="failed 5 times"):
        RaplMeter(intel.root, cpu_vendor=INTEL)


def test_missing_root_is_unavailable_with_the_reason(tmp_path: Path) -> None:
    missing = tmp_path / "no-powercap"
    with pytest.raises(MeterUnavailableError) as info:
        RaplMeter(missing)
    assert info.value.meter == "rapl"
    assert info.value.reason.startswith(f"no powercap folder at {missing}")
    assert rapl_unavailable_reason(missing) == info.value.reason


def test_root_without_rapl_zones_is_unavailable(tmp_path: Path) -> None:
    tree = FakeRaplTree(tmp_path / "powercap", [FakeZone("intel-rapl-mmio:0", "package-0", 5.0)])
    reason = rapl_unavailable_reason(tree.root)
    assert reason is not None
    assert reason.startswith("no RAPL package zone under")
    with pytest.raises(MeterUnavailableError, match="no RAPL package zone"):
        RaplMeter(tree.root)


def test_root_comes_from_the_environment(
    intel: FakeRaplTree, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ROOT_ENV_VAR, str(intel.root))
    assert rapl_unavailable_reason() is None
    meter = RaplMeter(cpu_vendor=INTEL)
    try:
        assert meter.info().details["root"] == str(intel.root)
    finally:
        meter.close()


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder every user may enter (pytest's tmp_path is private to its owner)."""
    path = Path(tempfile.mkdtemp(prefix="llem-rapl-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _in_child_as_nobody(body: Callable[[], str]) -> str:
    """Run ``body`` in a forked child that dropped root for ``nobody``; return what it says."""
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            said = body()
        except BaseException as e:
            said = f"child failed: {e!r}"
        os.write(write_end, said.encode())
        os._exit(0)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    os.close(read_end)
    os.waitpid(pid, 0)
    return b"".join(chunks).decode()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork to drop root")
def test_unreadable_counter_is_unavailable_with_the_hint(shared_dir: Path) -> None:
    zones = intel_zones()
    for zone in zones:
        zone.readable = False  # mode 000, as root-only energy_uj is to a user
    tree = FakeRaplTree(shared_dir / "powercap", zones)

    def reasons() -> str:
        try:
            RaplMeter(tree.root, cpu_vendor=INTEL)
        except MeterUnavailableError as e:
            return f"{e.meter}|{e.reason}|{rapl_unavailable_reason(tree.root)}"
        return "the meter started"

    # As root every file is readable: check as an ordinary user, like the real restriction.
    said = _in_child_as_nobody(reasons) if os.geteuid() == 0 else reasons()
    meter, reason, helper_reason = said.split("|")
    assert meter == "rapl"
    assert reason == helper_reason
    assert "not readable by this user" in reason
    assert "PLATYPUS" in reason
    assert f"sudo chmod o+r {tree.root}/intel-rapl:*/energy_uj" in reason
    assert "reboot" in reason


def test_window_misuse_is_an_error(intel: FakeRaplTree) -> None:
    meter = RaplMeter(intel.root, cpu_vendor=INTEL)
    try:
        with pytest.raises(EnergyMeterError, match="without start"):
            meter.stop()
        meter.start()
        with pytest.raises(EnergyMeterError, match="already open"):
            meter.start()
    finally:
        meter.close()
    assert not _poll_threads()
    with pytest.raises(EnergyMeterError, match="closed"):
        meter.start()


@pytest.mark.parametrize("kwargs", [{"poll_s": 0.0}, {"max_power_w": -1.0}])
def test_bad_settings_are_configuration_errors(
    intel: FakeRaplTree, kwargs: dict[str, float]
) -> None:
    with pytest.raises(ConfigurationError, match="positive"):
        RaplMeter(intel.root, **kwargs)  # type: ignore[arg-type]


def test_microjoules_are_converted_exactly(tmp_path: Path) -> None:
    # No writer: the counters move only by hand, so the expected joules are exact.
    tree = FakeRaplTree(tmp_path / "powercap", intel_zones())
    meter = RaplMeter(
        tree.root, cpu_vendor=INTEL, update_period_probe_s=0.02, update_period_probe_max_s=0.02
    )
    try:
        meter.start()
        tree.add_energy("intel-rapl:0", 7_654_321)
        tree.add_energy("intel-rapl:0:1", 1_234_567)  # dram
        reading = meter.stop()
    finally:
        meter.close()
    assert _energy(reading, "cpu") == pytest.approx(7.654321, rel=1e-12)
    assert _energy(reading, "dram") == pytest.approx(1.234567, rel=1e-12)


def test_update_period_is_the_median_interval_not_the_smallest(tmp_path: Path) -> None:
    # The writer waits 4 ms, 30 ms, 30 ms, ...: two intervals in three are 30 ms or more
    # (a late writer only lengthens them), the smallest about 4 ms.
    pattern = (0.004, 0.03, 0.03)
    with FakeRaplTree(tmp_path / "powercap", intel_zones(), update_pattern_s=pattern) as tree:
        meter = RaplMeter(tree.root, cpu_vendor=INTEL)
        try:
            resolution = meter.info().resolution
        finally:
            meter.close()
    assert resolution.update_period_s is not None
    assert resolution.update_period_s >= 0.02

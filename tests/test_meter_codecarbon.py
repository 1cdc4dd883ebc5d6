"""Tests of the CodeCarbon meter against the real CodeCarbon (estimates on a machine without
RAPL or GPU)."""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_llem.exceptions import ConfigurationError, EnergyMeterError, MeterUnavailableError
from pytest_llem.meters.base import EnergyMeter, EnergyReading
from pytest_llem.meters.codecarbon import (
    INSTALL_HINT,
    CodeCarbonMeter,
    codecarbon_unavailable_reason,
)

pytest.importorskip("codecarbon", reason="codecarbon is not installed (pytest-llem[codecarbon])")

HAS_RAPL = Path("/sys/class/powercap/intel-rapl").exists()
HAS_NVIDIA = shutil.which("nvidia-smi") is not None


@pytest.fixture
def meter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[CodeCarbonMeter]:
    monkeypatch.chdir(tmp_path)
    meter = CodeCarbonMeter()
    yield meter
    meter.close()


def _window(meter: CodeCarbonMeter, seconds: float) -> EnergyReading:
    meter.start()
    time.sleep(seconds)
    return meter.stop()


def test_window_gives_cpu_and_dram_energy_and_no_gpu(
    meter: CodeCarbonMeter, tmp_path: Path
) -> None:
    reading = _window(meter, 0.2)
    cpu, dram, gpu = (reading.domains[d] for d in ("cpu", "dram", "gpu"))
    assert cpu.energy_j is not None
    assert cpu.energy_j > 0
    assert dram.energy_j is not None
    assert dram.energy_j > 0
    assert dram.source == "estimated"
    if not HAS_RAPL:
        assert cpu.source == "estimated"
    if not HAS_NVIDIA:
        assert gpu.energy_j is None
        assert gpu.reason is not None
        assert "no GPU" in gpu.reason
    assert reading.emissions_kg is not None
    assert reading.emissions_kg > 0
    assert reading.duration_s == pytest.approx(0.2, abs=0.1)
    assert list(tmp_path.iterdir()) == []


def test_energy_follows_window_length(meter: CodeCarbonMeter) -> None:
    short = _window(meter, 0.1)
    long = _window(meter, 0.3)
    short_j, long_j = short.domains["dram"].energy_j, long.domains["dram"].energy_j
    assert short_j is not None
    assert long_j is not None
    # CodeCarbon's RAM model is a constant power: energy / time is the same for both windows.
    assert long_j / long.duration_s == pytest.approx(short_j / short.duration_s, rel=0.1)


def test_info_describes_coverage_and_sources(meter: CodeCarbonMeter) -> None:
    assert isinstance(meter, EnergyMeter)
    info = meter.info()
    assert info.name == "codecarbon"
    assert {"cpu", "dram"} <= set(info.domains)
    assert info.sources["dram"] == "estimated"
    if not HAS_RAPL:
        assert info.sources["cpu"] == "estimated"
    if not HAS_NVIDIA:
        assert "gpu" not in info.domains
        assert info.details["gpu_method"].startswith("not covered")
    if not HAS_NVIDIA:  # estimates are power x time: nothing to quantise, no window floor
        assert info.resolution.update_period_s is None
        assert "not quantised" in (info.resolution.note or "")
    assert info.details["country_iso_code"] == "USA"
    assert "start_task" in info.details["window_method"]


def test_stop_returning_none_is_an_error(
    meter: CodeCarbonMeter, monkeypatch: pytest.MonkeyPatch
) -> None:
    def stop_task(task_name: str | None = None) -> Any:
        return None

    meter.start()
    monkeypatch.setattr(meter._tracker, "stop_task", stop_task)
    with pytest.raises(EnergyMeterError, match="returned no data"):
        meter.stop()


def test_stop_task_failure_is_chained(
    meter: CodeCarbonMeter, monkeypatch: pytest.MonkeyPatch
) -> None:
    def stop_task(task_name: str | None = None) -> Any:
        raise RuntimeError("boom")

    meter.start()
    monkeypatch.setattr(meter._tracker, "stop_task", stop_task)
    with pytest.raises(EnergyMeterError, match="boom") as info:
        meter.stop()
    assert isinstance(info.value.__cause__, RuntimeError)


def test_window_misuse_is_an_error(meter: CodeCarbonMeter) -> None:
    with pytest.raises(EnergyMeterError, match="without start"):
        meter.stop()
    meter.start()
    with pytest.raises(EnergyMeterError, match="already open"):
        meter.start()
    meter.close()
    with pytest.raises(EnergyMeterError, match="closed"):
        meter.start()


def test_unknown_country_is_a_configuration_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigurationError, match="XXX"):
        CodeCarbonMeter(country_iso_code="XXX")


def test_not_installed_is_unavailable_with_the_install_hint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "codecarbon", None)
    assert codecarbon_unavailable_reason() is not None
    with pytest.raises(MeterUnavailableError) as info:
        CodeCarbonMeter()
    assert info.value.meter == "codecarbon"
    assert info.value.reason == INSTALL_HINT

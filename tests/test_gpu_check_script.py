"""scripts/gpu_check.py's study, dry-run on the fake pynvml with a CPU stand-in for the load,
so the script a lent GPU runs is known to work before the GPU is there."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

from pytest_llem.backends.base import MemoryUsage
from pytest_llem.meters.nvml import NvmlMeter
from tests.fakes.fake_pynvml import FakeGpu, install

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    return module


class SleepLoad:
    """Stands in for the matrix-multiply load: the fake GPU draws its power regardless."""

    def run_for(self, seconds: float) -> None:
        time.sleep(seconds)

    def synchronize(self) -> None:
        """Nothing queued."""

    def reset_peak_memory(self) -> None:
        """Nothing to reset."""

    def peak_memory(self) -> MemoryUsage:
        return MemoryUsage(None, "unavailable")


def test_study_runs_and_passes_on_a_steady_fake_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, [FakeGpu(power_w=300.0, counter_step_s=0.01)])
    gpu_check = _script()
    meter = NvmlMeter([0])
    try:
        figures = gpu_check.study(meter, SleepLoad(), scale=0.1)
    finally:
        meter.close()
    by_check = {f.check: f for f in figures}
    assert by_check["energy counter update period"].passed
    assert by_check["idle baselines (2 x 5 s)"].passed
    assert by_check["counter vs power, 10 s load"].passed
    assert by_check["0.3 s workload, extended"].passed
    assert "rounds" in by_check["0.3 s workload, extended"].value
    assert "a single 0.3 s window lasts" in by_check["window floor (20 x period)"].value


def test_without_a_gpu_the_script_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    install(monkeypatch, library_found=False)
    assert _script().main(["--skip-tests"]) == 2
    assert "no usable GPU: NVML library not found" in capsys.readouterr().out

"""Checks that need a real NVIDIA GPU (marked ``gpu``; skipped with the reason elsewhere).

``scripts/gpu_check.py`` runs these and a short measurement study on a lent GPU.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

pytest_plugins = ["pytester"]


def _busy(seconds: float) -> None:
    import torch

    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        a @ a
        torch.cuda.synchronize()


def test_nvml_measures_the_update_period_and_a_load() -> None:
    from pytest_llem.meters.nvml import NvmlMeter

    meter = NvmlMeter([0])
    try:
        resolution = meter.info().resolution
        assert resolution.update_period_measured
        assert resolution.update_period_s is not None
        assert 0.001 < resolution.update_period_s < 1.0
        meter.start()
        time.sleep(1.0)
        idle = meter.stop()
        meter.start()
        _busy(2.0)
        busy = meter.stop()
        idle_gpu, busy_gpu = idle.domains["gpu"], busy.domains["gpu"]
        assert idle_gpu.energy_j is not None
        assert busy_gpu.energy_j is not None
        assert busy_gpu.energy_j / busy.duration_s > idle_gpu.energy_j / idle.duration_s
        assert busy.timelines
        assert abs(busy.cross_check["gpu"]) < 0.05
        assert busy.start_states["gpu0"].temperature_c is not None
        assert os.getpid() in {pid for pid, _ in meter.running_processes()["gpu0"]}
    finally:
        meter.close()


def test_tiny_model_on_cuda_through_pytest(pytester: pytest.Pytester, tiny_model: Path) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.llem(batch_size=4, max_new_tokens=16, min_new_tokens=16, num_prompts=8)
        def test_cuda(llem):
            llem.run()
        """
    )
    result = pytester.runpytest(
        "-p",
        "no:cacheprovider",
        "--llem-device=cuda",
        "--llem-meter=nvml",
        "--llem-set=dtype=bfloat16",
        "--llem-baseline-s=2",
    )
    result.assert_outcomes(passed=1)
    record = json.loads((pytester.path / "reports" / "llem-report.json").read_text())
    (case,) = record["cases"]
    assert case["metrics"]["gpu_energy_j"]["source"] == "measured"
    assert case["metrics"]["energy_per_output_token_j"]["median"] > 0
    assert case["metrics"]["dynamic_energy_j"]["median"] is not None
    assert case["repetitions"][0]["peak_memory_kind"] == "cuda_allocated"
    assert case["repetitions"][0]["power_timeline"]
    assert record["baseline"]["domains"]["gpu"]["source"] == "measured"

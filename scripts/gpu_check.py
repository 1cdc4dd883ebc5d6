"""The GPU check: run the ``gpu``-marked tests and a short measurement study on one NVIDIA GPU.

Usage (from the repository root, on a machine with a GPU, pytest-llem installed)::

    python scripts/gpu_check.py            # about 3 minutes
    python scripts/gpu_check.py --skip-tests

The study checks what docs/methodology.md relies on, and prints a figure table at the end:

1. the NVML energy counter's update period is detected at meter start-up;
2. two idle baselines agree within 5%;
3. over a ten-second matrix-multiply load, the counter and the integrated power samples agree
   within 2% (``counter_vs_power_diff``);
4. a 0.3 s workload is extended automatically by the runner, and its average power is within 5%
   of a long window's, while a naive 0.3 s window is shown for contrast.

Exit status: 0 when every check passes, 1 when one fails, 2 when there is no usable GPU.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pytest_llem.backends.base import MemoryUsage
from pytest_llem.exceptions import MeterUnavailableError
from pytest_llem.harness.baseline import measure_baseline
from pytest_llem.harness.runner import WindowPolicy, measure_extended_window, measure_window
from pytest_llem.harness.scenarios import Mark, Workload, WorkloadRun
from pytest_llem.meters.nvml import NvmlMeter


@dataclass
class Figure:
    """One row of the final table."""

    check: str
    value: str
    bound: str
    passed: bool | None


class MatmulLoad:
    """A steady GPU load: back-to-back bf16 matrix multiplies on CUDA device 0."""

    def __init__(self, size: int = 8192) -> None:
        import torch

        self.torch = torch
        self.a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
        self.b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)

    def run_for(self, seconds: float) -> None:
        """Keep the GPU busy for about ``seconds``, then wait for it to finish."""
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            for _ in range(4):
                self.a @ self.b
            self.torch.cuda.synchronize()

    # The three Backend methods a measurement window calls.
    def synchronize(self) -> None:
        self.torch.cuda.synchronize()

    def reset_peak_memory(self) -> None:
        self.torch.cuda.reset_peak_memory_stats()

    def peak_memory(self) -> MemoryUsage:
        return MemoryUsage(self.torch.cuda.max_memory_allocated() / 2**20, "cuda_allocated")


def _workload(load: MatmulLoad, seconds: float) -> Workload:
    def run(mark: Mark) -> WorkloadRun:
        del mark
        load.run_for(seconds)
        return WorkloadRun(generations=[])

    return Workload(run=run, requests=0, scenario="offline")


def _gpu_energy(reading_domains: dict[str, Any]) -> float | None:
    gpu = reading_domains.get("gpu")
    return None if gpu is None else gpu.energy_j


def run_gpu_tests() -> Figure:
    """Run ``pytest -m gpu tests/`` and report its outcome."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests/"],
        capture_output=True,
        text=True,
        check=False,
    )
    tail = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
    print(done.stdout[-3000:], done.stderr[-2000:], sep="\n")
    return Figure(
        "gpu-marked tests",
        f"{tail} ({time.perf_counter() - started:.0f} s)",
        "exit 0",
        done.returncode == 0,
    )


def study(meter: NvmlMeter, load: MatmulLoad, *, scale: float = 1.0) -> list[Figure]:
    """The measurement study; each check becomes one figure.

    ``scale`` shortens every duration (tests run the study on a fake GPU with a small one).
    """
    figures: list[Figure] = []
    info = meter.info()
    period = info.resolution.update_period_s
    figures.append(
        Figure(
            "energy counter update period",
            f"{period:.4f} s" if period else "unknown",
            "measured at start-up",
            info.resolution.update_period_measured,
        )
    )
    first = measure_baseline([meter], seconds=5.0 * scale, assignment={"gpu": "nvml"})
    second = measure_baseline([meter], seconds=5.0 * scale, assignment={"gpu": "nvml"})
    a, b = first.domains["gpu"].idle_power_w, second.domains["gpu"].idle_power_w
    gap = abs(a - b) / max(a, b)
    figures.append(
        Figure("idle baselines (2 x 5 s)", f"{a:.2f} W, {b:.2f} W ({gap:.2%})", "< 5%", gap < 0.05)
    )

    load.run_for(1.0 * scale)  # warm up clocks and kernels outside any window
    meter.start()
    load.run_for(10.0 * scale)
    reading = meter.stop()
    diff = reading.cross_check.get("gpu")
    energy = _gpu_energy(reading.domains)
    long_power = energy / reading.duration_s if energy is not None else None
    figures.append(
        Figure(
            "counter vs power, 10 s load",
            f"{diff:+.3%} at {long_power:.1f} W" if diff is not None and long_power else "n/a",
            "|diff| < 2%",
            diff is not None and abs(diff) < 0.02,
        )
    )
    timeline = reading.timelines[0] if reading.timelines else None
    if timeline is not None:
        figures.append(
            Figure(
                "power timeline",
                f"{timeline.samples} samples every {timeline.period_s * 1000:.1f} ms "
                f"({timeline.method}), {len(timeline.watts)} points kept",
                "<= 200 points",
                len(timeline.watts) <= 200,
            )
        )

    naive = []
    for _ in range(5):
        meter.start()
        load.run_for(0.3)
        r = meter.stop()
        e = _gpu_energy(r.domains)
        if e is not None:
            naive.append(e / r.duration_s)
    policy = WindowPolicy.for_meters(min_window_s=1.0, update_periods=[period])
    backend: Any = load  # the three Backend methods a window calls are all it needs
    window = measure_extended_window(
        backend, [meter], _workload(load, 0.3), time.perf_counter, 1, policy
    )
    e = _gpu_energy(window.readings[0].domains)
    extended_power = e / window.duration_s if e is not None else None
    if not (long_power and extended_power):
        figures.append(
            Figure(
                "0.3 s workload, extended",
                "no energy from the long or the extended window",
                "|diff| < 5%",
                False,
            )
        )
    else:
        off = extended_power / long_power - 1
        spread = [p / long_power - 1 for p in naive]
        figures.append(
            Figure(
                f"naive 0.3 s windows ({len(spread)} with energy of 5)",
                f"{min(spread):+.1%} to {max(spread):+.1%} vs the 10 s window"
                if spread
                else "the counter never advanced",
                "for contrast",
                None,
            )
        )
        figures.append(
            Figure(
                "0.3 s workload, extended",
                f"{window.rounds} rounds, {window.duration_s:.2f} s, {off:+.2%} vs the 10 s window",
                "|diff| < 5%",
                abs(off) < 0.05,
            )
        )
    one = measure_window(backend=backend, meters=[meter], workload=_workload(load, 0.3))
    figures.append(
        Figure(
            "window floor (20 x period)",
            f"{policy.floor_s:.2f} s; a single 0.3 s window lasts {one.duration_s:.2f} s",
            "a window below the floor has no energy",
            None,
        )
    )
    return figures


def _print_table(figures: list[Figure], header: Callable[[str], None] = print) -> None:
    widths = [max(len(f.check) for f in figures), max(len(f.value) for f in figures)]
    header("")
    header("pytest-llem GPU check")
    for f in figures:
        verdict = "info" if f.passed is None else ("PASS" if f.passed else "FAIL")
        print(f"{f.check.ljust(widths[0])}  {f.value.ljust(widths[1])}  {f.bound}  {verdict}")


def main(argv: list[str] | None = None) -> int:
    """Run the check; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-tests", action="store_true", help="only the measurement study")
    args = parser.parse_args(argv)
    try:
        meter = NvmlMeter([0])
    except MeterUnavailableError as e:
        print(f"no usable GPU: {e.reason}")
        return 2
    figures: list[Figure] = []
    try:
        info = meter.info()
        print("GPU:", *info.devices, f"driver {info.details.get('driver_version')}")
        figures.extend(study(meter, MatmulLoad()))
    finally:
        meter.close()
    if not args.skip_tests:
        figures.insert(0, run_gpu_tests())
    _print_table(figures)
    failed = [f for f in figures if f.passed is False]
    print(f"\n{len(failed)} check(s) failed" if failed else "\nall checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    threading.current_thread().name = "gpu-check"
    sys.exit(main())

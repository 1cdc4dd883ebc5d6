"""Benchmark: a six-case sweep in one pytest invocation against six invocations of one case
each, measured in one run as a ratio of wall-clock times. One invocation imports the engine and
loads the model once and reuses it; six invocations pay for both six times."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

SWEEP = """
import pytest

@pytest.mark.llem(num_prompts=4, max_new_tokens=8, min_new_tokens=8, repeat=2, warmup=1)
@pytest.mark.llem_sweep(batch_size=[1, 2, 4], max_new_tokens=[4, 8])
def test_sweep(llem):
    llem.run()
"""

TARGET = 0.5


def _pytest(folder: Path, *args: str) -> float:
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--llem-meter=none",
         *args],
        cwd=folder,
        check=True,
        capture_output=True,
    )  # fmt: skip
    return time.perf_counter() - started


def test_one_sweep_costs_well_under_six_invocations(tmp_path: Path, tiny_model: Path):
    (tmp_path / "test_sweep.py").write_text(SWEEP)
    ids = [f"bs{bs}-out{out}" for bs in (1, 2, 4) for out in (4, 8)]
    _pytest(tmp_path, "--collect-only")  # warm the file system cache for both
    together = _pytest(tmp_path, "test_sweep.py")
    apart = sum(_pytest(tmp_path, f"test_sweep.py::test_sweep[{case}]") for case in ids)
    ratio = together / apart
    print(
        f"\nsix-case sweep in one invocation / six invocations: {ratio:.2f} "
        f"({together:.1f} s vs {apart:.1f} s), llem-tiny on CPU"
    )
    assert ratio < TARGET

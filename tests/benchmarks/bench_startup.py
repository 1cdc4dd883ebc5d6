"""Benchmark: the fixed start-up cost of a sweep, against the floor the engine itself sets.

A sweep of llem-tiny on the transformers backend (CPU, ``--llem-meter=none`` so that no meter's
own start-up or idle baseline is in the figure) runs in a fresh ``python -m pytest``, one point
and three points alternately, ``REPEATS`` times each. Measured from launching the process to
the first measured window (the first ``start()`` of the meter) and to the process's exit; from
those, the cost of each extra point and the fixed cost. The floor is what any harness pays
before it can measure: a fresh interpreter that imports torch and transformers, loads
llem-tiny with the Auto classes and generates once (the warmup), measured the same way. The
plugin's own import is measured as a trivial pytest run with and without it (``-p no:llem``).

The machine may be shared: every figure is the median of ``REPEATS`` runs, and the assertion
is on a ratio measured within this run. Run with ``tox -e bench``.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPEATS = 5
#: pytest start to first window may cost at most this much more than the engine's floor.
TARGET = 1.6

SWEEP = """
import pytest

@pytest.mark.llem(num_prompts=4, max_new_tokens=8, min_new_tokens=8)
@pytest.mark.llem_sweep(batch_size={points})
def test_sweep(llem):
    llem.run()
"""

# Notes the monotonic clock (system-wide on Linux) at the first window's meter start.
CONFTEST = """
import os
import time

from pytest_llem.meters.none import NoneMeter

_start = NoneMeter.start


def _noting_start(self):
    path = os.environ["LLEM_BENCH_FIRST_WINDOW"]
    if not os.path.exists(path):
        with open(path, "w") as fh:
            fh.write(repr(time.monotonic()))
    _start(self)


NoneMeter.start = _noting_start
"""

FLOOR = """
import sys
import time

import torch
import transformers

folder = sys.argv[1]
tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
tokenizer.padding_side = "left"
model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
batch = tokenizer(["Why is the sky blue?"] * 4, return_tensors="pt", padding=True)
with torch.inference_mode():
    model.generate(
        **batch, max_new_tokens=8, min_new_tokens=8, do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
print(repr(time.monotonic()))
"""


def _sweep(folder: Path, name: str) -> tuple[float, float]:
    """Seconds from launch to the first window and to exit of ``pytest name``."""
    marker = folder / "first-window"
    marker.unlink(missing_ok=True)
    env = dict(os.environ, LLEM_BENCH_FIRST_WINDOW=str(marker))
    started = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--llem-meter=none",
         "--llem-device=cpu", name],
        cwd=folder,
        env=env,
        check=True,
        capture_output=True,
    )  # fmt: skip
    ended = time.monotonic()
    return float(marker.read_text()) - started, ended - started


def _floor(folder: Path, model: Path) -> float:
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, str(folder / "floor.py"), str(model)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return float(out.strip().splitlines()[-1]) - started


def _trivial(folder: Path, *args: str) -> float:
    started = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args, "test_plain.py"],
        cwd=folder,
        check=True,
        capture_output=True,
    )
    return time.monotonic() - started


def test_start_up_cost_of_a_sweep(tmp_path: Path, tiny_model: Path) -> None:
    (tmp_path / "test_one.py").write_text(SWEEP.format(points=[1]))
    (tmp_path / "test_three.py").write_text(SWEEP.format(points=[1, 2, 4]))
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "floor.py").write_text(FLOOR)
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "test_plain.py").write_text("def test_plain():\n    pass\n")
    _sweep(tmp_path, "test_one.py")  # warm the file system cache for all
    runs: dict[str, list[float]] = {k: [] for k in ("first", "end1", "end3", "floor", "on", "off")}
    for _ in range(REPEATS):  # interleaved, so that drift of the machine affects all alike
        first, end1 = _sweep(tmp_path, "test_one.py")
        runs["first"].append(first)
        runs["end1"].append(end1)
        first, end3 = _sweep(tmp_path, "test_three.py")
        runs["first"].append(first)
        runs["end3"].append(end3)
        runs["floor"].append(_floor(tmp_path, tiny_model))
        runs["on"].append(_trivial(plain))
        runs["off"].append(_trivial(plain, "-p", "no:llem"))
    m = {k: statistics.median(v) for k, v in runs.items()}
    per_point = (m["end3"] - m["end1"]) / 2
    ratio = m["first"] / m["floor"]
    print(
        f"\npytest start to first window / engine floor: {ratio:.2f} "
        f"({m['first']:.2f} s vs {m['floor']:.2f} s: import torch and transformers, load "
        f"llem-tiny, generate once)\n"
        f"three-point sweep end to end {m['end3']:.2f} s; each extra point {per_point:.2f} s; "
        f"fixed cost {m['end1'] - per_point:.2f} s = {(m['end1'] - per_point) / per_point:.1f} "
        f"extra points\n"
        f"a one-test pytest run with / without the plugin: {m['on'] / m['off']:.2f} "
        f"({m['on']:.2f} s vs {m['off']:.2f} s: the plugin's import)\n"
        f"medians of {REPEATS} interleaved runs each, llem-tiny on CPU, --llem-meter=none"
    )
    assert ratio < TARGET, f"start-up costs {ratio:.2f}x the engine's floor (target {TARGET})"

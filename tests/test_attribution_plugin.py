"""Energy per request through pytest (the issue's Done-when): a 12 W fake RAPL tree, a paced
fake engine and ``scenario="single_stream"``; every repetition's books balance, prefill plus
decode make each request's energy, and a 24-token request gets clearly more than a 2-token one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

pytest_plugins = ["pytester"]

CONFTEST = """
from tests.fakes.fake_backend import FakeBackend, WallClock


def pytest_llem_backend_names():
    return ["paced"]


def pytest_llem_make_backend(name, case, progress):
    if name == "paced":
        # 20 ms to the first token, 5 ms per further token; request 0 makes 24, request 1 two
        return FakeBackend(WallClock(), prefill_s=0.02, step_s=0.005, lengths={0: 24, 1: 2})
    return None
"""

CASE = """
import pytest

@pytest.mark.llem(scenario="single_stream", max_new_tokens=8, num_prompts=3)
def test_stream(llem):
    llem.run()
"""


def _record(pytester: pytest.Pytester) -> dict[str, Any]:
    return json.loads((pytester.path / "reports" / "llem-report.json").read_text())


def test_single_stream_on_a_12_w_rapl_tree_balances_its_books(
    pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.fakes.fake_rapl import FakeRaplTree, intel_zones

    root = tmp_path / "powercap"
    monkeypatch.setenv("LLEM_RAPL_ROOT", str(root))
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(CASE)
    tree = FakeRaplTree(root, intel_zones(package_w=12.0, dram_w=None, core_w=6.0))
    with tree:
        result = pytester.runpytest(
            "-p", "no:cacheprovider", "--llem-backend=paced", "--llem-meter=rapl",
            "--llem-baseline-s=0.3", "--llem-min-window-s=0.3", "--llem-warmup=1",
            "--llem-repeat=3",
        )  # fmt: skip
    result.assert_outcomes(passed=1)
    (case,) = _record(pytester)["cases"]
    for rep in case["repetitions"]:
        per_request = rep["per_request"]
        assert len(per_request) == 3 * rep["rounds"]
        books = math.fsum(r["energy_j"] for r in per_request) + rep["unattributed_energy_j"]
        assert books == pytest.approx(rep["energy_j"], rel=0.01)
        for r in per_request:
            assert r["prefill_energy_j"] + r["decode_energy_j"] == pytest.approx(r["energy_j"])
        long_ones = [r["energy_j"] for r in per_request if r["output_tokens"] == 24]
        short_ones = [r["energy_j"] for r in per_request if r["output_tokens"] == 2]
        assert min(long_ones) > 2 * max(short_ones)
        attribution = rep["attribution"]
        assert attribution["timeline"] == "engine"
    metrics = case["metrics"]
    for name in ("request_energy_j.p50", "request_energy_j.p99", "prefill_energy_j"):
        assert metrics[name]["source"] == "attributed"
        assert metrics[name]["unit"] == "J"
    assert metrics["decode_energy_j"]["median"] > 0

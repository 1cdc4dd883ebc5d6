"""``llem.capacity`` and ``llem.search`` as a test uses them: against a loopback
OpenAI-compatible server with a known capacity (4 slots, 9 tokens of 10 ms: 90 ms a request,
4 / 0.09 = 44.4 requests/s), and on the tiny model over batch sizes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.paced_server import PacedServer, running_paced_server

QUICK = ["--llem-warmup=0", "-p", "no:cacheprovider"]
SLOTS, STEP_S, TOKENS = 4, 0.01, 9
CAPACITY = SLOTS / (STEP_S * TOKENS)

SERVER_CASE = """
import pytest

pytestmark = pytest.mark.llem(
    backend="endpoint", model="llem-tiny", endpoint={{"url": "{url}"}},
    max_new_tokens=9, min_new_tokens=9, repeat=1,
    traffic={{"num_requests": 200, "rate": 30.0, "arrival": "{arrival}"}},
)
"""


@pytest.fixture
def slotted() -> Iterator[PacedServer]:
    with running_paced_server(interval_s=STEP_S, slots=SLOTS) as server:
        yield server


def _record(pytester: pytest.Pytester) -> dict[str, Any]:
    return dict(json.loads((pytester.path / "reports" / "llem-report.json").read_text()))


def _rapl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    from tests.fakes.fake_rapl import FakeRaplTree, intel_zones

    root = tmp_path / "powercap"
    monkeypatch.setenv("LLEM_RAPL_ROOT", str(root))
    zones = intel_zones(package_w=12.0, dram_w=None, core_w=6.0)
    return FakeRaplTree(root, zones, update_period_s=0.01)


@pytest.mark.slow
def test_capacity_of_a_slotted_server_is_the_analytical_one(
    pytester: pytest.Pytester, tiny_model: Path, slotted: PacedServer
) -> None:
    # Constant arrivals: below 44.4 requests/s nothing queues; above, the queue grows
    # through the run (saturated) and the last requests miss 400 ms.
    pytester.makepyfile(
        SERVER_CASE.format(url=slotted.url, arrival="constant")
        + """
def test_capacity(llem):
    cap = llem.capacity(slo={"e2e_ms": 400}, tolerance=0.05)
    print("CAPACITY", cap.rate_rps)
    assert cap.result is not None and cap.result.params["traffic"]["rate"] == cap.rate_rps
    assert cap.good_fraction >= 0.9
    assert any(p.saturated for p in cap.tried)
"""
    )
    result = pytester.runpytest(*QUICK, "--llem-meter=none", "-s")
    result.assert_outcomes(passed=1)
    (line,) = [line for line in result.outlines if line.startswith("CAPACITY")]
    found = float(line.split()[1])
    # Within the tolerance below the analytical value, with 5% more room for a busy machine
    # (a late step of the server is not made up for: its capacity can only drop).
    assert CAPACITY * (1 - 0.05 - 0.05) <= found <= CAPACITY * 1.05


@pytest.mark.slow
def test_capacity_holds_in_a_check_run_and_breaks_at_1_4_times(
    pytester: pytest.Pytester,
    tiny_model: Path,
    slotted: PacedServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The issue's Done-when: seeded Poisson arrivals, a check at the answer and 1.4 times."""
    pytester.makepyfile(
        SERVER_CASE.format(url=slotted.url, arrival="poisson")
        + """
SLO = {"e2e_ms": 400}

def test_capacity(llem):
    cap = llem.capacity(slo=SLO)
    assert cap.rate_rps is not None
    assert cap.result["energy_per_good_request_j"].median > 0
    # Separate runs of the same seeded workload (its requests and arrival schedule).
    check = llem.run(scenario="server", slo=SLO, traffic={"rate": cap.rate_rps})
    over = llem.run(scenario="server", slo=SLO, traffic={"rate": 1.4 * cap.rate_rps})
    print("FRACTIONS", check["slo_met_fraction"].median, over["slo_met_fraction"].median)
    assert check["slo_met_fraction"].median >= 0.85
    assert over["slo_met_fraction"].median < 0.9
"""
    )
    with _rapl(tmp_path, monkeypatch):
        result = pytester.runpytest(*QUICK, "--llem-meter=rapl", "--llem-baseline-s=0.5")
    result.assert_outcomes(passed=1)
    record = _record(pytester)
    main = next(c for c in record["cases"] if c["capacity"] is not None)
    capacity = main["capacity"]
    assert main["part_of"] is None
    assert main["id"].endswith("test_capacity")
    assert main["params"]["traffic"]["rate"] == capacity["rate_rps"]
    points = [c for c in record["cases"] if c["part_of"] == main["id"]]
    assert {p["id"] for p in points} == {p["case_id"] for p in capacity["tried"]}
    assert all(p["sweep"]["traffic.rate"] > 0 for p in points)
    assert capacity["tried"][0]["achieved_rate_rps"] > 0
    result.stdout.fnmatch_lines(["*capacity*requests/s*e2e_ms*400*"])


@pytest.mark.slow
def test_search_over_batch_sizes_on_the_tiny_model(
    pytester: pytest.Pytester, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(
        """
import pytest

@pytest.mark.llem(model="llem-tiny", num_prompts=16, max_new_tokens=8, min_new_tokens=8,
                  repeat=1)
def test_best_batch(llem):
    answer = llem.search(
        space={"batch_size": [1, 2, 4, 8, 16]},
        minimize="energy_per_output_token_j",
        subject_to={"ttft_ms.p99": 600000},
    )
    print("EVALUATED", len(answer.evaluated))
    assert answer.best is not None and answer.best.feasible
    assert answer.result["energy_per_output_token_j"].median == answer.best.objective
    assert len(answer.evaluated) < 5
"""
    )
    with _rapl(tmp_path, monkeypatch):
        result = pytester.runpytest(*QUICK, "--llem-meter=rapl", "--llem-baseline-s=0.5", "-s")
    result.assert_outcomes(passed=1)
    record = _record(pytester)
    main = next(c for c in record["cases"] if c["search"] is not None)
    search = main["search"]
    assert search["grid_size"] == 5
    assert len(search["evaluated"]) < 5
    assert main["params"]["batch_size"] == search["best"]["params"]["batch_size"]
    points = [c for c in record["cases"] if c["part_of"] == main["id"]]
    assert len(points) == len(search["evaluated"])
    result.stdout.fnmatch_lines(["*search*best batch_size=*energy_per_output_token_j*"])


@pytest.mark.slow
def test_capacity_on_the_tiny_model_end_to_end(pytester: pytest.Pytester, tiny_model: Path) -> None:
    pytester.makepyfile(
        """
import pytest

@pytest.mark.llem(model="llem-tiny", max_new_tokens=4, min_new_tokens=4, repeat=1,
                  batch_size=4, traffic={"num_requests": 12, "arrival": "constant"})
def test_tiny_capacity(llem):
    cap = llem.capacity(slo={"e2e_ms": 20000}, rate=(2.0, 64.0), tolerance=1.0)
    assert cap.tried[0].rate_rps == 2.0
    assert cap.record.stop_reason in ("tolerance", "above_range", "below_range")
    if cap.rate_rps is not None:
        assert cap.result.params["traffic"]["rate"] == cap.rate_rps
"""
    )
    result = pytester.runpytest(*QUICK, "--llem-meter=none")
    result.assert_outcomes(passed=1)
    (main,) = [c for c in _record(pytester)["cases"] if c["capacity"] is not None]
    assert main["capacity"]["tried"]
    assert main["capacity"]["slo"] == {"e2e_ms": 20000.0}
    assert main["params"]["scenario"] == "server"
    result.stdout.fnmatch_lines(["capacity test_tiny_capacity: *"])


def test_bad_search_arguments_fail_the_test_with_one_line(
    pytester: pytest.Pytester, tiny_model: Path
) -> None:
    pytester.makepyfile(
        """
import pytest

@pytest.mark.llem(model="llem-tiny")
def test_bad_bound(llem):
    llem.capacity(slo={"p99_ms": 100})

@pytest.mark.llem(model="llem-tiny")
def test_bad_metric(llem):
    llem.search(space={"batch_size": [1, 2]}, minimize="joules_per_vibe")

@pytest.mark.llem(model="llem-tiny")
def test_both(llem):
    llem.search(space={"batch_size": [1, 2]}, minimize="energy_j", maximize="requests_per_s")
"""
    )
    result = pytester.runpytest(*QUICK, "--llem-meter=none")
    result.assert_outcomes(failed=3)
    result.stdout.fnmatch_lines(
        [
            "*llem.capacity: unknown SLO bound p99_ms (use ttft_ms, tpot_ms, e2e_ms)*",
            "*llem.search cannot optimise or bound 'joules_per_vibe'*",
            "*llem.search: give minimize or maximize, not both*",
        ]
    )
    assert "llem.search: llem.search" not in result.stdout.str()  # the method named once
    assert "llem.capacity: llem.capacity" not in result.stdout.str()


def test_a_value_the_command_line_fixes_cannot_be_searched(
    pytester: pytest.Pytester, tiny_model: Path
) -> None:
    pytester.makepyfile(
        """
import pytest

@pytest.mark.llem(model="llem-tiny")
def test_best(llem):
    llem.search(space={"batch_size": [1, 2]})
"""
    )
    result = pytester.runpytest(*QUICK, "--llem-meter=none", "--llem-set", "batch_size=4")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*llem.search: batch_size is fixed at 4 by the command line or ini; the search cannot "
            "set it to 2*"
        ]
    )
    assert "loading llem-tiny" not in result.stdout.str()  # nothing ran
    assert "During handling" not in result.stdout.str()


OOM_CONFTEST = """
import time

from pytest_llem.exceptions import RetryableError
from tests.fakes.fake_backend import FakeBackend, WallClock
from tests.fakes.fake_meter import FakeMeter


class SmallMemory(FakeBackend):
    def generate(self, requests, **kwargs):
        if len(requests) >= 8:
            raise RetryableError("CUDA out of memory: tried to allocate 2.00 GiB")
        return super().generate(requests, **kwargs)


def pytest_llem_backend_names():
    return ["small"]


def pytest_llem_meter_names():
    return ["steady"]


def pytest_llem_make_backend(name, case, progress):
    # a wall-clock pace: a batch of 4 takes half the steps of two batches of 2, whatever the load
    small = SmallMemory(WallClock(), prefill_s=0.02, step_s=0.01, lengths={})
    return small if name == "small" else None


def pytest_llem_make_meter(name, config, options):
    if name == "steady":
        return FakeMeter("steady", time.perf_counter, power_w={"gpu": 100.0})
    return None
"""


def test_a_point_out_of_memory_is_infeasible_and_the_search_goes_on(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeconftest(OOM_CONFTEST)
    pytester.makepyfile(
        """
import pytest

@pytest.mark.llem(num_prompts=16, max_new_tokens=3)
def test_batch(llem):
    answer = llem.search(space={"batch_size": [1, 2, 4, 8, 16]}, maximize="output_tokens_per_s")
    assert answer.best is not None
    assert answer.best.params == {"batch_size": 4}
    assert answer.best.result is answer.result
    failed = [p for p in answer.evaluated if not p.feasible]
    assert {p.params["batch_size"] for p in failed} == {8, 16}
    assert all(p.broke[0].startswith("out of memory: ") for p in failed)
"""
    )
    result = pytester.runpytest(
        *QUICK, "--llem-backend=small", "--llem-meter=steady", "--llem-repeat=1"
    )
    result.assert_outcomes(passed=1)
    cases = {c["id"].rsplit("::", 1)[1]: c for c in _record(pytester)["cases"]}
    assert cases["test_batch@batch_size=16"]["outcome"] == "failed"
    assert cases["test_batch@batch_size=16"]["part_of"].endswith("::test_batch")
    assert cases["test_batch"]["search"]["best"]["params"] == {"batch_size": 4}
    assert "batch_size=32" not in cases


def test_screening_runs_one_window_per_point_first(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(OOM_CONFTEST)
    pytester.makepyfile(
        """
import pytest

@pytest.mark.llem(num_prompts=8, max_new_tokens=3, repeat=2)
def test_batch(llem):
    answer = llem.search(
        space={"max_new_tokens": [3, 4, 5], "batch_size": [1, 2, 4]},
        maximize="output_tokens_per_s",
        screen=True,
    )
    assert answer.best is not None and not answer.best.screening
    screened = [p for p in answer.evaluated if p.screening]
    assert screened and all(p.result.params["repeat"] == 1 for p in screened)
    assert {len(p.result.repetitions) for p in answer.evaluated if not p.screening} == {2}
"""
    )
    result = pytester.runpytest(*QUICK, "--llem-backend=small", "--llem-meter=steady")
    result.assert_outcomes(passed=1)
    ids = [c["id"] for c in _record(pytester)["cases"]]
    assert any(i.endswith(",screen") for i in ids)
    result.stdout.fnmatch_lines(["search test_batch: *(and * on short windows to rank them)*"])

"""Energy trust through pytest: the idle baseline and dynamic energy in the run record, honest
labels, no zeros, combined meters and the options' checks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from pytest_llem.data.tiny_model import cache_root

pytestmark = pytest.mark.slow

pytest_plugins = ["pytester"]

CASE = """
import pytest

@pytest.mark.llem(batch_size=4, max_new_tokens=4, min_new_tokens=4, num_prompts=4)
def test_tiny(llem):
    llem.run()
"""

QUICK = ["-p", "no:cacheprovider", "--llem-warmup=0", "--llem-repeat=2"]


def _record(pytester: pytest.Pytester) -> dict[str, Any]:
    return json.loads((pytester.path / "reports" / "llem-report.json").read_text())


def _numbers(node: Any, path: str = "") -> list[tuple[str, float]]:
    """Every number in a JSON tree with its path."""
    if isinstance(node, dict):
        return [pair for k, v in node.items() for pair in _numbers(v, f"{path}.{k}")]
    if isinstance(node, list):
        return [pair for i, v in enumerate(node) for pair in _numbers(v, f"{path}[{i}]")]
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return [(path, float(node))]
    return []


def test_codecarbon_run_records_a_baseline_and_labels_estimates(
    pytester: pytest.Pytester, tiny_model: Path
) -> None:
    pytest.importorskip("codecarbon", reason="codecarbon is not installed")
    pytester.makepyfile(CASE)
    result = pytester.runpytest(
        *QUICK, "--llem-meter=codecarbon", "--llem-baseline-s=0.5", "--llem-min-window-s=0.3"
    )
    result.assert_outcomes(passed=1)
    record = _record(pytester)
    baseline = record["baseline"]
    assert baseline is not None
    assert baseline["cached"] is False
    assert baseline["seconds"] == 0.5
    cpu = baseline["domains"]["cpu"]
    assert cpu["idle_power_w"] > 0
    assert cpu["source"] == "estimated"
    assert cpu["meter"] == "codecarbon"
    assert cpu["windows"] == 5
    (case,) = record["cases"]
    assert case["baseline"]["taken_at"] == baseline["taken_at"]
    for name in (
        "energy_per_output_token_j",
        "dynamic_energy_j",
        "dynamic_energy_per_output_token_j",
    ):
        summary = case["metrics"][name]
        assert summary["source"] == "estimated", name
        assert summary["median"] is not None, name
    assert case["metrics"]["emissions_kg"]["source"] == "estimated"
    assert case["metrics"]["emissions_kg"]["unit"] == "kg CO2eq"
    for rep in case["repetitions"]:
        assert rep["duration_s"] >= 0.3  # extended to --llem-min-window-s
    assert case["metrics"]["duration_s"]["median"] < min(
        r["duration_s"] for r in case["repetitions"]
    ) or all(r["rounds"] == 1 for r in case["repetitions"])
    (meter,) = case["meters"]
    assert meter["used_for"] == ["cpu", "dram"] or meter["used_for"] == ["gpu", "cpu", "dram"]


def test_meter_none_reports_no_energy_and_no_zeros(
    pytester: pytest.Pytester, tiny_model: Path
) -> None:
    pytester.makepyfile(CASE)
    result = pytester.runpytest(*QUICK, "--llem-meter=none")
    result.assert_outcomes(passed=1)
    record = _record(pytester)
    assert record["baseline"] is None
    (case,) = record["cases"]
    for name, summary in case["metrics"].items():
        if "energy" in name or name in ("avg_power_w", "output_tokens_per_j", "idle_power_w"):
            assert summary["median"] is None, name
            assert summary["note"], name
    energy_paths = [
        (path, value)
        for path, value in _numbers(case)
        if "energy" in path and not path.endswith(".n") and value == 0
    ]
    assert energy_paths == []
    assert all(rep["rounds"] == 1 for rep in case["repetitions"])  # no meter: no extension


def test_baseline_is_cached_between_runs(pytester: pytest.Pytester, tiny_model: Path) -> None:
    pytest.importorskip("codecarbon", reason="codecarbon is not installed")
    pytester.makepyfile(CASE)
    pytester.makeini("[pytest]\nllem_baseline_s = 0.5\nllem_min_window_s = 0\n")
    shutil.rmtree(cache_root() / "baselines", ignore_errors=True)  # earlier tests' baselines
    pytester.runpytest(*QUICK, "--llem-meter=codecarbon").assert_outcomes(passed=1)
    first = _record(pytester)["baseline"]
    assert first["cached"] is False
    pytester.runpytest(*QUICK, "--llem-meter=codecarbon").assert_outcomes(passed=1)
    second = _record(pytester)["baseline"]
    assert second["cached"] is True
    assert second["taken_at"] == first["taken_at"]
    # asking on the command line measures afresh
    pytester.runpytest(*QUICK, "--llem-meter=codecarbon", "--llem-baseline-s=0.5")
    third = _record(pytester)["baseline"]
    assert third["cached"] is False
    assert third["taken_at"] != first["taken_at"]


def test_baseline_zero_disables_it(pytester: pytest.Pytester, tiny_model: Path) -> None:
    pytest.importorskip("codecarbon", reason="codecarbon is not installed")
    pytester.makepyfile(CASE)
    result = pytester.runpytest(
        *QUICK, "--llem-meter=codecarbon", "--llem-baseline-s=0", "--llem-min-window-s=0"
    )
    result.assert_outcomes(passed=1)
    record = _record(pytester)
    assert record["baseline"] is None
    (case,) = record["cases"]
    assert case["metrics"]["dynamic_energy_j"]["median"] is None
    assert "--llem-baseline-s=0" in case["metrics"]["dynamic_energy_j"]["note"]
    assert case["metrics"]["energy_j"]["median"] is not None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--llem-baseline-s=-1"], "*--llem-baseline-s: expected seconds*"),
        (["--llem-min-window-s=soon"], "*--llem-min-window-s: expected seconds*"),
        (["--llem-cooldown=lukewarm"], "*--llem-cooldown: expected off, temperature or seconds:N*"),
        (["--llem-cooldown=seconds:-3"], "*--llem-cooldown: expected off*"),
        (["--llem-meter=nvml,nvml"], "*--llem-meter: meter 'nvml' is named twice*"),
        (["--llem-meter=auto,rapl"], "*'auto' cannot be combined*"),
        (["--llem-country=France"], "*--llem-country: expected a three-letter ISO code*"),
    ],
)
def test_bad_energy_options_are_usage_errors(
    pytester: pytest.Pytester, args: list[str], message: str
) -> None:
    pytester.makepyfile(CASE)
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_options_appear_in_help(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(
        [
            "*--llem-baseline-s=SECONDS*",
            "*--llem-min-window-s=SECONDS*",
            "*--llem-cooldown=MODE*",
            "*--llem-country=ISO*",
        ]
    )


def test_nvml_run_records_timeline_states_and_heat(
    pytester: pytest.Pytester, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.fakes.fake_pynvml import FakeGpu, install

    gpu = FakeGpu(power_w=150.0, temperature_c=41, counter_step_s=0.01)
    install(monkeypatch, [gpu])
    shutil.rmtree(cache_root() / "baselines", ignore_errors=True)
    pytester.makepyfile(CASE)
    pytester.makeini("[pytest]\nllem_baseline_s = 0.5\nllem_min_window_s = 0.3\n")
    result = pytester.runpytest(*QUICK, "--llem-meter=nvml")
    result.assert_outcomes(passed=1)
    record = _record(pytester)
    idle = record["baseline"]["domains"]["gpu"]
    assert idle["idle_power_w"] == pytest.approx(150.0, rel=0.1)
    assert idle["source"] == "measured"
    assert record["baseline"]["idle_temperature_c"] == {"gpu0": 41.0}
    (case,) = record["cases"]
    assert case["measured_hot"] is False
    (meter,) = case["meters"]
    assert meter["update_period_measured"] is True
    assert meter["update_period_s"] == pytest.approx(0.01, rel=0.5)
    for rep in case["repetitions"]:
        assert rep["duration_s"] >= 0.3
        (timeline,) = rep["power_timeline"]
        assert timeline["domain"] == "gpu"
        assert 0 < len(timeline["watts"]) <= 200
        assert sum(timeline["watts"]) / len(timeline["watts"]) == pytest.approx(150.0, rel=0.05)
        assert abs(rep["counter_vs_power_diff"]["gpu"]) < 0.1
        assert rep["device_states"]["start"]["gpu0"]["temperature_c"] == 41
        assert rep["device_states"]["end"]["gpu0"]["sm_clock_mhz"] == 1980
    dynamic = case["metrics"]["dynamic_energy_j"]
    energy = case["metrics"]["energy_j"]
    assert dynamic["source"] == "measured"
    assert abs(dynamic["median"]) < 0.15 * energy["median"]  # constant power: ~0 above idle
    html = (pytester.path / "reports" / "llem-report.html").read_text()
    assert "Power timeline" in html
    assert "gpu idle power" in html

    gpu.temperature_c = 60  # the next run starts hot against the cached idle temperature
    result = pytester.runpytest(*QUICK, "--llem-meter=nvml", "--llem-cooldown=seconds:0.1")
    result.assert_outcomes(passed=1)
    record = _record(pytester)
    assert record["baseline"]["cached"] is True
    (case,) = record["cases"]
    assert case["measured_hot"] is True
    assert case["cooldown"]["mode"] == "seconds"
    assert case["cooldown"]["waited_s"] >= 0.1
    result.stdout.fnmatch_lines(["*test_tiny (hot*", "*measured hot*test_tiny*"])


def _rapl_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **zones: Any) -> Any:
    from tests.fakes.fake_rapl import FakeRaplTree, intel_zones

    root = tmp_path / "powercap"
    monkeypatch.setenv("LLEM_RAPL_ROOT", str(root))
    return FakeRaplTree(root, intel_zones(**zones))


def test_rapl_against_a_fake_tree_reports_its_power(
    pytester: pytest.Pytester, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(CASE)
    with _rapl_tree(tmp_path, monkeypatch, package_w=10.0, dram_w=None, core_w=6.0):
        result = pytester.runpytest(
            *QUICK, "--llem-meter=rapl", "--llem-baseline-s=0.5", "--llem-min-window-s=0.5"
        )
    result.assert_outcomes(passed=1)
    record = _record(pytester)
    (case,) = record["cases"]
    power = case["metrics"]["avg_power_w"]
    assert power["source"] == "measured"
    assert power["median"] == pytest.approx(10.0, rel=0.05)  # the package; core is inside it
    assert case["metrics"]["cpu_energy_j"]["source"] == "measured"
    assert case["metrics"]["dram_energy_j"]["median"] is None  # no dram zone: not 0
    assert record["baseline"]["domains"]["cpu"]["idle_power_w"] == pytest.approx(10.0, rel=0.05)
    assert case["meters"][0]["used_for"] == ["cpu"]  # this tree has no dram zone


def test_nvml_and_rapl_split_the_domains(
    pytester: pytest.Pytester, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.fakes.fake_pynvml import FakeGpu, install

    install(monkeypatch, [FakeGpu(power_w=100.0, counter_step_s=0.01)])
    pytester.makepyfile(CASE)
    with _rapl_tree(tmp_path, monkeypatch, package_w=20.0, dram_w=4.0):
        result = pytester.runpytest(
            *QUICK, "--llem-meter=nvml,rapl", "--llem-baseline-s=0.5", "--llem-min-window-s=1"
        )
    result.assert_outcomes(passed=1)
    (case,) = _record(pytester)["cases"]
    assert [(m["name"], m["used_for"]) for m in case["meters"]] == [
        ("nvml", ["gpu"]),
        ("rapl", ["cpu", "dram"]),
    ]
    metrics = case["metrics"]
    # the fakes advance on the real clock: a busy machine delays their writers a little
    assert metrics["avg_power_w"]["median"] == pytest.approx(124.0, rel=0.1)
    for domain, watts in (("gpu", 100.0), ("cpu", 20.0), ("dram", 4.0)):
        rep = case["repetitions"][0]
        assert rep[f"{domain}_energy_j"] / rep["duration_s"] == pytest.approx(watts, rel=0.15)


def test_auto_picks_nvml_and_rapl_when_both_exist(
    pytester: pytest.Pytester, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.fakes.fake_pynvml import FakeGpu, install

    install(monkeypatch, [FakeGpu(power_w=100.0, counter_step_s=0.01)])
    pytester.makepyfile(CASE)
    with _rapl_tree(tmp_path, monkeypatch):
        result = pytester.runpytest(*QUICK, "--llem-baseline-s=0", "--llem-min-window-s=0.2")
    result.assert_outcomes(passed=1)
    (case,) = _record(pytester)["cases"]
    assert [m["name"] for m in case["meters"]] == ["nvml", "rapl"]
    assert "rapl: CPU energy counters readable" in case["meters"][0]["selected_because"]


PACED_CONFTEST = """
from tests.fakes.fake_backend import FakeBackend, WallClock


def pytest_llem_backend_names():
    return ["paced"]


def pytest_llem_make_backend(name, case, progress):
    if name == "paced":
        # 20 ms to the first token, 5 ms per further token, on the wall clock
        return FakeBackend(WallClock(), prefill_s=0.02, step_s=0.005)
    return None
"""

SERVER_CASE = """
import pytest

@pytest.mark.llem(
    scenario="server",
    batch_size=1,
    max_new_tokens=4,
    min_new_tokens=4,
    num_prompts=4,
    traffic={"arrival": "constant", "rate": 8, "num_requests": 8, "steady_state": True},
)
def test_server(llem):
    llem.run()
"""


def test_short_server_workload_reports_a_consistent_steady_state(
    pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One round lasts ~0.9 s (8 arrivals 125 ms apart), so --llem-min-window-s=2 makes each
    # window hold several rounds; the power comes from the fake RAPL tree, not from the CPU.
    pytester.makeconftest(PACED_CONFTEST)
    pytester.makepyfile(SERVER_CASE)
    with _rapl_tree(tmp_path, monkeypatch, package_w=12.0, dram_w=None, core_w=6.0):
        result = pytester.runpytest(
            "-p", "no:cacheprovider", "--llem-backend=paced", "--llem-meter=rapl",
            "--llem-baseline-s=0", "--llem-min-window-s=2", "--llem-warmup=1",
            "--llem-repeat=2",
        )  # fmt: skip
    result.assert_outcomes(passed=1)
    (case,) = _record(pytester)["cases"]
    metrics = case["metrics"]
    for rep in case["repetitions"]:
        assert rep["rounds"] > 1
        values = rep["values"]
        assert values["requests"] == 8  # per round
        assert values["steady_state.requests"] <= values["requests"]
        assert values["steady_state.requests"] == 7  # the ramp-up is ceil(0.1 x 8) = 1 request
    steady = metrics["steady_state.avg_power_w"]
    if steady["median"] is None:
        assert steady["note"], "a null steady-state power says why"
    else:
        assert steady["median"] == pytest.approx(12.0, rel=0.15)
        assert steady["source"] == "measured"
    assert metrics["avg_power_w"]["median"] == pytest.approx(12.0, rel=0.15)

"""Drift is not a regression: each rule of results/drift.py, the comparison, ``llem compare`` and
the pytest gate on a fake ``/proc`` whose load each run sets."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

from pytest_llem.results.compare import compare_runs, format_breaches, format_table, to_json
from pytest_llem.results.drift import DriftMargin, assess_drift, parse_drift_margin
from pytest_llem.results.gate import parse_fail_on
from pytest_llem.results.machine_state import GpuMachineState, MachineStateSummary
from pytest_llem.results.models import RunRecord
from tests.fakes.fake_proc import FakeProc
from tests.test_compare import case, run
from tests.test_gating import CASE, CONFTEST, _llem_compare  # the paced engine, its case

pytest_plugins = ["pytester"]

TPS = "output_tokens_per_s"
GATE = parse_fail_on(f"{TPS}:-5%")
FAST = [100.0, 101.0, 99.0, 100.5, 99.5]
SLOW = [70.0, 71.0, 69.0, 70.5, 69.5]  # a 30% throughput drop


def state(other: float = 0.0, *, low: float | None = None, **fields: object) -> MachineStateSummary:
    return MachineStateSummary.model_validate(
        {
            "windows": 5,
            "cpu_count": 2,
            "other_cpu_cores_mean": other,
            "other_cpu_cores_min": other if low is None else low,
            "other_cpu_cores_max": other,
            **fields,
        }
    )


def records(
    base: MachineStateSummary | None, cur: MachineStateSummary | None, values: list[float] = SLOW
) -> tuple[RunRecord, RunRecord]:
    b, c = case("t.py::test_a", {TPS: FAST}), case("t.py::test_a", {TPS: values})
    b.machine_state, c.machine_state = base, cur
    return run(b), run(c, run_id="fedcba9876543210")


# --- the margin ------------------------------------------------------------------------------


def test_margin_forms():
    assert parse_drift_margin("0.75") == DriftMargin(cpu_cores=0.75)
    assert parse_drift_margin("cpu=1,gpu_clock=5%") == DriftMargin(cpu_cores=1.0, gpu_clock=0.05)
    assert parse_drift_margin("gpu_clock=0.2") == DriftMargin(gpu_clock=0.2)
    assert parse_drift_margin("gpu_clock=off").gpu_clock is None
    assert not parse_drift_margin("off").enabled
    assert str(DriftMargin()) == "cpu=0.5,gpu_clock=10%"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("lots", "'lots' is not a number"),
        ("-1", "must be a finite number >= 0"),
        ("ram=3", "expected cpu=CORES or gpu_clock=PERCENT|off"),
        ("cpu=nan", ">= 0"),
    ],
)
def test_bad_margins_say_what_is_wrong(text: str, message: str):
    with pytest.raises(ValueError, match=message):
        parse_drift_margin(text)


# --- the rules -------------------------------------------------------------------------------


def test_other_processes_cpu_differing_beyond_the_margin_disturbs_the_case():
    drift = assess_drift("c", state(0.0), state(1.9))
    assert drift.disturbed
    assert drift.evidence == (
        "other processes used 1.9 of 2 cores during the current run, 0.0 during the baseline",
    )
    assert drift.reason.startswith("machine disturbed (other processes used 1.9 of 2 cores")
    assert not assess_drift("c", state(0.0), state(0.4)).disturbed  # within 0.5 core
    assert not assess_drift("c", state(0.0), state(1.9), DriftMargin(cpu_cores=2)).disturbed


def test_runs_too_short_to_resolve_the_difference_are_not_disturbed():
    coarse = {"mean_resolution_cores": 0.3}
    assert not assess_drift("c", state(0.0, **coarse), state(0.9, **coarse)).disturbed
    assert assess_drift("c", state(0.0, **coarse), state(1.2, **coarse)).disturbed


def test_a_busy_baseline_and_a_quiet_run_disturb_too():
    drift = assess_drift("c", state(1.8), state(0.1))
    assert drift.evidence == (
        "other processes used 0.1 of 2 cores during the current run, 1.8 during the baseline",
    )


def test_an_equally_busy_machine_is_a_warning_with_the_figures():
    drift = assess_drift("c", state(1.7), state(1.9))
    assert not drift.disturbed
    (warning,) = drift.warnings
    assert "other processes used 1.9 of 2 cores during the current run and 1.7" in warning
    assert assess_drift("c", state(0.1), state(0.2)).warnings == ()


def test_load_that_varied_within_one_run_disturbs_it():
    steady = state(0.4, low=0.0)  # 0.0 to 0.4 between windows: within 0.5 core
    assert not assess_drift("c", state(0.2), steady).disturbed
    varied = state(1.2, low=0.0).model_copy(update={"other_cpu_cores_mean": 0.3})
    drift = assess_drift("c", state(0.2), varied)
    assert drift.disturbed
    assert drift.evidence == (
        "current run: other processes' CPU use varied between windows from 0.0 to 1.2 of 2 cores",
    )


def test_on_a_saturated_machine_other_processes_demand_decides():
    """With no idle CPU, what others used is capped by what this run took (1.4 and 1.7 cores
    are within the margin), but four burners more asked for far more CPU."""
    base = state(1.4, idle_cores_mean=0.0, other_runnable_mean=1.0)
    cur = state(1.7, idle_cores_mean=0.0, other_runnable_mean=3.0)
    assert assess_drift("c", base, cur).evidence == (
        "other processes kept 3.0 runnable during the current run, 1.0 during the baseline, "
        "with 0.0 of 2 cores idle",
    )
    assert not assess_drift(
        "c", base, cur.model_copy(update={"other_runnable_mean": 1.3})
    ).disturbed
    idle = {"idle_cores_mean": 1.0}
    spare = assess_drift("c", base.model_copy(update=idle), cur.model_copy(update=idle))
    assert not spare.disturbed  # CPU to spare on both sides: demand did not compete


def test_steal_differing_beyond_the_margin_disturbs():
    base = state(steal_fraction_mean=0.0, steal_fraction_min=0.0, steal_fraction_max=0.0)
    cur = state(steal_fraction_mean=0.4, steal_fraction_min=0.4, steal_fraction_max=0.4)
    drift = assess_drift("c", base, cur)
    assert drift.evidence == (
        "CPU steal took 0.8 of 2 cores during the current run, 0.0 during the baseline",
    )


def test_gpu_clock_power_limit_and_heat():
    gpu = GpuMachineState(sm_clock_mhz=1980, power_limits_w=[700])
    slow = GpuMachineState(sm_clock_mhz=1500, power_limits_w=[500])
    drift = assess_drift(
        "c", state(gpus={"gpu0": gpu}), state(gpus={"gpu0": slow}, measured_hot=True)
    )
    assert drift.evidence == (
        "GPU gpu0 power limit 500 W in the current run, 700 W in the baseline",
        "GPU gpu0 SM clock 1500 MHz in the current run, 1980 MHz in the baseline (margin 10%)",
        "the current run was measured hot, the baseline was not",
    )
    near = GpuMachineState(sm_clock_mhz=1900, power_limits_w=[700])
    assert not assess_drift("c", state(gpus={"gpu0": gpu}), state(gpus={"gpu0": near})).disturbed
    off = DriftMargin(gpu_clock=None)
    slower = GpuMachineState(sm_clock_mhz=1500, power_limits_w=[700])
    assert not assess_drift(
        "c", state(gpus={"gpu0": gpu}), state(gpus={"gpu0": slower}), off
    ).disturbed


def test_thermal_throttle_and_foreign_gpu_processes():
    throttled = GpuMachineState(thermal_throttle=["HwThermalSlowdown"])
    drift = assess_drift("c", state(), state(gpus={"gpu0": throttled}))
    assert drift.evidence == ("current run: GPU gpu0 throttled (HwThermalSlowdown)",)
    base = state(gpu_foreign_processes_min=0, gpu_foreign_processes_max=0)
    cur = state(gpu_foreign_processes_min=1, gpu_foreign_processes_max=1)
    assert assess_drift("c", base, cur).evidence == (
        "1 foreign processes on the measured GPUs during the current run, 0 during the baseline",
    )


def test_drift_is_not_judged_without_a_record_or_when_off():
    drift = assess_drift("c", None, state(1.9))
    assert not drift.disturbed
    assert drift.note == "drift not judged: no machine-state record in the baseline"
    assert not assess_drift("c", state(0.0), state(1.9), DriftMargin(enabled=False)).disturbed


# --- the comparison --------------------------------------------------------------------------


def test_a_breach_on_a_disturbed_machine_is_inconclusive_with_the_evidence():
    comparison = compare_runs(*records(state(0.0), state(1.9)), GATE)
    (m,) = comparison.metrics
    assert m.verdict == "inconclusive"
    assert m.disturbed
    assert m.gated
    assert m.reason is not None
    assert m.reason.startswith("machine disturbed (")
    assert "other processes used 1.9 of 2 cores during the current run, 0.0 during" in m.reason
    assert comparison.exit_code() == 0
    assert comparison.exit_code(fail_inconclusive=True) == 1
    table = format_table(comparison)
    assert "inconclusive (disturbed)" in table
    assert "Machine disturbed" in table
    (line,) = format_breaches(comparison, fail_inconclusive=True)
    assert "machine disturbed (" in line
    document = to_json(comparison)
    assert document["metrics"][0]["disturbed"] is True
    assert document["drift"][0]["disturbed"] is True
    assert document["exit_code"] == 0


def test_a_real_regression_on_a_quiet_machine_is_still_regressed():
    comparison = compare_runs(*records(state(0.0), state(0.1)), GATE)
    (m,) = comparison.metrics
    assert (m.verdict, m.disturbed) == ("regressed", False)
    assert comparison.exit_code() == 1


def test_a_real_regression_on_an_equally_busy_machine_is_regressed_with_a_warning():
    comparison = compare_runs(*records(state(1.8), state(1.9)), GATE)
    (m,) = comparison.metrics
    assert m.verdict == "regressed"
    assert comparison.exit_code() == 1
    assert "Machine busy:" in format_table(comparison)


def test_no_breach_keeps_its_verdict_on_a_disturbed_machine_flagged():
    comparison = compare_runs(*records(state(0.0), state(1.9), FAST), GATE)
    (m,) = comparison.metrics
    assert (m.verdict, m.disturbed) == ("unchanged", True)


def test_records_without_machine_state_compare_as_before_and_say_so():
    comparison = compare_runs(*records(None, None), GATE)
    assert comparison.metrics[0].verdict == "regressed"
    assert "drift not judged: no machine-state record in the baseline and current run (1 case)" in (
        format_table(comparison)
    )


def _write(record: RunRecord, path: Path) -> Path:
    path.write_text(record.model_dump_json())
    return path


def test_llem_compare_reports_a_disturbed_breach_inconclusive(tmp_path: Path):
    base, cur = records(state(0.0), state(1.9))
    files = [str(_write(base, tmp_path / "base.json")), str(_write(cur, tmp_path / "cur.json"))]
    gate = f"--fail-on={TPS}:-5%"
    done = _llem_compare(*files, gate)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "machine disturbed (other processes used 1.9 of 2 cores" in done.stdout
    assert _llem_compare(*files, gate, "--fail-inconclusive").returncode == 1
    assert _llem_compare(*files, gate, "--drift-margin=2").returncode == 1  # wide: regressed
    assert _llem_compare(*files, gate, "--drift-margin=off").returncode == 1
    shown = json.loads(_llem_compare(*files, gate, "--format=json").stdout)
    assert shown["drift"][0]["evidence"]
    bad = _llem_compare(*files, gate, "--drift-margin=cpu=lots")
    assert bad.returncode == 4
    assert "--drift-margin" in bad.stderr


# --- the pytest gate, on a fake /proc --------------------------------------------------------

QUICK = ["--llem-backend=paced", "--llem-meter=none", "-p", "no:cacheprovider", "--llem-repeat=5"]
GATE_OPTION = f"--llem-fail-on={TPS}:-5%"


@pytest.fixture
def machine(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeProc:
    """Every case's machine state read from a fake /proc whose load the test sets."""
    fake = FakeProc(tmp_path / "machine", cpus=2)
    # The module object the run will use (an earlier in-process run may have dropped the one
    # the package attribute still names).
    runner = importlib.import_module("pytest_llem.harness.case")
    monkeypatch.setattr(runner, "MachineProbe", fake.probe)
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(CASE)
    return fake


def _run(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, step_s: str, *args: str
) -> pytest.RunResult:
    monkeypatch.setenv("LLEM_TEST_STEP_S", step_s)
    return pytester.runpytest(*QUICK, *args)


def _record(pytester: pytest.Pytester) -> dict[str, object]:
    return json.loads((pytester.path / "reports" / "llem-report.json").read_text())


def test_the_run_record_carries_machine_state_per_window_and_per_case(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, machine: FakeProc
):
    machine.other_cores = 1.25
    _run(pytester, monkeypatch, "0.002").assert_outcomes(passed=1)
    (found,) = _record(pytester)["cases"]  # type: ignore[misc]
    assert [r["machine_state"]["other_cpu_cores"] for r in found["repetitions"]] == [1.25] * 5
    summary = found["machine_state"]
    assert summary["other_cpu_cores_mean"] == 1.25
    assert summary["busy"] is True
    assert summary["disturbed"] is False


def test_the_gate_calls_a_breach_under_drift_inconclusive_and_a_quiet_one_regressed(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, machine: FakeProc
):
    machine.other_cores = 0.0
    _run(pytester, monkeypatch, "0.002", "--llem-save=quiet").assert_outcomes(passed=1)
    machine.other_cores = 1.9
    busy = _run(pytester, monkeypatch, "0.02", "--llem-compare=quiet", GATE_OPTION)
    assert busy.ret == 0, busy.stdout.str()
    busy.stdout.fnmatch_lines(
        ["*inconclusive (disturbed)*", "*machine disturbed (*1.9 of 2 cores*"]
    )
    busy.stdout.fnmatch_lines(["1 case compared: 1 inconclusive"])
    comparison = _record(pytester)["comparison"]
    assert comparison["drift"][0]["disturbed"] is True  # type: ignore[index]
    assert comparison["rows"][0]["verdict"] == "inconclusive"  # type: ignore[index]
    strict = _run(
        pytester,
        monkeypatch,
        "0.02",
        "--llem-compare=quiet",
        GATE_OPTION,
        "--llem-fail-inconclusive",
    )
    assert strict.ret == 1
    machine.other_cores = 0.0
    quiet = _run(pytester, monkeypatch, "0.02", "--llem-compare=quiet", GATE_OPTION)
    assert quiet.ret == 1
    quiet.stdout.fnmatch_lines(["*output_tokens_per_s regressed*"])


def test_the_margin_option_and_its_ini_key(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, machine: FakeProc
):
    machine.other_cores = 0.0
    _run(pytester, monkeypatch, "0.002", "--llem-save=quiet").assert_outcomes(passed=1)
    machine.other_cores = 1.9
    wide = _run(
        pytester, monkeypatch, "0.02", "--llem-compare=quiet", GATE_OPTION, "--llem-drift-margin=2"
    )
    assert wide.ret == 1  # 1.9 cores apart is within a 2-core margin: a plain regression
    pytester.makeini("[pytest]\nllem_drift_margin = cpu=2\n")
    assert _run(pytester, monkeypatch, "0.02", "--llem-compare=quiet", GATE_OPTION).ret == 1
    bad = _run(pytester, monkeypatch, "0.02", "--llem-drift-margin=cpu=lots")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["*--llem-drift-margin*not a number*"])


def test_a_case_disturbed_within_its_run_is_flagged_in_the_terminal_and_the_html():
    from pytest_llem.finish import comparison_rows
    from pytest_llem.report.html import render_html
    from pytest_llem.report.terminal import summary_lines

    varied = state(1.9, low=0.0).model_copy(
        update={
            "disturbed": True,
            "disturbances": ["other processes' CPU use varied between windows from 0.0 to 1.9"],
        }
    )
    base, cur = records(state(0.0), varied)
    lines = "\n".join(summary_lines(cur))
    assert "test_a (disturbed)" in lines
    assert "disturbed (the machine changed between the case's windows" in lines
    assert "varied between windows from 0.0 to 1.9" in lines
    comparison = compare_runs(base, cur, GATE)
    rows = comparison_rows(comparison)
    assert rows[0]["disturbed"] is True
    page = render_html(cur, comparison={"rows": rows})
    assert "inconclusive (disturbed)" in page


def test_a_gpu_power_limit_changed_since_the_baseline_makes_a_breach_inconclusive(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, machine: FakeProc
):
    from tests.fakes.fake_pynvml import FakeGpu, install

    gpu = FakeGpu(power_w=150.0, counter_step_s=0.01)
    install(monkeypatch, [gpu])
    nvml = ["--llem-meter=nvml", "--llem-baseline-s=0.2"]  # a fresh idle baseline, not cached
    _run(pytester, monkeypatch, "0.002", *nvml, "--llem-save=base").assert_outcomes(passed=1)
    (case,) = _record(pytester)["cases"]  # type: ignore[misc]
    assert case["machine_state"]["gpus"]["gpu0"]["power_limits_w"] == [700.0]
    assert case["machine_state"]["gpu_foreign_processes_max"] == 0
    gpu.power_limit_w = 500.0
    gpu.processes = [(4242, 1 << 30)]
    done = _run(pytester, monkeypatch, "0.02", *nvml, "--llem-compare=base", GATE_OPTION)
    assert done.ret == 0, done.stdout.str()
    done.stdout.fnmatch_lines(
        [
            "*machine disturbed (*GPU gpu0 power limit 500 W in the current run, 700 W in the "
            "baseline*",
        ]
    )
    assert "1 foreign processes on the measured GPUs during the current run, 0 during" in (
        done.stdout.str()
    )


def test_adaptive_windows_carry_the_machine_state_too(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, machine: FakeProc
):
    machine.other_cores = 0.5
    _run(pytester, monkeypatch, "0.002", "--llem-repeat=auto").assert_outcomes(passed=1)
    (found,) = _record(pytester)["cases"]  # type: ignore[misc]
    assert found["adaptive"]["windows"] == len(found["repetitions"]) >= 3
    assert all(r["machine_state"]["other_cpu_cores"] == 0.5 for r in found["repetitions"])
    assert found["machine_state"]["windows"] == len(found["repetitions"])

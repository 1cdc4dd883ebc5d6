"""The metric catalogue: every figure a record can hold is defined once, with unit and direction.

The harness is run on the fakes with everything switched on (server traffic with a steady state,
every SLO bound, a baseline, emissions, a cross-check and device temperatures), and every metric
name of the resulting records must resolve to a catalogue entry, with the catalogue's unit on
its summary; and every catalogue name must be one such a run produces, so the catalogue holds no
name the harness no longer writes.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from datetime import datetime, timezone

import pytest

from pytest_llem.config.models import CaseConfig
from pytest_llem.harness.metrics import DOMAIN_ENERGY_METRICS, METRIC_UNITS
from pytest_llem.harness.runner import CaseMeasurement, WindowPolicy, run_case
from pytest_llem.meters.base import DOMAINS as METER_DOMAINS
from pytest_llem.meters.base import DeviceState, EnergyReading
from pytest_llem.results import catalogue
from pytest_llem.results.catalogue import CATALOGUE, LATENCY_METRICS, STEADY_PREFIX, lookup
from pytest_llem.results.compare import compare_runs
from pytest_llem.results.gate import ENERGY_METRICS, GATE_METRICS, HIGHER_IS_BETTER, parse_fail_on
from pytest_llem.results.models import (
    BaselineDomain,
    BaselineRecord,
    CaseRecord,
    MachineInfo,
    RunRecord,
)
from tests.fakes.fake_backend import FakeBackend, FakeClock
from tests.fakes.fake_meter import FakeMeter

PROMPTS = ["one two three"] * 8


class SensingMeter(FakeMeter):
    """A fake GPU meter that also cross-checks its counter and reports device temperatures."""

    def stop(self) -> EnergyReading:
        reading = super().stop()
        return dataclasses.replace(
            reading,
            cross_check={"gpu": 0.01},
            start_states={"gpu0": DeviceState(temperature_c=40.0)},
            end_states={"gpu0": DeviceState(temperature_c=45.0)},
        )


def _baseline() -> BaselineRecord:
    def domain(watts: float) -> BaselineDomain:
        return BaselineDomain(
            idle_power_w=watts, seconds=5.0, windows=5, source="measured", meter="fake"
        )

    return BaselineRecord(
        domains={"gpu": domain(100.0), "cpu": domain(20.0)},
        taken_at=datetime.now(timezone.utc),
        seconds=5.0,
        cached=False,
    )


def _run(scenario: str, policy: WindowPolicy | None = None, **config: object) -> CaseMeasurement:
    clock = FakeClock()
    meters = [
        SensingMeter("nvml-fake", clock, power_w={"gpu": 200.0}),
        FakeMeter(
            "cc-fake",
            clock,
            power_w={"cpu": 50.0, "dram": 5.0},
            sources={"cpu": "estimated", "dram": "estimated"},
            emissions_kg_per_j=1e-7,
        ),
    ]
    case = CaseConfig.model_validate(
        {"max_new_tokens": 3, "min_new_tokens": 3, "warmup": 0, "repeat": 3, **config}
    )
    return run_case(
        backend=FakeBackend(clock, sync_s=0.0625),
        meters=meters,
        config=case,
        prompts=PROMPTS,
        clock=clock,
        sleep=clock.advance,
        non_embedding_parameters=1000,
        scenario=scenario,
        policy=policy,
        baseline=_baseline(),
    )


def _everything() -> list[CaseMeasurement]:
    slo = {"ttft_ms": 500.0, "tpot_ms": 100.0, "e2e_ms": 2000.0}
    traffic = {
        "arrival": "constant",
        "rate": 16.0,
        "num_requests": 8,
        "steady_state": True,
        "ramp_up_fraction": 0.25,
    }
    return [
        _run("offline", batch_size=4, slo=slo, prefill_check=True),
        _run("server", batch_size=1, slo=slo, traffic=traffic),
    ]


def _names(measurements: list[CaseMeasurement]) -> set[str]:
    names: set[str] = set()
    for measured in measurements:
        names.update(measured.metrics)
        for rep in measured.repetitions:
            names.update(rep.values)
            names.update(rep.missing)
    return names


def test_every_metric_a_record_holds_is_in_the_catalogue_with_unit_and_direction() -> None:
    measurements = _everything()
    names = _names(measurements)
    unknown = sorted(name for name in names if lookup(name) is None)
    assert not unknown, f"metrics missing from the catalogue: {unknown}"
    for name in names:
        entry = CATALOGUE[name]
        assert entry.unit, name
        assert entry.better in ("lower", "higher", "neither"), name
        assert entry.description, name
    for measured in measurements:
        for name, summary in measured.metrics.items():
            assert summary.unit == CATALOGUE[name].unit, name


def test_the_catalogue_holds_no_name_the_harness_never_writes() -> None:
    never = sorted(set(CATALOGUE) - _names(_everything()))
    assert never == []


def test_a_metric_without_a_value_takes_its_reason_from_the_window_or_the_catalogue() -> None:
    # a window far shorter than the floor: no energy, with the window's own reason
    measured = _run("offline", WindowPolicy(target_s=0.0, floor_s=1e6, update_period_s=5e4))
    rep = measured.repetitions[0]
    assert rep.values["energy_j"] is None
    assert rep.missing["gpu_energy_j"].startswith("gpu: not measured (window of")
    assert rep.missing["energy_j"].startswith("no energy domain measured: gpu: not measured")
    assert measured.metrics["energy_j"].note == rep.missing["energy_j"]
    # a single-token request has no TPOT: the catalogue's reason, the same in every window
    short = _run("offline", max_new_tokens=1, min_new_tokens=1)
    assert "tpot_ms.p50" not in short.repetitions[0].missing
    assert short.metrics["tpot_ms.p50"].note == CATALOGUE["tpot_ms.p50"].missing


def test_families_are_generated_from_one_entry() -> None:
    for base in LATENCY_METRICS:
        family = [m for m in CATALOGUE.values() if m.family == base and m.section != "steady"]
        assert [m.name for m in family] == [f"{base}.{s}" for s in catalogue.LATENCY_STATISTICS]
        assert {m.unit for m in family} == {"ms"}
    steady = CATALOGUE[f"{STEADY_PREFIX}energy_per_output_token_j"]
    assert (steady.unit, steady.better, steady.gated) == ("J/token", "lower", False)
    assert catalogue.DOMAINS == METER_DOMAINS
    assert set(DOMAIN_ENERGY_METRICS) == {f"{d}_energy_j" for d in METER_DOMAINS}


def test_harness_and_gate_take_their_lists_from_the_catalogue() -> None:
    assert {name: m.unit for name, m in CATALOGUE.items()} == METRIC_UNITS
    assert set(GATE_METRICS) == {m.name for m in CATALOGUE.values() if m.gated}
    assert {m for m in GATE_METRICS if CATALOGUE[m].better == "higher"} == HIGHER_IS_BETTER
    assert {m for m in GATE_METRICS if CATALOGUE[m].follows_meters} == ENERGY_METRICS
    # a gate may only name metrics with a direction
    assert all(CATALOGUE[m].better != "neither" for m in GATE_METRICS)
    # dynamic energy needs the idle baseline, plain energy does not
    assert CATALOGUE["dynamic_energy_j"].needs_baseline
    assert not CATALOGUE["energy_j"].needs_baseline


def test_unknown_names_are_not_in_the_catalogue() -> None:
    assert lookup("energy_per_token") is None
    assert catalogue.unit_of("nope", "?") == "?"
    with pytest.raises(KeyError, match="nope"):
        catalogue.metric("nope")


@pytest.mark.parametrize(
    "module", ["pytest_llem.results.compare", "pytest_llem.report", "pytest_llem.report.html"]
)
def test_comparison_and_reports_load_no_harness_backend_or_meter(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        "bad = sorted(m for m in sys.modules if m.startswith(("
        "'pytest_llem.harness', 'pytest_llem.backends', 'pytest_llem.meters')))\n"
        "print(','.join(bad))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert done.stdout.strip() == ""


def test_render_doc_rewrites_a_stale_table_and_keeps_the_prose() -> None:
    from pytest_llem.results.catalogue_doc import END_MARK, render_doc, section_markdown

    stale = f"prose before\n<!-- llem metrics: window -->\n| old | table |\n{END_MARK}\nafter\n"
    page = render_doc(stale)
    assert page == (
        f"prose before\n<!-- llem metrics: window -->\n{section_markdown('window')}{END_MARK}\n"
        "after\n"
    )
    assert "`duration_s` | s |" in page
    assert render_doc(page) == page
    with pytest.raises(KeyError, match="nope"):
        render_doc(f"<!-- llem metrics: nope -->\n{END_MARK}")


def _record(measured: CaseMeasurement) -> RunRecord:
    case = CaseRecord(
        id="t.py::test_a",
        name="test_a",
        metrics=measured.metrics,
        repetitions=measured.repetitions,
    )
    machine = MachineInfo(hostname="h", platform="linux", python="3.12")
    return RunRecord(
        run_id="r", created_at=datetime.now(timezone.utc), machine=machine, cases=[case]
    )


def test_comparison_says_why_a_side_has_no_value() -> None:
    measured = _run("offline")
    unmeasured = _run("offline", WindowPolicy(target_s=0.0, floor_s=1e6, update_period_s=5e4))
    rules = parse_fail_on("gpu_energy_j:+5%")  # measured, so gated
    comparison = compare_runs(_record(measured), _record(unmeasured), rules)
    (m,) = comparison.metrics
    assert m.verdict == "not judged"
    why = unmeasured.metrics["gpu_energy_j"].note
    assert why is not None
    assert why.startswith("gpu: not measured (window of")
    assert m.reason == f"current has no value ({why}): at least 3 windows per side are needed"

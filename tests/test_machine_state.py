"""The machine-state probe on a fake ``/proc`` whose load the test sets, and the per-case summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pytest_llem.harness.machine_state import (
    MachineProbe,
    gpu_process_counter,
    summarise_machine_state,
)
from pytest_llem.results.drift import DriftMargin
from pytest_llem.results.machine_state import WindowMachineState
from pytest_llem.results.models import DeviceStateRecord, RepetitionRecord
from tests.fakes.fake_proc import TICK, FakeProc, FakeProcess


def _window(fake: FakeProc, probe: MachineProbe | None = None) -> WindowMachineState:
    probe = probe or fake.probe()
    return probe.window(probe.snapshot(), probe.snapshot())


def test_other_processes_cpu_is_all_busy_time_less_this_process_tree(tmp_path: Path):
    fake = FakeProc(tmp_path, cpus=2, freq_mhz=2400)
    fake.own_cores, fake.other_cores, fake.load = 1.0, 0.75, 1.8
    state = _window(fake)
    assert state.seconds == pytest.approx(1.0)
    assert state.cpu_count == 2
    assert state.own_cpu_cores == pytest.approx(1.0)
    assert state.other_cpu_cores == pytest.approx(0.75)
    assert state.load_1m == pytest.approx(1.8)
    assert state.cpu_freq_mhz == pytest.approx(2400)
    assert state.steal_fraction == pytest.approx(0.0)
    assert state.idle_cores == pytest.approx(0.25)
    assert state.other_runnable == 1  # the burner, at both edges
    assert [(p.pid, p.name) for p in state.top_other] == [(FakeProc.other_pid, "burner")]
    assert state.top_other[0].cores == pytest.approx(0.75)


def test_a_quiet_machine_has_no_other_cpu_use(tmp_path: Path):
    fake = FakeProc(tmp_path)
    fake.other_cores = 0.0
    state = _window(fake)
    assert state.other_cpu_cores == pytest.approx(0.0)
    assert state.top_other == []
    assert state.other_runnable == 0
    assert state.idle_cores == pytest.approx(1.0)


def test_a_reaped_child_of_this_run_counts_as_ours(tmp_path: Path):
    fake = FakeProc(tmp_path)
    fake.own_cores = 0.0
    child = FakeProcess(1500, "tokenizer", FakeProc.root_pid, ticks=50)
    fake.processes[child.pid] = child
    probe = fake.probe()
    start = probe.snapshot()
    # The child works 80 more ticks, exits and is reaped: its time moves to the parent's cutime.
    del fake.processes[child.pid]
    fake.processes[FakeProc.root_pid].child_ticks += 130
    fake.busy += 80
    fake.write()
    state = probe.window(start, probe.snapshot())
    assert state.own_cpu_cores == pytest.approx(0.8)
    assert state.other_cpu_cores == pytest.approx(0.0)


def test_a_reused_pid_counts_its_whole_life(tmp_path: Path):
    fake = FakeProc(tmp_path)
    fake.own_cores = 0.0
    probe = fake.probe()
    start = probe.snapshot()
    # The old burner is gone and a new process got its pid: all 40 of its ticks are new.
    fake.processes[FakeProc.other_pid] = FakeProcess(FakeProc.other_pid, "cc1", 1, 40, start=999)
    fake.busy += 40
    fake.write()
    state = probe.window(start, probe.snapshot())
    assert [(p.name, p.cores) for p in state.top_other] == [("cc1", pytest.approx(0.4))]
    assert state.other_cpu_cores == pytest.approx(0.4)


def test_steal_is_a_share_of_all_cpu_time(tmp_path: Path):
    fake = FakeProc(tmp_path, cpus=2)
    fake.steal_cores = 0.5
    state = _window(fake)
    assert state.steal_fraction == pytest.approx(0.25)


def test_cpuinfo_gives_the_frequency_without_cpufreq(tmp_path: Path):
    fake = FakeProc(tmp_path)
    (fake.proc / "cpuinfo").write_text("processor : 0\ncpu MHz : 2000.0\ncpu MHz : 3000.0\n")
    assert _window(fake).cpu_freq_mhz == pytest.approx(2500)


def test_unreadable_figures_are_none_with_the_reason_never_zero(tmp_path: Path):
    fake = FakeProc(tmp_path)
    fake.missing = {"stat", "loadavg"}
    state = _window(fake)
    assert state.other_cpu_cores is None
    assert state.load_1m is None
    assert state.cpu_freq_mhz is None
    assert state.steal_fraction is None
    assert state.gpu_foreign_processes is None
    for name in ("other_cpu_cores", "load_1m", "cpu_freq_mhz", "gpu_foreign_processes"):
        assert state.unavailable[name], name
    assert "stat" in state.unavailable["other_cpu_cores"]


def test_a_missing_proc_tree_is_unavailable(tmp_path: Path):
    probe = MachineProbe(proc=tmp_path / "nothing", sys=tmp_path / "nothing", root_pid=1)
    state = probe.window(probe.snapshot(), probe.snapshot())
    assert state.other_cpu_cores is None
    assert state.own_cpu_cores is None
    assert "unreadable" in state.unavailable["own_cpu_cores"]


class _ListingMeter:
    name = "lister"

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids

    def running_processes(self) -> dict[str, Any]:
        return {"gpu0": [(pid, 100.0) for pid in self.pids]}


def test_foreign_processes_on_the_measured_gpus_are_counted_not_ours(tmp_path: Path):
    fake = FakeProc(tmp_path)
    meter = _ListingMeter([FakeProc.root_pid + 1, 4242, 4343])
    counter = gpu_process_counter([meter])  # type: ignore[list-item]
    assert _window(fake, fake.probe(gpu_processes=counter)).gpu_foreign_processes == 2
    assert gpu_process_counter([])(set()) is None


def test_the_runner_reads_the_edges_outside_the_measured_window(tmp_path: Path):
    """The edges are read after the backend's synchronize and before the meters start, and
    after the meters stop; every window's record carries the state."""
    from pytest_llem.config.models import CaseConfig
    from pytest_llem.harness.runner import run_case
    from tests.fakes.fake_backend import FakeBackend, FakeClock
    from tests.fakes.fake_meter import FakeMeter

    events: list[str] = []
    fake = FakeProc(tmp_path)
    fake.other_cores = 1.5

    class Probe(MachineProbe):
        def snapshot(self):  # type: ignore[no-untyped-def]
            events.append("edge")
            return super().snapshot()

    clock = FakeClock()
    backend = FakeBackend(clock, events)  # type: ignore[arg-type]
    meter = FakeMeter("gpu-fake", clock, events, power_w={"gpu": 200.0})
    probe = Probe(proc=fake.proc, sys=fake.sys, root_pid=fake.root_pid, clock=fake.clock)
    measured = run_case(
        backend=backend,
        meters=[meter],
        config=CaseConfig.model_validate({"warmup": 0, "repeat": 2}),
        prompts=["one two", "three"],
        clock=clock,
        machine=probe,
    )
    window = events[events.index("synchronize") :]
    assert window[1:3] == ["edge", "start:gpu-fake"]
    assert window[window.index("stop:gpu-fake") + 1] == "edge"
    assert events.count("edge") == 4
    states = [rep.machine_state for rep in measured.repetitions]
    assert all(s is not None and s.other_cpu_cores == pytest.approx(1.5) for s in states)


# --- per case --------------------------------------------------------------------------------


def _rep(index: int, other: float | None, **states: DeviceStateRecord) -> RepetitionRecord:
    rep = RepetitionRecord(index=index, duration_s=1.0, requests=1, input_tokens=1, output_tokens=1)
    rep.machine_state = WindowMachineState(seconds=1.0, cpu_count=2, other_cpu_cores=other)
    if states:
        rep.device_states = {"start": dict(states), "end": dict(states)}
    return rep


def test_a_steadily_busy_case_is_busy_not_disturbed():
    reps = [_rep(i, 1.8 + 0.05 * i) for i in range(3)]
    summary = summarise_machine_state(reps, measured_hot=False, margin=DriftMargin())
    assert summary is not None
    assert summary.windows == 3
    assert summary.other_cpu_cores_mean == pytest.approx(1.85)
    assert (summary.other_cpu_cores_min, summary.other_cpu_cores_max) == (1.8, pytest.approx(1.9))
    assert summary.busy
    assert not summary.disturbed


def test_load_that_comes_and_goes_between_windows_disturbs_the_case():
    reps = [_rep(0, 0.0), _rep(1, 1.9), _rep(2, 0.1)]
    summary = summarise_machine_state(reps, measured_hot=False, margin=DriftMargin())
    assert summary is not None
    assert summary.disturbed
    assert summary.disturbances == [
        "other processes' CPU use varied between windows from 0.0 to 1.9 of 2 cores"
    ]
    wide = summarise_machine_state(reps, measured_hot=False, margin=DriftMargin(cpu_cores=2.0))
    assert wide is not None
    assert not wide.disturbed


def test_gpu_state_over_the_windows_from_the_device_states():
    cool = DeviceStateRecord(temperature_c=60, sm_clock_mhz=1980, power_limit_w=700)
    hot = DeviceStateRecord(
        temperature_c=88,
        sm_clock_mhz=1400,
        power_limit_w=700,
        throttle_reasons=["SwPowerCap", "HwThermalSlowdown"],
    )
    reps = [_rep(0, 0.0, gpu0=cool), _rep(1, 0.0, gpu0=cool), _rep(2, 0.0, gpu0=hot)]
    summary = summarise_machine_state(reps, measured_hot=True, margin=DriftMargin())
    assert summary is not None
    gpu = summary.gpus["gpu0"]
    assert gpu.sm_clock_mhz == 1980
    assert gpu.power_limits_w == [700]
    assert gpu.max_temperature_c == 88
    assert gpu.thermal_throttle == ["HwThermalSlowdown"]  # a power cap is the workload's own
    assert summary.measured_hot
    assert summary.disturbances == ["GPU gpu0 throttled (HwThermalSlowdown)"]


def test_a_power_limit_changed_between_windows_disturbs_the_case():
    reps = [
        _rep(0, 0.0, gpu0=DeviceStateRecord(power_limit_w=700)),
        _rep(1, 0.0, gpu0=DeviceStateRecord(power_limit_w=400)),
    ]
    summary = summarise_machine_state(reps, measured_hot=False, margin=DriftMargin())
    assert summary is not None
    assert summary.disturbances == ["GPU gpu0 power limit changed between windows (700, 400 W)"]


def test_no_machine_state_gives_no_summary_and_unreadable_figures_keep_their_reason():
    bare = RepetitionRecord(index=0, duration_s=1.0, requests=1, input_tokens=1, output_tokens=1)
    assert summarise_machine_state([bare], measured_hot=False, margin=DriftMargin()) is None
    rep = _rep(0, None)
    assert rep.machine_state is not None
    rep.machine_state.unavailable = {"other_cpu_cores": "no /proc here"}
    summary = summarise_machine_state([rep], measured_hot=False, margin=DriftMargin())
    assert summary is not None
    assert summary.other_cpu_cores_mean is None
    assert summary.unavailable == {"other_cpu_cores": "no /proc here"}
    assert not summary.busy
    assert not summary.disturbed


def test_fake_tick_matches_the_probe():
    assert TICK == 100


def test_the_mean_weighs_windows_by_length_and_short_windows_resolve_coarsely(tmp_path: Path):
    fake = FakeProc(tmp_path, cpus=2, step_s=0.05)
    state = _window(fake)
    assert state.cpu_resolution_cores == pytest.approx(2 * 2 / TICK / 0.05)  # 0.8 core
    long, short = _rep(0, 0.0), _rep(1, 1.0)
    assert long.machine_state is not None
    assert short.machine_state is not None
    long.machine_state.seconds, short.machine_state.seconds = 3.0, 1.0
    short.machine_state.cpu_resolution_cores = 0.3
    summary = summarise_machine_state([long, short], measured_hot=False, margin=DriftMargin())
    assert summary is not None
    assert summary.other_cpu_cores_mean == pytest.approx(0.25)
    assert summary.cpu_resolution_cores == pytest.approx(0.3)
    # errors of 0 (no resolution given) and 0.3 core x 1 s, over 4 s
    assert summary.mean_resolution_cores == pytest.approx(0.3 / 4)
    # 0.0 and 1.0 differ by 1 core, but by less than 0.5 beyond twice the resolution (0.6).
    assert not summary.disturbed

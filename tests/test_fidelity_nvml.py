"""The NVML meter against a fake pynvml that behaves like nvidia-ml-py and ``nvml.h`` (issue 14):
old drivers, MIG permissions, and the one-second average of ``nvmlDeviceGetPowerUsage``."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from pytest_llem.harness.isolation import check_isolation
from pytest_llem.meters.base import EnergyReading, ProcessesUnknown
from pytest_llem.meters.nvml import NvmlMeter, averaged_power_energy, integrate_power
from tests.fakes.fake_pynvml import (
    NVML_DEVICE_ARCH_AMPERE,
    NVML_DEVICE_ARCH_VOLTA,
    FakeGpu,
    FakeNvml,
    NVMLLibraryMismatchError,
    install,
)
from tests.test_scale_out import ISOLATION_CASE

pytest_plugins = ["pytester"]

UUIDS = [
    "GPU-aaaaaaaa-1111-1111-1111-111111111111",
    "GPU-bbbbbbbb-2222-2222-2222-222222222222",
]
OTHER_PID = 424242


def _nvml(monkeypatch: pytest.MonkeyPatch, *gpus: FakeGpu, **switches: object) -> NvmlMeter:
    install(monkeypatch, list(gpus), **switches)  # type: ignore[arg-type]
    return NvmlMeter(update_period_probe_s=0.05)


# 1. Old drivers: the unversioned process listing raises NVMLLibraryMismatchError --------------


def test_fake_raises_the_library_mismatch_as_a_plain_exception(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = install(
        monkeypatch, [FakeGpu()], driver_lacks={"nvmlDeviceGetComputeRunningProcesses_v3"}
    )
    pynvml = fake.module()
    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    with pytest.raises(NVMLLibraryMismatchError) as raised:
        pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
    assert not isinstance(raised.value, pynvml.NVMLError)
    assert pynvml.nvmlDeviceGetComputeRunningProcesses_v2(handle) == []


def test_old_driver_lists_processes_with_the_v2_call(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu = FakeGpu(uuid=UUIDS[0], processes=[(OTHER_PID, 2**30)])
    meter = _nvml(monkeypatch, gpu, driver_lacks={"nvmlDeviceGetComputeRunningProcesses_v3"})
    try:
        listed = meter.running_processes()
    finally:
        meter.close()
    assert listed == {"gpu0": [(OTHER_PID, 1024.0)]}


def test_a_driver_with_no_listing_reports_the_gpu_unchecked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lacks = {"nvmlDeviceGetComputeRunningProcesses_v3", "nvmlDeviceGetComputeRunningProcesses_v2"}
    meter = _nvml(monkeypatch, FakeGpu(uuid=UUIDS[0]), driver_lacks=lacks)
    try:
        isolation = check_isolation([meter], mode="fail", ours={os.getpid()})
    finally:
        meter.close()
    assert isolation is not None
    assert not isolation.checked
    (unchecked,) = isolation.unchecked
    assert unchecked.device == "gpu0"
    assert "NVMLLibraryMismatchError" in unchecked.reason
    assert isolation.foreign == []


# 3. A MIG-enabled GPU answers NO_PERMISSION to an unprivileged user ---------------------------


def _mig_gpu() -> FakeGpu:
    return FakeGpu(
        uuid=UUIDS[1],
        mig_mode=1,
        mig_devices=["MIG-0e5a8c7e-aaaa-5555-9999-000000000001"],
        processes=[(OTHER_PID, None)],
    )


def test_mig_gpu_is_unchecked_for_an_unprivileged_user(monkeypatch: pytest.MonkeyPatch) -> None:
    meter = _nvml(monkeypatch, FakeGpu(uuid=UUIDS[0]), _mig_gpu())
    try:
        listed = meter.running_processes()
        isolation = check_isolation([meter], mode="warn", ours={os.getpid()})
    finally:
        meter.close()
    assert listed["gpu0"] == []
    unknown = listed["gpu1"]
    assert isinstance(unknown, ProcessesUnknown)
    assert "Insufficient Permissions" in unknown.reason
    assert isolation is not None
    assert not isolation.checked
    assert [u.device for u in isolation.unchecked] == ["gpu1"]


def test_mig_gpu_lists_its_processes_to_root(monkeypatch: pytest.MonkeyPatch) -> None:
    meter = _nvml(monkeypatch, _mig_gpu(), privileged=True)
    try:
        isolation = check_isolation([meter], mode="warn", ours={os.getpid()})
    finally:
        meter.close()
    assert isolation is not None
    assert isolation.checked
    assert [p.pid for p in isolation.foreign] == [OTHER_PID]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "outcome"), [("warn", "passed"), ("skip", "skipped"), ("fail", "failed")]
)
def test_an_unchecked_mig_gpu_is_recorded_and_never_passes_as_isolated(
    pytester: pytest.Pytester,
    tiny_model: Path,
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
    outcome: str,
) -> None:
    gpu = _mig_gpu()
    gpu.counter_step_s = 0.01
    install(monkeypatch, [gpu])
    pytester.makepyfile(ISOLATION_CASE)
    result = pytester.runpytest(
        "-p",
        "no:cacheprovider",
        "--llem-warmup=0",
        "--llem-repeat=1",
        "--llem-meter=nvml",
        "--llem-baseline-s=0",
        f"--llem-isolation={mode}",
    )
    result.assert_outcomes(**{outcome: 1})
    (case,) = json.loads((pytester.path / "reports" / "llem-report.json").read_text())["cases"]
    assert case["outcome"] == outcome
    isolation = case["isolation"]
    assert (isolation["mode"], isolation["checked"], isolation["foreign"]) == (mode, False, [])
    (unchecked,) = isolation["unchecked"]
    assert unchecked["device"] == "gpu0"
    assert "Insufficient Permissions" in unchecked["reason"]
    assert any("could not be checked" in note for note in case["notes"])


# 6. nvmlDeviceGetPowerUsage is a one-second average on Ampere and newer -----------------------


def test_fake_power_usage_is_a_trailing_mean_on_hopper_only() -> None:
    hopper = FakeGpu(power_w=100.0)
    hopper.start_clock(0.0)
    hopper.power_w = 400.0
    hopper.record_power(10.0)
    assert hopper.averages_power_usage
    assert hopper.average_power_w(10.25) == pytest.approx(175.0)
    assert hopper.average_power_w(11.5) == pytest.approx(400.0)
    assert not FakeGpu(
        name="NVIDIA A100-SXM4-80GB", architecture=NVML_DEVICE_ARCH_AMPERE
    ).averages_power_usage
    assert not FakeGpu(
        name="Tesla V100-SXM2-32GB", architecture=NVML_DEVICE_ARCH_VOLTA
    ).averages_power_usage


def test_averaged_power_energy_adds_back_the_lag() -> None:
    # A step from 100 W to 400 W at t=0 seen through a 1 s trailing mean: 400 W x 2 s.
    times, watts = [0.0, 0.5, 1.0, 2.0], [100.0, 250.0, 400.0, 400.0]
    assert integrate_power(times, watts) == pytest.approx(650.0)
    assert averaged_power_energy(times, watts, average_s=1.0) == pytest.approx(800.0)


def _usage_gpu(**fields: object) -> FakeGpu:
    """A GPU at 100 W that answers power only through ``nvmlDeviceGetPowerUsage``."""
    gpu = FakeGpu(uuid=UUIDS[0], power_w=100.0, counter_step_s=0.01)
    for name, value in fields.items():
        setattr(gpu, name, value)
    gpu.unsupported = {"NVML_FI_DEV_POWER_INSTANT"}
    return gpu


def _step_window(meter: NvmlMeter, fake: FakeNvml) -> EnergyReading:
    """A window in which the power steps from 100 W to 400 W as it opens."""
    meter.start()
    fake.set_power(0, 400.0)
    time.sleep(1.3)
    return meter.stop()


def test_averaged_power_usage_integrates_to_the_true_energy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = install(monkeypatch, [_usage_gpu(energy_counter_supported=False)])
    meter = NvmlMeter()
    try:
        info = meter.info()
        reading = _step_window(meter, fake)
    finally:
        meter.close()
    assert info.details["gpu0.power_samples"] == "nvmlDeviceGetPowerUsage"
    assert "1 s trailing average" in info.details["gpu0.power_average"]
    energy = reading.domains["gpu"].energy_j
    assert energy is not None
    # Uncorrected, the mean's lag would lose 0.5 s x 300 W = 150 J of about 520 J.
    assert energy == pytest.approx(400.0 * reading.duration_s, rel=0.05)
    assert any("trailing average" in note for note in reading.notes)
    (timeline,) = reading.timelines
    assert timeline.watts[0] < 200.0 < 390.0 < timeline.watts[-1]  # the mean ramps over ~1 s


def test_cross_check_against_averaged_power_usage_is_fair(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = install(monkeypatch, [_usage_gpu()])
    meter = NvmlMeter()
    try:
        reading = _step_window(meter, fake)
    finally:
        meter.close()
    assert abs(reading.cross_check["gpu"]) < 0.05


def test_instant_power_usage_on_ga100_is_not_corrected(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = install(
        monkeypatch,
        [_usage_gpu(name="NVIDIA A100-SXM4-80GB", architecture=NVML_DEVICE_ARCH_AMPERE)],
    )
    meter = NvmlMeter()
    try:
        info = meter.info()
        reading = _step_window(meter, fake)
    finally:
        meter.close()
    assert "gpu0.power_average" not in info.details
    assert abs(reading.cross_check["gpu"]) < 0.05

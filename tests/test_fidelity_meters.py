"""RAPL, Zeus and CodeCarbon meters against fakes that behave like the kernel's powercap tree,
Zeus 0.16 and CodeCarbon 3.3 (issue 14)."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from pytest_llem.exceptions import MeterUnavailableError
from pytest_llem.meters import codecarbon as codecarbon_meter
from pytest_llem.meters.rapl import rapl_zones
from pytest_llem.meters.zeus import ZeusMeter
from tests.fakes import fake_zeus
from tests.fakes.fake_pynvml import FakeGpu, install
from tests.fakes.fake_rapl import FakeRaplTree, intel_zones

# 5. RAPL under /sys/devices/virtual/powercap: intel-rapl/intel-rapl:0/intel-rapl:0:1 ----------


def test_kernel_powercap_tree_gives_packages_and_their_dram(tmp_path: Path) -> None:
    root = tmp_path / "powercap"
    tree = FakeRaplTree(root, intel_zones(packages=2), nested=True)
    assert tree.path("intel-rapl:1:1") == root / "intel-rapl" / "intel-rapl:1" / "intel-rapl:1:1"
    zones, skipped = rapl_zones(root)
    assert [(z.zone_id, z.label) for z in zones] == [
        ("intel-rapl:0", "package-0"),
        ("intel-rapl:0:1", "dram-0"),
        ("intel-rapl:1", "package-1"),
        ("intel-rapl:1:1", "dram-1"),
    ]
    assert len(skipped) == 2  # the core subzones


# 4. Zeus reads CUDA_VISIBLE_DEVICES with int() --------------------------------------------------


@pytest.mark.parametrize(
    ("visible", "what_zeus_does"),
    [
        ("GPU-aaaaaaaa-1111-1111-1111-111111111111", "invalid literal for int()"),
        ("MIG-0e5a8c7e-aaaa-5555-9999-000000000001", None),  # no GPU, and no error
    ],
)
def test_zeus_meter_refuses_a_selection_zeus_cannot_read(
    monkeypatch: pytest.MonkeyPatch, visible: str, what_zeus_does: str | None
) -> None:
    fake = fake_zeus.install(monkeypatch)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    monitor_class = fake.module()["zeus.monitor"].ZeusMonitor
    if what_zeus_does is None:
        assert monitor_class().gpu_indices == []
    else:
        with pytest.raises(ValueError, match=what_zeus_does):
            monitor_class()
    with pytest.raises(MeterUnavailableError, match="Zeus cannot measure the GPUs") as raised:
        ZeusMeter()
    assert visible in raised.value.reason


def test_zeus_meter_takes_integer_indices_as_zeus_does(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_zeus.install(
        monkeypatch, [fake_zeus.FakeZeusGpu(power_w=100.0), fake_zeus.FakeZeusGpu(power_w=300.0)]
    )
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    meter = ZeusMeter()
    try:
        assert meter.info().devices[0] == "gpu0"
        meter.start()
        time.sleep(0.25)
        reading = meter.stop()
    finally:
        meter.close()
    energy = reading.domains["gpu"].energy_j
    assert energy is not None
    assert energy > 150.0 * reading.duration_s  # the 300 W GPU, not the 100 W one


# 8. CodeCarbon's num_gpus counts every GPU, not the monitored ones ----------------------------


def test_codecarbon_gpu_label_names_the_monitored_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("codecarbon", reason="codecarbon is not installed")
    gpu_nvidia = pytest.importorskip("codecarbon.core.gpu_nvidia")
    core_gpu = pytest.importorskip("codecarbon.core.gpu")
    from codecarbon.external.hardware import GPU

    names = ["NVIDIA H100 80GB HBM3", "NVIDIA H100 80GB HBM3", "NVIDIA L4", "NVIDIA L4"]
    fake = install(
        monkeypatch,
        [
            FakeGpu(name=n, uuid=f"GPU-{i}{i}aaaaaa-0000-0000-0000-000000000000")
            for i, n in enumerate(names)
        ],
    )
    monkeypatch.setattr(gpu_nvidia, "pynvml", fake.module())
    monkeypatch.setattr(core_gpu, "PYNVML_AVAILABLE", True)
    hardware = GPU.from_utils(gpu_ids=["1", "3"])  # what the tracker does with gpu_ids
    assert hardware.num_gpus == 4
    coverage = codecarbon_meter._coverage(SimpleNamespace(_hardware=[hardware]))["gpu"]
    assert coverage.method is not None
    assert coverage.method.startswith("2 of 4 GPU(s)")
    assert "1: NVIDIA H100 80GB HBM3, 3: NVIDIA L4" in coverage.method

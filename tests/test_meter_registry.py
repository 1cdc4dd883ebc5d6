"""Tests of meter selection: ``auto`` and building meters by name."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pytest_llem.exceptions import ConfigurationError, MeterUnavailableError
from pytest_llem.meters import registry
from pytest_llem.meters.codecarbon import CodeCarbonMeter
from pytest_llem.meters.none import NoneMeter
from pytest_llem.meters.nvml import NvmlMeter
from pytest_llem.meters.registry import (
    METER_CHOICES,
    create_auto_meter,
    create_meter,
    select_auto,
)
from tests.fakes.fake_pynvml import FakeGpu, install


def _hide_codecarbon(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "codecarbon", None)


def test_auto_picks_nvml_with_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch)
    assert select_auto() == ("nvml", "nvml: 1 NVIDIA GPU visible")
    meter, reason = create_auto_meter()
    try:
        assert isinstance(meter, NvmlMeter)
        assert reason == "nvml: 1 NVIDIA GPU visible"
    finally:
        meter.close()


def test_auto_counts_only_visible_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, [FakeGpu(uuid="GPU-a"), FakeGpu(uuid="GPU-b"), FakeGpu(uuid="GPU-c")])
    assert select_auto() == ("nvml", "nvml: 3 NVIDIA GPUs visible")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert select_auto() == ("nvml", "nvml: 1 NVIDIA GPU visible")


def test_auto_picks_codecarbon_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("codecarbon", reason="codecarbon is not installed")
    install(monkeypatch, library_found=False)
    assert select_auto() == (
        "codecarbon",
        "codecarbon: no GPU visible (NVML library not found (no NVIDIA driver)); "
        "codecarbon installed",
    )


def test_auto_picks_none_without_gpu_or_codecarbon(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, library_found=False)
    _hide_codecarbon(monkeypatch)
    name, reason = select_auto()
    assert name == "none"
    assert reason.startswith("none: no GPU visible (NVML library not found")
    assert reason.endswith("and codecarbon not installed")
    meter, why = create_auto_meter()
    assert isinstance(meter, NoneMeter)
    assert why == reason


def test_auto_says_when_cuda_hides_every_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch)
    _hide_codecarbon(monkeypatch)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    name, reason = select_auto()
    assert name == "none"
    assert reason.startswith("none: no NVIDIA GPU visible (CUDA_VISIBLE_DEVICES=''")


def test_auto_falls_back_to_none_when_the_choice_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch)

    def broken(*args: object, **kwargs: object) -> NvmlMeter:
        raise MeterUnavailableError("nvml", "broken on purpose")

    monkeypatch.setattr(registry, "NvmlMeter", broken)
    meter, reason = create_auto_meter()
    assert isinstance(meter, NoneMeter)
    assert reason.endswith("but nvml failed to start (broken on purpose): none")


def test_create_meter_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, [FakeGpu(uuid="GPU-a"), FakeGpu(uuid="GPU-b")])
    nvml = create_meter("nvml", gpu_indices=[1])
    try:
        assert isinstance(nvml, NvmlMeter)
        assert [d.split(":")[0] for d in nvml.info().devices] == ["gpu1"]
    finally:
        nvml.close()
    assert isinstance(create_meter(" None "), NoneMeter)
    auto = create_meter("auto")
    try:
        assert isinstance(auto, NvmlMeter)
    finally:
        auto.close()


def test_create_codecarbon_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("codecarbon", reason="codecarbon is not installed")
    monkeypatch.chdir(tmp_path)
    meter = create_meter("codecarbon")
    try:
        assert isinstance(meter, CodeCarbonMeter)
    finally:
        meter.close()


def test_named_meter_that_cannot_measure_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, library_found=False)
    with pytest.raises(MeterUnavailableError, match="NVML library not found"):
        create_meter("nvml")


def test_unknown_meter_name_lists_the_choices() -> None:
    with pytest.raises(ConfigurationError, match="auto, nvml, codecarbon, none") as info:
        create_meter("rapl")
    assert "'rapl'" in str(info.value)
    assert METER_CHOICES == ("auto", "nvml", "codecarbon", "none")

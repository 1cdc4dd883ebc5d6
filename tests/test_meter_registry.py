"""Tests of meter selection: ``auto`` and building meters by name."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pytest_llem.exceptions import ConfigurationError, MeterUnavailableError
from pytest_llem.meters import registry
from pytest_llem.meters.base import MeterInfo, MeterResolution
from pytest_llem.meters.codecarbon import CodeCarbonMeter
from pytest_llem.meters.none import NoneMeter
from pytest_llem.meters.nvml import NvmlMeter
from pytest_llem.meters.registry import (
    METER_CHOICES,
    assign_domains,
    create_auto_meter,
    create_meter,
    parse_meter_list,
    select_auto,
)
from tests.fakes.fake_pynvml import FakeGpu, install


def _hide_codecarbon(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "codecarbon", None)


@pytest.fixture(autouse=True)
def no_rapl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No RAPL unless a test builds a tree (the real /sys is whatever this machine has)."""
    monkeypatch.setenv("LLEM_RAPL_ROOT", str(tmp_path / "no-powercap"))


def test_auto_picks_nvml_with_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch)
    name, why = select_auto()
    assert name == "nvml"
    assert why.startswith("nvml: 1 NVIDIA GPU visible; cpu and dram not measured (no powercap")
    meters, reason = create_auto_meter()
    try:
        assert [type(m) for m in meters] == [NvmlMeter]
        assert reason == why
    finally:
        for meter in meters:
            meter.close()


def test_auto_counts_only_visible_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, [FakeGpu(uuid="GPU-a"), FakeGpu(uuid="GPU-b"), FakeGpu(uuid="GPU-c")])
    assert select_auto()[1].startswith("nvml: 3 NVIDIA GPUs visible")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert select_auto()[1].startswith("nvml: 1 NVIDIA GPU visible")


def test_auto_picks_codecarbon_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("codecarbon", reason="codecarbon is not installed")
    install(monkeypatch, library_found=False)
    assert select_auto() == (
        "codecarbon",
        "codecarbon: no GPU visible (NVML library not found (no NVIDIA driver)); "
        "no readable RAPL; codecarbon installed",
    )


def test_auto_picks_none_without_gpu_or_codecarbon(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, library_found=False)
    _hide_codecarbon(monkeypatch)
    name, reason = select_auto()
    assert name == "none"
    assert reason.startswith("none: no GPU visible (NVML library not found")
    assert reason.endswith("and codecarbon not installed")
    meters, why = create_auto_meter()
    assert [type(m) for m in meters] == [NoneMeter]
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
    meters, reason = create_auto_meter()
    assert [type(m) for m in meters] == [NoneMeter]
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
    with pytest.raises(
        ConfigurationError, match="auto, nvml, rapl, zeus, codecarbon, none"
    ) as info:
        create_meter("joulemeter")
    assert "'joulemeter'" in str(info.value)
    assert METER_CHOICES == ("auto", "nvml", "rapl", "zeus", "codecarbon", "none")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nvml,nope", "unknown meter 'nope'"),
        ("nvml,nvml", "'nvml' is named twice"),
        ("auto,rapl", "'auto' cannot be combined"),
        ("none,nvml", "'none' cannot be combined"),
        (" , ", "no meter named"),
    ],
)
def test_meter_lists_are_checked(text: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        parse_meter_list(text)


def test_meter_list_keeps_order() -> None:
    assert parse_meter_list("NVML, rapl") == ("nvml", "rapl")


def _info(name: str, sources: dict[str, str]) -> MeterInfo:
    return MeterInfo(
        name=name, domains=tuple(sources), sources=sources, resolution=MeterResolution()
    )


def test_each_domain_comes_from_the_most_direct_meter() -> None:
    codecarbon = _info("codecarbon", {"gpu": "measured", "cpu": "estimated", "dram": "estimated"})
    nvml = _info("nvml", {"gpu": "measured"})
    rapl = _info("rapl", {"cpu": "measured", "dram": "measured"})
    assignment = assign_domains([codecarbon, nvml, rapl])
    assert assignment.meters == {"gpu": "nvml", "cpu": "rapl", "dram": "rapl"}
    assert assignment.used_for("codecarbon") == []
    assert len(assignment.notes) == 3
    assert any("gpu: taken from nvml" in n and "codecarbon's gpu" in n for n in assignment.notes)


def test_codecarbon_keeps_the_domains_nothing_else_covers() -> None:
    codecarbon = _info("codecarbon", {"cpu": "estimated", "dram": "estimated"})
    nvml = _info("nvml", {"gpu": "measured"})
    assignment = assign_domains([nvml, codecarbon])
    assert assignment.meters == {"gpu": "nvml", "cpu": "codecarbon", "dram": "codecarbon"}
    assert assignment.notes == ()


def test_measured_beats_estimated_for_unknown_meters() -> None:
    guess = _info("guess", {"cpu": "estimated"})
    probe = _info("probe", {"cpu": "measured"})
    assert assign_domains([guess, probe]).meters == {"cpu": "probe"}

"""Meter selection: build a meter by name, or pick the best one this machine offers (``auto``).

``auto`` prefers NVML when an NVIDIA GPU is visible, then CodeCarbon when it is installed, then
``none`` (time only), and says in words why it chose what it chose.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from pytest_llem.exceptions import ConfigurationError, MeterUnavailableError
from pytest_llem.meters.base import EnergyMeter
from pytest_llem.meters.codecarbon import CodeCarbonMeter, codecarbon_unavailable_reason
from pytest_llem.meters.none import NoneMeter
from pytest_llem.meters.nvml import NvmlMeter, nvml_gpus

__all__ = ["METER_CHOICES", "create_auto_meter", "create_meter", "select_auto"]

logger = logging.getLogger("pytest_llem")

#: Every value ``--llem-meter`` accepts.
METER_CHOICES: tuple[str, ...] = ("auto", "nvml", "codecarbon", "none")


def select_auto() -> tuple[str, str]:
    """Choose the concrete meter ``auto`` stands for on this machine, without starting it.

    Returns:
        The meter's name and the reason in words, such as ``"nvml: 1 NVIDIA GPU visible"``.
    """
    gpus, why_no_gpu = nvml_gpus()
    if gpus:
        plural = "" if len(gpus) == 1 else "s"
        return "nvml", f"nvml: {len(gpus)} NVIDIA GPU{plural} visible"
    why = why_no_gpu or "NVML lists no GPU"
    no_gpu = why if why.startswith("no ") else f"no GPU visible ({why})"
    if codecarbon_unavailable_reason() is None:
        return "codecarbon", f"codecarbon: {no_gpu}; codecarbon installed"
    return "none", f"none: {no_gpu} and codecarbon not installed"


def create_meter(name: str, *, gpu_indices: Sequence[int] | None = None) -> EnergyMeter:
    """Build the meter called ``name``.

    Args:
        name: One of :data:`METER_CHOICES`.
        gpu_indices: GPUs for the NVML meter, as the process sees them; None means all visible.
            CodeCarbon picks its GPUs from ``CUDA_VISIBLE_DEVICES`` itself.

    Returns:
        The meter, ready for its first window.

    Raises:
        ConfigurationError: ``name`` is not a known meter.
        MeterUnavailableError: The named meter cannot measure on this machine.
    """
    key = name.strip().lower()
    if key == "auto":
        return create_auto_meter(gpu_indices=gpu_indices)[0]
    if key == "nvml":
        return NvmlMeter(gpu_indices)
    if key == "codecarbon":
        return CodeCarbonMeter()
    if key == "none":
        return NoneMeter()
    raise ConfigurationError(
        f"unknown energy meter {name!r}; choose one of: {', '.join(METER_CHOICES)}"
    )


def create_auto_meter(*, gpu_indices: Sequence[int] | None = None) -> tuple[EnergyMeter, str]:
    """Build the meter :func:`select_auto` chooses; fall back to ``none`` if it fails to start.

    Args:
        gpu_indices: GPUs for the NVML meter, as in :func:`create_meter`.

    Returns:
        The meter and the reason it was chosen.
    """
    name, reason = select_auto()
    try:
        return create_meter(name, gpu_indices=gpu_indices), reason
    except MeterUnavailableError as e:
        logger.warning("meter %s could not start (%s); measuring time only", name, e.reason)
        return NoneMeter(), f"{reason}; but {name} failed to start ({e.reason}): none"

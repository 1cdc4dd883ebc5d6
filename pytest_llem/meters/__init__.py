"""Energy meters: the EnergyMeter protocol, one module per meter, and meter selection.

Each meter converts its vendor's units to joules inside its own module; past this package every
figure is SI and says whether it was measured or estimated.
"""

from __future__ import annotations

from pytest_llem.meters.base import (
    DOMAINS,
    Domain,
    DomainReading,
    EnergyMeter,
    EnergyReading,
    MeterInfo,
    MeterResolution,
    Source,
)
from pytest_llem.meters.codecarbon import CodeCarbonMeter
from pytest_llem.meters.none import NoneMeter
from pytest_llem.meters.nvml import NvmlGpu, NvmlMeter, nvml_gpus
from pytest_llem.meters.registry import (
    METER_CHOICES,
    create_auto_meter,
    create_meter,
    select_auto,
)

__all__ = [
    "DOMAINS",
    "METER_CHOICES",
    "CodeCarbonMeter",
    "Domain",
    "DomainReading",
    "EnergyMeter",
    "EnergyReading",
    "MeterInfo",
    "MeterResolution",
    "NoneMeter",
    "NvmlGpu",
    "NvmlMeter",
    "Source",
    "create_auto_meter",
    "create_meter",
    "nvml_gpus",
    "select_auto",
]

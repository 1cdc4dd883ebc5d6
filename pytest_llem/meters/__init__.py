"""Energy meters: the EnergyMeter protocol, one module per meter, and meter selection.

Each meter converts its vendor's units to joules inside its own module; past this package every
figure is SI and says whether it was measured or estimated.
"""

from __future__ import annotations

from pytest_llem.meters.base import (
    DOMAINS,
    DeviceState,
    Domain,
    DomainReading,
    EnergyMeter,
    EnergyReading,
    MeterInfo,
    MeterResolution,
    PowerTimeline,
    ProcessesUnknown,
    Source,
)
from pytest_llem.meters.capabilities import (
    LapsMidWindow,
    ListsProcesses,
    ReportsDeviceStates,
    reads_mid_window,
)
from pytest_llem.meters.codecarbon import CodeCarbonMeter
from pytest_llem.meters.inventory import gpu_inventory
from pytest_llem.meters.none import NoneMeter
from pytest_llem.meters.nvml import NvmlMeter
from pytest_llem.meters.rapl import RaplMeter, rapl_unavailable_reason
from pytest_llem.meters.registry import (
    DOMAIN_PREFERENCE,
    METER_CHOICES,
    DomainAssignment,
    assign_domains,
    create_auto_meter,
    create_meter,
    parse_meter_list,
    select_auto,
)
from pytest_llem.meters.window import WindowedMeter
from pytest_llem.meters.zeus import ZeusMeter, zeus_unavailable_reason

__all__ = [
    "DOMAINS",
    "DOMAIN_PREFERENCE",
    "METER_CHOICES",
    "CodeCarbonMeter",
    "DeviceState",
    "Domain",
    "DomainAssignment",
    "DomainReading",
    "EnergyMeter",
    "EnergyReading",
    "LapsMidWindow",
    "ListsProcesses",
    "MeterInfo",
    "MeterResolution",
    "NoneMeter",
    "NvmlMeter",
    "PowerTimeline",
    "ProcessesUnknown",
    "RaplMeter",
    "ReportsDeviceStates",
    "Source",
    "WindowedMeter",
    "ZeusMeter",
    "assign_domains",
    "create_auto_meter",
    "create_meter",
    "gpu_inventory",
    "parse_meter_list",
    "rapl_unavailable_reason",
    "reads_mid_window",
    "select_auto",
    "zeus_unavailable_reason",
]

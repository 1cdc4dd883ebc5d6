"""Meter selection: build meters by name, combine several without counting a domain twice, and
pick the best source per domain this machine offers (``auto``).

``--llem-meter`` takes one name or a comma-separated list (``nvml,rapl``). Every domain (gpu, cpu,
dram) is then taken from exactly one meter: the most direct source that covers it
(:data:`DOMAIN_PREFERENCE`, measured before estimated), and the run record says which meter
supplied which domain and which figures were left unused.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from pytest_llem.config.meter_names import METER_CHOICES, parse_meter_list
from pytest_llem.exceptions import ConfigurationError, MeterUnavailableError
from pytest_llem.meters.base import DOMAINS, EnergyMeter, MeterInfo
from pytest_llem.meters.codecarbon import CodeCarbonMeter, codecarbon_unavailable_reason
from pytest_llem.meters.inventory import gpu_inventory
from pytest_llem.meters.none import NoneMeter
from pytest_llem.meters.nvml import NvmlMeter

__all__ = [
    "DOMAIN_PREFERENCE",
    "METER_CHOICES",
    "DomainAssignment",
    "MeterSettings",
    "assign_domains",
    "create_auto_meter",
    "create_meter",
    "parse_meter_list",
    "select_auto",
]

logger = logging.getLogger("pytest_llem")

#: Per domain, the meters in order of how directly they measure it. A hardware counter read
#: by this process (NVML, RAPL) beats a library reading the same counter (Zeus), which beats
#: CodeCarbon (counters where it finds them, estimates otherwise).
DOMAIN_PREFERENCE: dict[str, tuple[str, ...]] = {
    "gpu": ("nvml", "zeus", "codecarbon"),
    "cpu": ("rapl", "zeus", "codecarbon"),
    "dram": ("rapl", "zeus", "codecarbon"),
}


@dataclass(frozen=True)
class DomainAssignment:
    """Which meter supplies each domain, and what was left unused to avoid double counting."""

    meters: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def used_for(self, meter: str) -> list[str]:
        """The domains taken from ``meter``, in canonical order."""
        return [d for d in DOMAINS if self.meters.get(d) == meter]


def _rank(domain: str, info: MeterInfo, position: int) -> tuple[int, int, int]:
    preference = DOMAIN_PREFERENCE.get(domain, ())
    direct = preference.index(info.name) if info.name in preference else len(preference)
    estimated = int(info.sources.get(domain) != "measured")
    return (estimated, direct, position)


def assign_domains(infos: Sequence[MeterInfo]) -> DomainAssignment:
    """Take each domain from the most direct meter that covers it.

    Args:
        infos: The meters' descriptions, in the order the user named them.

    Returns:
        The meter per covered domain, and a note for each figure left unused because a more
        direct meter covers the same domain (so no domain is ever counted twice).
    """
    meters: dict[str, str] = {}
    notes: list[str] = []
    for domain in DOMAINS:
        covering = [(i, info) for i, info in enumerate(infos) if domain in info.domains]
        if not covering:
            continue
        ranked = sorted(covering, key=lambda pair: _rank(domain, pair[1], pair[0]))
        chosen = ranked[0][1]
        meters[domain] = chosen.name
        for _, other in ranked[1:]:
            notes.append(
                f"{domain}: taken from {chosen.name} ({chosen.sources.get(domain, '?')}); "
                f"{other.name}'s {domain} figure ({other.sources.get(domain, '?')}) is not "
                "used, so the domain is counted once"
            )
    return DomainAssignment(meters, tuple(notes))


def _rapl_reason() -> str | None:
    from pytest_llem.meters.rapl import rapl_unavailable_reason

    return rapl_unavailable_reason()


def select_auto() -> tuple[str, str]:
    """Choose the meters ``auto`` stands for on this machine, without starting them.

    The GPU domain comes from NVML when an NVIDIA GPU is visible; CPU and DRAM from RAPL when
    its counters are readable. Without either, CodeCarbon (mostly estimates) when installed,
    else ``none`` (time only). CodeCarbon is not added beside NVML or RAPL: its CPU figure is
    then an estimate, and mixing it in would make every total an estimate.

    Returns:
        The meter names joined with commas (``"nvml,rapl"``) and the reason in words.
    """
    gpus, why_no_gpu = gpu_inventory()
    rapl_missing = _rapl_reason()
    chosen: list[str] = []
    reasons: list[str] = []
    if gpus:
        plural = "" if len(gpus) == 1 else "s"
        chosen.append("nvml")
        reasons.append(f"nvml: {len(gpus)} NVIDIA GPU{plural} visible")
    if rapl_missing is None:
        chosen.append("rapl")
        reasons.append("rapl: CPU energy counters readable")
    if chosen:
        if rapl_missing is not None:
            reasons.append(f"cpu and dram not measured ({rapl_missing})")
        return ",".join(chosen), "; ".join(reasons)
    why = why_no_gpu or "NVML lists no GPU"
    no_gpu = why if why.startswith("no ") else f"no GPU visible ({why})"
    if codecarbon_unavailable_reason() is None:
        return "codecarbon", f"codecarbon: {no_gpu}; no readable RAPL; codecarbon installed"
    return "none", f"none: {no_gpu}, no readable RAPL and codecarbon not installed"


class MeterSettings(Protocol):
    """What building a meter reads of the run's options (``options.EnergyOptions`` has it)."""

    @property
    def country_iso_code(self) -> str | None:
        """``--llem-country``: CodeCarbon's country for emissions (None: USA)."""
        ...


def create_meter(
    name: str, *, gpu_indices: Sequence[int] | None = None, options: MeterSettings | None = None
) -> EnergyMeter:
    """Build the meter called ``name``.

    Args:
        name: One of :data:`METER_CHOICES` (``auto`` builds the first meter it chooses).
        gpu_indices: GPUs for the NVML and Zeus meters, as the process sees them; None means
            all visible. CodeCarbon picks its GPUs from ``CUDA_VISIBLE_DEVICES`` itself.
        options: How energy is measured (``--llem-country``: CodeCarbon's country for
            emissions, USA when not given); None for the defaults.

    Returns:
        The meter, ready for its first window.

    Raises:
        ConfigurationError: ``name`` is not a known meter.
        MeterUnavailableError: The named meter cannot measure on this machine.
    """
    key = name.strip().lower()
    if key == "auto":
        return create_auto_meter(gpu_indices=gpu_indices)[0][0]
    if key == "nvml":
        return NvmlMeter(gpu_indices)
    if key == "rapl":
        from pytest_llem.meters.rapl import RaplMeter

        return RaplMeter()
    if key == "zeus":
        from pytest_llem.meters.zeus import ZeusMeter

        return ZeusMeter(gpu_indices=gpu_indices)
    if key == "codecarbon":
        country = options.country_iso_code if options is not None else None
        return CodeCarbonMeter(country or "USA")
    if key == "none":
        return NoneMeter()
    raise ConfigurationError(
        f"unknown energy meter {name!r}; choose one of: {', '.join(METER_CHOICES)}"
    )


def create_auto_meter(*, gpu_indices: Sequence[int] | None = None) -> tuple[list[EnergyMeter], str]:
    """Build the meters :func:`select_auto` chooses; one that fails to start is dropped with a
    warning (``none`` when none is left).

    Args:
        gpu_indices: GPUs for the NVML meter, as in :func:`create_meter`.

    Returns:
        The meters and the reason they were chosen.
    """
    names, reason = select_auto()
    meters: list[EnergyMeter] = []
    for name in names.split(","):
        try:
            meters.append(create_meter(name, gpu_indices=gpu_indices))
        except MeterUnavailableError as e:
            logger.warning("meter %s could not start (%s)", name, e.reason)
            reason = f"{reason}; but {name} failed to start ({e.reason})"
    if not meters:
        return [NoneMeter()], f"{reason}: none"
    return meters, reason

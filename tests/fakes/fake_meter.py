"""A fake EnergyMeter: constant power per domain integrated over the shared fake clock.

Energy over a window is ``power_w[domain] * (clock at stop - clock at start)``. Domains named
in ``missing`` cannot be measured (energy None with the reason, never 0), and a meter can be
told to fail on start or stop to exercise the runner's error handling.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal

from pytest_llem.exceptions import EnergyMeterError
from pytest_llem.meters.base import (
    Domain,
    DomainReading,
    EnergyReading,
    MeterInfo,
    MeterResolution,
    Source,
)

__all__ = ["FakeMeter", "no_dram_meter"]


class FakeMeter:
    """An EnergyMeter whose power per domain is fixed.

    Args:
        name: Meter name (also used in the event log as ``start:<name>``).
        clock: The shared clock.
        events: Shared event log.
        power_w: Constant power per measured domain.
        sources: measured or estimated per domain (measured when not given).
        missing: Domains it covers but cannot measure, with the reason.
        emissions_kg_per_j: Emissions per joule, if the meter reports emissions.
        fail_on: Raise EnergyMeterError on ``start`` or ``stop`` of this (1-based) window.
    """

    def __init__(
        self,
        name: str,
        clock: Callable[[], float],
        events: list[str] | None = None,
        *,
        power_w: Mapping[Domain, float],
        sources: Mapping[Domain, Source] | None = None,
        missing: Mapping[Domain, str] | None = None,
        emissions_kg_per_j: float | None = None,
        fail_on: tuple[Literal["start", "stop"], int] | None = None,
    ) -> None:
        self.name = name
        self.clock = clock
        self.events = events if events is not None else []
        self.power_w = dict(power_w)
        self.sources = dict(sources or {})
        self.missing = dict(missing or {})
        self.emissions_kg_per_j = emissions_kg_per_j
        self.fail_on = fail_on
        self.windows = 0
        self.started_at: float | None = None
        self.closed = False

    @property
    def running(self) -> bool:
        """Whether a window is open."""
        return self.started_at is not None

    def info(self) -> MeterInfo:
        domains = (*self.power_w, *self.missing)
        return MeterInfo(
            name=self.name,
            domains=tuple(domains),
            sources={d: self.sources.get(d, "measured") for d in domains},
            resolution=MeterResolution(update_period_s=None, energy_quantum_j=None),
        )

    def start(self) -> None:
        if self.running:
            raise EnergyMeterError(f"{self.name}: window already open")
        self.windows += 1
        self.events.append(f"start:{self.name}")
        if self.fail_on == ("start", self.windows):
            raise EnergyMeterError(f"{self.name}: scripted start failure")
        self.started_at = self.clock()

    def stop(self) -> EnergyReading:
        if self.started_at is None:
            raise EnergyMeterError(f"{self.name}: stop without start")
        self.events.append(f"stop:{self.name}")
        duration = self.clock() - self.started_at
        self.started_at = None
        if self.fail_on == ("stop", self.windows):
            raise EnergyMeterError(f"{self.name}: scripted stop failure")
        domains: dict[str, DomainReading] = {
            d: DomainReading(d, p * duration, self.sources.get(d, "measured"))
            for d, p in self.power_w.items()
        }
        for d, reason in self.missing.items():
            domains[d] = DomainReading(d, None, self.sources.get(d, "measured"), reason=reason)
        total = sum(p * duration for p in self.power_w.values())
        emissions = None if self.emissions_kg_per_j is None else total * self.emissions_kg_per_j
        return EnergyReading(
            meter=self.name, duration_s=duration, domains=domains, emissions_kg=emissions
        )

    def lap(self) -> EnergyReading:
        """Energy since start, the window staying open."""
        if self.started_at is None:
            raise EnergyMeterError(f"{self.name}: lap without start")
        self.events.append(f"lap:{self.name}")
        duration = self.clock() - self.started_at
        domains = {
            d: DomainReading(d, p * duration, self.sources.get(d, "measured"))
            for d, p in self.power_w.items()
        }
        for d, reason in self.missing.items():
            domains[d] = DomainReading(d, None, self.sources.get(d, "measured"), reason=reason)
        return EnergyReading(meter=self.name, duration_s=duration, domains=domains)

    def close(self) -> None:
        self.closed = True


def no_dram_meter(
    clock: Callable[[], float], events: list[str] | None = None, *, cpu_w: float = 50.0
) -> FakeMeter:
    """A RAPL-like meter that measures the CPU package but has no DRAM counter."""
    return FakeMeter(
        "rapl-fake",
        clock,
        events,
        power_w={"cpu": cpu_w},
        missing={"dram": "no DRAM energy counter on this CPU"},
    )

"""What some meters can do beyond ``start``/``stop``: small Protocols checked with ``isinstance``.

The harness asks a meter for a capability by ``isinstance(meter, LapsMidWindow)`` (and the
like), never by probing attribute names: a meter states what it can do by having the methods
below, with the signatures below, and mypy checks both sides.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from pytest_llem.meters.base import DeviceState, EnergyReading, ProcessesUnknown

__all__ = [
    "ConditionalLap",
    "DeviceProcesses",
    "LapsMidWindow",
    "ListsProcesses",
    "ReportsDeviceStates",
    "reads_mid_window",
]

#: Per device label, the ``(pid, used memory in MiB or None)`` of its compute processes, or
#: :class:`ProcessesUnknown` with the reason where they cannot be listed.
DeviceProcesses = dict[str, list[tuple[int, float | None]] | ProcessesUnknown]


@runtime_checkable
class LapsMidWindow(Protocol):
    """Protocol of a meter that reads its energy without closing the window.

    The steady-state measurement and the idle baseline use it. An instance that has ``lap()``
    but cannot use it here (NVML on a GPU without an energy counter) also has
    ``reads_mid_window`` False (:class:`ConditionalLap`); :func:`reads_mid_window` asks both.
    """

    def lap(self) -> EnergyReading:
        """The energy since ``start()``, the window staying open."""
        ...


@runtime_checkable
class ConditionalLap(Protocol):
    """Protocol of a meter whose ``lap()`` works on some instances only."""

    @property
    def reads_mid_window(self) -> bool:
        """Whether this instance's ``lap()`` works."""
        ...


@runtime_checkable
class ReportsDeviceStates(Protocol):
    """Protocol of a meter that reports each measured device's state now (temperature,
    clocks); cooldown and the idle baseline use it."""

    def device_states(self) -> dict[str, DeviceState]:
        """Each measured device's state, by device label."""
        ...


@runtime_checkable
class ListsProcesses(Protocol):
    """Protocol of a meter that lists the compute processes on its devices; isolation checks
    use it."""

    def running_processes(self) -> DeviceProcesses:
        """Per device label, its compute processes or why they cannot be listed."""
        ...


def reads_mid_window(meter: object) -> bool:
    """Whether ``meter`` can read its energy without closing the window (``lap()``)."""
    if not isinstance(meter, LapsMidWindow):
        return False
    return meter.reads_mid_window if isinstance(meter, ConditionalLap) else True

"""Thermal state between cases: wait for the GPU to cool before a case, flag cases measured hot.

Back-to-back cases heat the GPU, and leakage power rises with temperature, so a later case pays
for an earlier one. ``--llem-cooldown=temperature`` waits (bounded) until every measured device
is within :data:`COOLDOWN_MARGIN_C` of its idle temperature from the baseline;
``seconds:N`` simply waits N seconds. A window that starts more than :data:`HOT_MARGIN_C`
above idle is flagged as measured hot.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence

from pytest_llem.exceptions import EnergyMeterError
from pytest_llem.meters.base import EnergyMeter
from pytest_llem.meters.capabilities import ReportsDeviceStates
from pytest_llem.results.models import CooldownRecord, RepetitionRecord

__all__ = [
    "COOLDOWN_MARGIN_C",
    "COOLDOWN_MAX_S",
    "COOLDOWN_POLL_S",
    "HOT_MARGIN_C",
    "cool_down",
    "device_temperatures",
    "measured_hot",
]

logger = logging.getLogger("pytest_llem")

#: Cooling is done when every device is within this many degrees of its idle temperature.
COOLDOWN_MARGIN_C = 3.0
#: The longest wait for cooling, seconds; the record says when it was not reached.
COOLDOWN_MAX_S = 120.0
#: How often temperatures are read while waiting, seconds.
COOLDOWN_POLL_S = 0.5
#: A window starting this much above idle temperature is flagged as measured hot.
HOT_MARGIN_C = 5.0


def device_temperatures(meters: Sequence[EnergyMeter]) -> dict[str, float]:
    """The temperature of every device a meter reports, now (device label -> degrees C)."""
    found: dict[str, float] = {}
    for meter in meters:
        if not isinstance(meter, ReportsDeviceStates):
            continue
        try:
            for label, state in meter.device_states().items():
                if state.temperature_c is not None:
                    found[label] = float(state.temperature_c)
        except EnergyMeterError as e:
            logger.debug("%s: cannot read temperatures: %s", meter.name, e)
    return found


def _excess(now: Mapping[str, float], idle: Mapping[str, float]) -> float:
    """The largest amount by which a device is warmer than its idle temperature."""
    return max((now[label] - idle[label] for label in now if label in idle), default=0.0)


def cool_down(
    meters: Sequence[EnergyMeter],
    *,
    mode: str,
    seconds: float = 0.0,
    idle_temperatures: Mapping[str, float],
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    max_wait_s: float = COOLDOWN_MAX_S,
) -> CooldownRecord | None:
    """Wait before a case as ``--llem-cooldown`` asks.

    Args:
        meters: The session's meters (those with ``device_states`` report temperatures).
        mode: ``off``, ``temperature`` or ``seconds``.
        seconds: The wait for ``seconds``.
        idle_temperatures: Device label -> idle temperature, from the baseline.
        sleep: How to wait.
        clock: Monotonic clock for the bound.
        max_wait_s: Longest wait for ``temperature``.

    Returns:
        What was done, or None when the mode is ``off``.
    """
    if mode == "off":
        return None
    before = device_temperatures(meters)
    start = clock()
    if mode == "seconds":
        sleep(seconds)
        after = device_temperatures(meters)
        return CooldownRecord(
            mode=mode,
            waited_s=clock() - start,
            start_temperature_c=max(before.values(), default=None),
            end_temperature_c=max(after.values(), default=None),
        )
    known = {label: t for label, t in before.items() if label in idle_temperatures}
    if not known:
        return CooldownRecord(
            mode=mode,
            reached=False,
            note="no device reports both a temperature and an idle temperature: not applied",
        )
    target = max(idle_temperatures[label] for label in known) + COOLDOWN_MARGIN_C
    now = known
    while _excess(now, idle_temperatures) > COOLDOWN_MARGIN_C and clock() - start < max_wait_s:
        sleep(COOLDOWN_POLL_S)
        now = {
            label: t
            for label, t in device_temperatures(meters).items()
            if label in idle_temperatures
        }
        if not now:
            break
    reached = bool(now) and _excess(now, idle_temperatures) <= COOLDOWN_MARGIN_C
    if reached:
        note = None
    elif not now:
        note = "the devices stopped reporting temperatures while cooling: measured warm"
    else:
        note = f"still above idle + {COOLDOWN_MARGIN_C:g} C after {max_wait_s:g} s: measured warm"
    return CooldownRecord(
        mode=mode,
        waited_s=clock() - start,
        start_temperature_c=max(known.values()),
        end_temperature_c=max(now.values(), default=None),
        target_temperature_c=target,
        reached=reached,
        note=note,
    )


def measured_hot(
    repetitions: Sequence[RepetitionRecord], idle_temperatures: Mapping[str, float]
) -> bool:
    """Whether any window started more than :data:`HOT_MARGIN_C` above idle temperature."""
    for repetition in repetitions:
        start = repetition.device_states.get("start", {})
        for label, state in start.items():
            idle = idle_temperatures.get(label)
            temperature = state.temperature_c
            if idle is not None and temperature is not None and temperature - idle > HOT_MARGIN_C:
                return True
    return False

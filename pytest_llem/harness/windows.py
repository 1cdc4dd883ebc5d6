"""Opening and closing every meter's window together.

The runner's measurement windows and the idle baseline both open one window per meter and
close them all; these helpers make sure that one meter failing (or an interruption) never
leaves another meter's window open, which would make every later window fail with "a window
is already open".
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

from pytest_llem.exceptions import EnergyMeterError
from pytest_llem.meters.base import EnergyMeter, EnergyReading

__all__ = ["abandon_meters", "start_meters", "stop_meters"]

logger = logging.getLogger("pytest_llem")


def abandon_meters(started: Sequence[EnergyMeter]) -> None:
    """Close the windows of started meters while another error propagates (theirs are moot)."""
    for meter in reversed(started):
        with contextlib.suppress(EnergyMeterError):
            meter.stop()
        logger.debug("llem: closed the window of %s after a failure", meter.name)


def start_meters(meters: Sequence[EnergyMeter]) -> None:
    """Open a window on every meter, in order; on any failure close those already opened.

    Raises:
        EnergyMeterError: A meter failed to start (no window is left open).
    """
    started: list[EnergyMeter] = []
    try:
        for meter in meters:
            meter.start()
            started.append(meter)
    except BaseException:
        abandon_meters(started)
        raise


def stop_meters(meters: Sequence[EnergyMeter]) -> list[EnergyReading]:
    """Stop every meter in reverse start order; re-raise the first failure once all stopped.

    Returns:
        One reading per meter, in the meters' order.

    Raises:
        EnergyMeterError: A meter failed to stop (every other meter was still stopped).
    """
    readings: list[EnergyReading] = []
    failure: EnergyMeterError | None = None
    for index, meter in enumerate(reversed(meters)):
        try:
            readings.append(meter.stop())
        except EnergyMeterError as error:
            failure = failure or error
        except BaseException:
            abandon_meters(list(meters)[: len(meters) - index - 1])
            raise
    if failure is not None:
        raise failure
    readings.reverse()
    return readings

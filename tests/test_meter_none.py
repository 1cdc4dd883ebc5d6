"""Tests of the ``none`` meter: time only, no energy, and it says so."""

from __future__ import annotations

import time

import pytest

from pytest_llem.exceptions import EnergyMeterError
from pytest_llem.meters.base import EnergyMeter
from pytest_llem.meters.none import NoneMeter


def test_reading_has_duration_no_domains_and_a_note() -> None:
    meter = NoneMeter()
    assert isinstance(meter, EnergyMeter)
    meter.start()
    time.sleep(0.01)
    reading = meter.stop()
    meter.close()
    assert reading.meter == "none"
    assert reading.domains == {}
    assert reading.duration_s >= 0.01
    assert reading.emissions_kg is None
    assert reading.notes == ("no energy meter: time only",)


def test_info_covers_nothing() -> None:
    info = NoneMeter().info()
    assert info.name == "none"
    assert info.domains == ()
    assert info.sources == {}
    assert info.resolution.update_period_s is None
    assert info.details["method"] == "no energy meter: time only"


def test_window_misuse_is_an_error() -> None:
    meter = NoneMeter()
    with pytest.raises(EnergyMeterError, match="without start"):
        meter.stop()
    meter.start()
    with pytest.raises(EnergyMeterError, match="already open"):
        meter.start()

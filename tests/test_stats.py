"""Percentiles, metric summaries with their bootstrap interval, and distributions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pytest_llem.results.stats import (
    BOOTSTRAP_RESAMPLES,
    FEWER_THAN_3_NOTE,
    bootstrap_median_ci,
    distribution,
    percentile,
    summarise,
)

ONE_TO_TEN = [float(v) for v in range(1, 11)]


@pytest.mark.parametrize(
    ("q", "expected"),
    [
        (0, 1.0),  # rank 0 -> smallest
        (50, 5.5),  # rank 0.5*9 = 4.5 -> 5 + 0.5*(6-5)
        (90, 9.1),  # rank 0.9*9 = 8.1 -> 9 + 0.1*(10-9)
        (95, 9.55),  # rank 0.95*9 = 8.55 -> 9 + 0.55*(10-9)
        (99, 9.91),  # rank 0.99*9 = 8.91 -> 9 + 0.91*(10-9)
        (100, 10.0),  # rank 9 -> largest
    ],
)
def test_percentile_of_one_to_ten(q: float, expected: float) -> None:
    assert percentile(ONE_TO_TEN, q) == pytest.approx(expected)


def test_percentile_ignores_order_and_interpolates() -> None:
    # sorted [10, 20, 40]; rank 0.25*2 = 0.5 -> 10 + 0.5*(20-10) = 15
    assert percentile([40.0, 10.0, 20.0], 25) == pytest.approx(15.0)
    # rank 0.75*2 = 1.5 -> 20 + 0.5*(40-20) = 30
    assert percentile([40.0, 10.0, 20.0], 75) == pytest.approx(30.0)
    assert percentile([7.0], 99) == 7.0  # one value is every percentile


def test_percentile_matches_numpy_linear() -> None:
    values = list(np.random.default_rng(1).normal(size=37))
    for q in (0.0, 1.0, 33.3, 50.0, 90.0, 99.9, 100.0):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


@pytest.mark.parametrize("q", [-0.1, 100.1])
def test_percentile_rejects_q_outside_range(q: float) -> None:
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        percentile(ONE_TO_TEN, q)


def test_percentile_of_nothing_is_an_error() -> None:
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)


def test_summarise_five_values() -> None:
    s = summarise([3.0, 1.0, 5.0, 2.0, 4.0], unit="J")
    assert s.n == 5
    assert s.median == 3.0  # sorted [1,2,3,4,5] -> middle
    assert s.mean == 3.0  # 15 / 5
    # squared deviations 4+1+0+1+4 = 10; 10 / (5-1) = 2.5; sqrt(2.5) = 1.5811...
    assert s.stdev == pytest.approx(math.sqrt(2.5))
    assert (s.min, s.max) == (1.0, 5.0)
    assert s.unit == "J"
    assert s.source == "measured"
    assert s.note is None
    assert s.ci95_low is not None
    assert s.ci95_high is not None
    # a bootstrap median is always one of the values (odd n): the interval lies in [1, 5]
    assert 1.0 <= s.ci95_low <= s.median <= s.ci95_high <= 5.0


def test_bootstrap_interval_is_reproducible() -> None:
    values = [10.2, 9.8, 10.5, 10.1, 9.9, 10.7, 10.0, 10.3, 9.6, 10.4]
    first = summarise(values, unit="W")
    second = summarise(list(values), unit="W")
    assert (first.ci95_low, first.ci95_high) == (second.ci95_low, second.ci95_high)
    assert bootstrap_median_ci(values) == (first.ci95_low, first.ci95_high)
    # median of the 10 values: sorted middle pair (10.1, 10.2) -> 10.15
    assert first.median == pytest.approx(10.15)
    assert first.ci95_low is not None
    assert first.ci95_high is not None
    assert first.median is not None
    assert first.ci95_low <= first.median <= first.ci95_high
    assert first.ci95_low < first.ci95_high


def test_bootstrap_uses_the_documented_resample_count() -> None:
    assert BOOTSTRAP_RESAMPLES == 2000


def test_bootstrap_of_constant_values_is_that_value() -> None:
    s = summarise([4.0, 4.0, 4.0], unit="J")
    assert (s.ci95_low, s.ci95_high) == (4.0, 4.0)
    assert s.stdev == 0.0


def test_summarise_drops_none_and_gives_no_interval_below_three() -> None:
    s = summarise([None, 2.0, 4.0, None], unit="ms", source="estimated")
    assert s.n == 2
    assert s.median == 3.0  # (2 + 4) / 2
    assert s.mean == 3.0
    assert s.stdev == pytest.approx(math.sqrt(2.0))  # ((1 + 1) / (2-1)) ** 0.5
    assert (s.ci95_low, s.ci95_high) == (None, None)
    assert s.note == FEWER_THAN_3_NOTE
    assert s.source == "estimated"


def test_summarise_single_value_has_no_stdev() -> None:
    s = summarise([7.5], unit="s", note="flops method")
    assert (s.n, s.median, s.mean, s.min, s.max) == (1, 7.5, 7.5, 7.5, 7.5)
    assert s.stdev is None
    assert s.note == f"flops method; {FEWER_THAN_3_NOTE}"


def test_summarise_nothing_measured_carries_the_reason() -> None:
    s = summarise([None, None, None], unit="J", note="cpu: no meter covers it")
    assert s.n == 0
    stats = (s.median, s.mean, s.stdev, s.min, s.max, s.ci95_low, s.ci95_high)
    assert stats == (None,) * 7
    assert s.note == "cpu: no meter covers it"
    assert not s.available


def test_summarise_rejects_unknown_source() -> None:
    with pytest.raises(ValueError, match="unknown metric source"):
        summarise([1.0], unit="J", source="guessed")


def test_distribution_of_one_to_ten() -> None:
    d = distribution(ONE_TO_TEN)
    assert d.n == 10
    assert d.mean == pytest.approx(5.5)  # 55 / 10
    assert (d.min, d.max) == (1.0, 10.0)
    assert d.p50 == pytest.approx(5.5)  # rank 4.5
    assert d.p90 == pytest.approx(9.1)  # rank 8.1
    assert d.p95 == pytest.approx(9.55)  # rank 8.55
    assert d.p99 == pytest.approx(9.91)  # rank 8.91
    assert d.unit == "ms"


def test_distribution_of_nothing() -> None:
    d = distribution([], unit="s")
    assert d.n == 0
    assert (d.mean, d.min, d.max, d.p50, d.p90, d.p95, d.p99) == (None,) * 7
    assert d.unit == "s"

"""Arrival schedules for the server scenario: seeded, precomputed before the window opens.

Offsets are seconds from the start of a run. ``poisson`` draws exponential gaps with mean
``1 / rate``; ``gamma`` draws gamma gaps of shape ``burstiness`` and the same mean (shape 1 is
Poisson, below 1 burstier, above 1 more regular); ``constant`` spaces arrivals ``1 / rate``
apart. The first request arrives at offset 0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pytest_llem.config.models import TrafficConfig
from pytest_llem.exceptions import ConfigurationError

if TYPE_CHECKING:
    import numpy as np

__all__ = ["MAX_SCHEDULED_REQUESTS", "arrival_offsets", "request_count"]

#: A schedule longer than this is a configuration mistake rather than a benchmark.
MAX_SCHEDULED_REQUESTS = 10_000_000


def _gaps(traffic: TrafficConfig, count: int, rng: np.random.Generator) -> np.ndarray:
    mean = 1.0 / traffic.rate
    if traffic.arrival == "constant":
        import numpy as np

        return np.full(count, mean)
    if traffic.arrival == "poisson":
        return rng.exponential(mean, count)
    shape = traffic.burstiness
    return rng.gamma(shape, mean / shape, count)


def request_count(traffic: TrafficConfig, default: int) -> int | None:
    """Requests per run: ``num_requests``, else ``default`` unless ``duration_s`` is set (then
    the schedule decides, and None is returned)."""
    if traffic.num_requests is not None:
        return traffic.num_requests
    if traffic.duration_s is not None:
        return None
    return default


def arrival_offsets(traffic: TrafficConfig, *, count: int | None) -> list[float]:
    """The arrival offsets of one run, in seconds from its start, non-decreasing.

    Args:
        traffic: The arrival settings (distribution, rate, burstiness, seed, duration).
        count: Requests to schedule; None to schedule over ``traffic.duration_s``.

    Returns:
        ``count`` offsets starting at 0, or every offset below ``duration_s``.

    Raises:
        ConfigurationError: neither a count nor a duration, or an absurdly long schedule.
    """
    import numpy as np

    rng = np.random.default_rng(traffic.seed)
    if count is not None:
        if count < 1:
            raise ConfigurationError("the server scenario needs at least one request")
        gaps = _gaps(traffic, count, rng)
        gaps[0] = 0.0
        return [float(x) for x in np.cumsum(gaps)]
    if traffic.duration_s is None:
        raise ConfigurationError("set traffic.num_requests or traffic.duration_s")
    expected = traffic.rate * traffic.duration_s
    if expected > MAX_SCHEDULED_REQUESTS:
        raise ConfigurationError(
            f"traffic.rate x traffic.duration_s schedules about {expected:.0f} requests; "
            f"the most is {MAX_SCHEDULED_REQUESTS}"
        )
    offsets: list[float] = [0.0]
    while True:
        batch = _gaps(traffic, max(16, int(expected) + 1), rng)
        for gap in batch:
            nxt = offsets[-1] + float(gap)
            if nxt >= traffic.duration_s:
                return offsets
            offsets.append(nxt)

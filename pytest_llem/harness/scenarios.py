"""Scenarios: how a workload's requests are driven through a backend.

A scenario turns a case into a :data:`Workload`, a callable with no arguments that the runner
calls inside the measurement window. Everything a scenario can prepare (batches, arrival
schedules) is prepared before the window opens, so the window holds only the requests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pytest_llem.backends.base import Backend, GenerateParams, Generation, Request
from pytest_llem.config.models import CaseConfig
from pytest_llem.exceptions import ConfigurationError

__all__ = [
    "SCENARIOS",
    "ScenarioFactory",
    "Workload",
    "build_workload",
    "offline",
    "split_batches",
]

#: One run of a case's workload: issues every request and returns one Generation per request.
Workload = Callable[[], list[Generation]]
#: Builds a :data:`Workload` for a case (called once per case, outside any window).
ScenarioFactory = Callable[..., Workload]


def split_batches(requests: Sequence[Request], batch_size: int) -> list[list[Request]]:
    """Consecutive batches of at most ``batch_size`` requests, in order.

    Args:
        requests: The workload's requests.
        batch_size: Requests per batch (at least 1).

    Returns:
        The batches, e.g. sizes 4, 4, 2 for 10 requests in batches of 4.
    """
    if batch_size < 1:
        raise ConfigurationError(f"batch_size must be at least 1, got {batch_size}")
    return [list(requests[i : i + batch_size]) for i in range(0, len(requests), batch_size)]


def offline(
    *,
    backend: Backend,
    requests: Sequence[Request],
    params: GenerateParams,
    config: CaseConfig,
) -> Workload:
    """The offline scenario: every request available at once, sent in consecutive batches.

    Args:
        backend: The loaded backend.
        requests: The workload's requests.
        params: Generation settings shared by every request.
        config: The case (its ``batch_size`` is used).

    Returns:
        A workload that sends the batches one after another; each request's arrival is the
        moment its batch was issued.
    """
    batches = split_batches(requests, config.batch_size)

    def run() -> list[Generation]:
        generations: list[Generation] = []
        for batch in batches:
            generations.extend(backend.generate(batch, params=params))
        return generations

    return run


#: Scenarios by name; ``single_stream`` and ``server`` are added next to ``offline``.
SCENARIOS: dict[str, ScenarioFactory] = {"offline": offline}


def build_workload(
    scenario: str,
    *,
    backend: Backend,
    requests: Sequence[Request],
    params: GenerateParams,
    config: CaseConfig,
) -> Workload:
    """The workload of a case under the named scenario.

    Args:
        scenario: A key of :data:`SCENARIOS`.
        backend: The loaded backend.
        requests: The workload's requests.
        params: Generation settings.
        config: The case.

    Returns:
        The workload, ready to run inside a window.

    Raises:
        ConfigurationError: The scenario is unknown.
    """
    try:
        factory = SCENARIOS[scenario]
    except KeyError:
        known = ", ".join(sorted(SCENARIOS))
        raise ConfigurationError(f"unknown scenario {scenario!r}; choose from: {known}") from None
    return factory(backend=backend, requests=requests, params=params, config=config)

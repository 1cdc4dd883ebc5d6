"""A short Poisson server run on the built-in tiny model with a latency SLO: goodput (requests
per second meeting the SLO) and energy per good request, next to the load actually achieved."""

from __future__ import annotations

import pytest


@pytest.mark.llem(
    scenario="server",
    batch_size=4,
    max_new_tokens=8,
    min_new_tokens=8,
    traffic={"arrival": "poisson", "rate": 16, "num_requests": 24, "seed": 1},
    slo={"ttft_ms": 2000},
)
def test_poisson_server_with_slo(llem):
    result = llem.run()

    for rep in result.repetitions:
        assert rep.requests == 24 * rep.rounds
        assert rep.server is not None
        assert rep.server.target_rate_rps == 16
    assert result["ttft_ms.max"].max <= result["e2e_ms.max"].max
    assert 0 <= result["slo_met_fraction"].median <= 1
    assert result["goodput_rps"].median is not None

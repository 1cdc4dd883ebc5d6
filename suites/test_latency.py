"""Single-stream latency on the built-in tiny model: one request at a time, as a chat user
sees it. Time to first token, time per output token and end-to-end latency per request."""

from __future__ import annotations

import pytest


@pytest.mark.llem(scenario="single_stream", num_prompts=8, max_new_tokens=16, min_new_tokens=16)
def test_single_stream_latency(llem):
    result = llem.run()

    ttft, e2e = result["ttft_ms.p50"], result["e2e_ms.p50"]
    assert 0 < ttft.median <= e2e.median
    # With one request in flight, every token after the first arrives one decoding step apart.
    assert result["tpot_ms.p50"].median > 0
    # A window may repeat the workload (``rounds``) to outlast the meter's resolution.
    assert result.latency["itl_ms"].n == 8 * 15 * sum(rep.rounds for rep in result.repetitions)

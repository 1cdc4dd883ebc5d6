"""Offline batches on the built-in tiny model: how energy per token and throughput move with the
batch size. Runs in well under a minute on two CPU cores; pass ``--llem-model`` and
``--llem-device`` to run the same cases on your own model and GPU."""

from __future__ import annotations

import pytest

NEW_TOKENS = 16
PROMPTS = 16


@pytest.mark.llem(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, num_prompts=PROMPTS)
@pytest.mark.llem_sweep(batch_size=[1, 4, 16])
def test_offline_batch_size(llem):
    result = llem.run()

    # Every measured window generated exactly the fixed number of tokens for every prompt, in
    # each round (a window repeats the workload until it outlasts the meter's resolution).
    expected = result.params["num_prompts"] * result.params["max_new_tokens"]
    assert all(rep.output_tokens == expected * rep.rounds for rep in result.repetitions)
    assert result["output_tokens"].median == expected  # per-round figures
    assert result["output_tokens_per_s"].median > 0
    energy = result["energy_per_output_token_j"]
    # No meter on this machine means no figure, never a zero.
    assert energy.median is None or energy.median > 0


@pytest.mark.llem(batch_size=8, max_new_tokens=32, num_prompts=8, max_input_tokens=64)
def test_offline_long_prompts_truncated(llem):
    result = llem.run()

    assert all(rep.input_tokens <= 8 * 64 * rep.rounds for rep in result.repetitions)
    assert result["ttft_ms.p50"].median <= result["e2e_ms.p50"].median

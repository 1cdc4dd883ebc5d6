"""The shipped benchmark: four workload shapes, each offline, single-stream and as a server.

The same tests run at every profile (``--llem-profile``; auto: ``smoke`` without a CUDA GPU,
``standard`` with one); each ``by_profile`` value takes the run's profile. ``smoke`` runs the
built-in tiny model in about 30 seconds on two CPU cores; ``standard`` realistic lengths (inputs
up to 2,048 tokens, outputs up to 512), about 30 minutes for a 7-8B model on one H100; ``full``
the grid a paper would publish. docs/profiles.md gives each shape's lengths and why it is here.

    pytest suites/ --llem-profile=standard --llem-backend=vllm --llem-model=/models/llama-3.1-8b
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from pytest_llem import by_profile

#: The server SLO of every shape (MLPerf's bounds for Llama 3.1 8B as a server).
SLO = {"ttft_ms": 2000, "tpot_ms": 100}


def shape(workload: str, **lengths: object) -> Callable[[type], type]:
    """The markers of a shape: its label (a one-value sweep, so every id names the shape), its
    lengths and its per-profile request count."""

    def mark(cls: type) -> type:
        cls = pytest.mark.llem_sweep(workload=[workload])(cls)
        return pytest.mark.llem(
            prompts="synthetic",
            num_prompts=by_profile(smoke=4, standard=128, full=512),
            repeat=by_profile(smoke=3, full=5),
            **lengths,
        )(cls)

    return mark


def exact(input_tokens: object, output_tokens: object) -> dict[str, object]:
    """Exact lengths: every prompt ``input_tokens`` long, every output ``output_tokens``."""
    return {
        "input_tokens": input_tokens,
        "max_input_tokens": input_tokens,
        "max_new_tokens": output_tokens,
        "min_new_tokens": output_tokens,
    }


class Scenarios:
    """The three scenarios every shape runs. Its name does not start with ``Test``, so pytest
    collects these tests only through the shape classes below, which set the lengths."""

    @pytest.mark.llem_sweep(
        batch_size=by_profile(
            smoke=[1, 4], standard=[16, 64, 128], full=[1, 8, 16, 32, 64, 128, 256]
        )
    )
    def test_offline(self, llem):
        result = llem.run()

        # Every window completed every request, in each round.
        requests = result.params["num_prompts"]
        assert all(rep.requests == requests * rep.rounds for rep in result.repetitions)
        assert result["output_tokens_per_s"].median > 0
        energy = result["energy_per_output_token_j"]
        assert energy.median is None or energy.median > 0  # no meter: no figure, never a zero

    @pytest.mark.llem(
        scenario="single_stream", num_prompts=by_profile(smoke=3, standard=8, full=32)
    )
    def test_single_stream(self, llem):
        result = llem.run()

        assert 0 < result["ttft_ms.p50"].median <= result["e2e_ms.p50"].median

    @pytest.mark.llem(
        scenario="server",
        batch_size=by_profile(smoke=4, standard=64),
        traffic={
            "arrival": "poisson",
            "duration_s": by_profile(smoke=1.0, standard=10.0, full=60.0),
            "seed": 1,
        },
        slo=SLO,
    )
    @pytest.mark.llem_sweep(
        **{"traffic.rate": by_profile(smoke=[4], standard=[1, 4, 16], full=[1, 2, 4, 8, 16, 32])}
    )
    def test_server(self, llem):
        result = llem.run()

        for rep in result.repetitions:
            assert rep.server is not None
            assert rep.server.target_rate_rps == result.params["traffic"]["rate"]
        assert 0 <= result["slo_met_fraction"].median <= 1
        assert result["goodput_rps"].median is not None


@shape(
    "chat",
    lengths="sharegpt",
    max_input_tokens=by_profile(smoke=128, standard=2048),
    max_new_tokens=by_profile(smoke=8, standard=512),
)
class TestChat(Scenarios):
    """Chat: a ShareGPT-like mix of short and long turns, lengths drawn per request."""


@shape(
    "summarisation", **exact(by_profile(smoke=64, standard=2048), by_profile(smoke=4, standard=128))
)
class TestSummarisation(Scenarios):
    """Summarisation: long input, short output (prefill-heavy)."""


@shape("generation", **exact(by_profile(smoke=8, standard=128), by_profile(smoke=16, standard=512)))
class TestGeneration(Scenarios):
    """Generation: short input, long output (decode-heavy)."""


@shape("fixed", **exact(by_profile(smoke=32, standard=512), by_profile(smoke=8, standard=128)))
class TestFixed(Scenarios):
    """Fixed-length reference: exact lengths, the most comparable across engines."""

"""Request lengths of synthetic workloads: exact, or drawn per request from a seeded mix.

``lengths="sharegpt"`` draws each request's input and output length from log-normal
distributions whose means are those reported for ShareGPT conversations in the vLLM paper
(Kwon et al., SOSP 2023: 161 input and 338 output tokens on average), so a chat-shaped workload
needs no download. It is a shape of that kind, not a fit to the dataset: the spread parameters
are chosen to give ShareGPT's long right tail (many short turns, a few long ones). Draws are
clipped to ``[4, max_input_tokens]`` and ``[max(1, min_new_tokens), max_new_tokens]``, so small
caps (the smoke profile) pile lengths up at the cap; the record's ``prompts`` section keeps the
input lengths that ran.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pytest_llem.config.models import CaseConfig

__all__ = ["SHAREGPT_MIX", "DrawnLengths", "LengthMix", "draw_lengths"]


@dataclass(frozen=True)
class LengthMix:
    """Log-normal input and output lengths, in tokens, by their mean and log-space spread."""

    input_mean: float
    input_sigma: float
    output_mean: float
    output_sigma: float

    def mu(self, mean: float, sigma: float) -> float:
        """The log-space location that gives ``mean`` with spread ``sigma``."""
        return math.log(mean) - sigma * sigma / 2


#: The chat mix: ShareGPT's mean lengths (vLLM paper), log-normal spreads.
SHAREGPT_MIX = LengthMix(input_mean=161.0, input_sigma=1.0, output_mean=338.0, output_sigma=0.8)

_MIN_INPUT = 4


@dataclass(frozen=True)
class DrawnLengths:
    """Each request's input length and, when drawn, its exact output length."""

    inputs: list[int]
    outputs: list[int] | None


def draw_lengths(config: CaseConfig, count: int) -> DrawnLengths:
    """The lengths of ``count`` synthetic requests of a case.

    Request ``i``'s lengths depend only on the seed and ``i``, so a larger count extends a
    smaller one.

    Args:
        config: The case: ``lengths``, ``input_tokens``, ``max_input_tokens``,
            ``max_new_tokens``, ``min_new_tokens`` and ``seed``.
        count: How many requests.

    Returns:
        Exact lengths (``input_tokens`` each, outputs left to the case's token limits) or the
        drawn, clipped lengths of the ShareGPT-like mix.
    """
    if config.lengths == "exact":
        assert config.input_tokens is not None  # the constraints guarantee it
        return DrawnLengths(inputs=[config.input_tokens] * count, outputs=None)
    import numpy as np

    mix = SHAREGPT_MIX
    # Its own stream (seed, 1): the token ids keep the stream of the seed alone.
    rng = np.random.default_rng([config.seed, 1])
    pairs = rng.lognormal(
        mean=[mix.mu(mix.input_mean, mix.input_sigma), mix.mu(mix.output_mean, mix.output_sigma)],
        sigma=[mix.input_sigma, mix.output_sigma],
        size=(count, 2),
    )
    low_out = max(1, config.min_new_tokens or 1)
    cap = config.max_input_tokens
    inputs = np.clip(np.rint(pairs[:, 0]), min(_MIN_INPUT, cap), cap)
    outputs = np.clip(np.rint(pairs[:, 1]), low_out, config.max_new_tokens)
    return DrawnLengths(
        inputs=[int(n) for n in inputs.tolist()], outputs=[int(n) for n in outputs.tolist()]
    )

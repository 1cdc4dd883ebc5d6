"""How long a case is expected to run: the estimate printed before a standard or full run.

An estimate, not a measurement: it assumes a 7-8B model in bfloat16 on one NVIDIA H100 with
vLLM (:data:`H100_8B`; docs/profiles.md gives the figures and where they come from), and other
models, engines and GPUs differ. A case runs ``warmup + repeat`` windows; one window costs

- offline: per batch, its prompts' prefill plus the mean output length in decoding steps at that
  batch size;
- single_stream: per request, its prefill plus its output in decoding steps at batch 1;
- server: the arrival schedule (``num_requests / rate`` or ``duration_s``), or the offline time
  of the same requests when the engine cannot keep up, plus one request's latency to drain.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pytest_llem.config.models import CaseConfig
from pytest_llem.data.lengths import draw_lengths

__all__ = ["H100_8B", "CostModel", "case_seconds"]

_DEFAULT_PROMPT_TOKENS = 24  # the built-in prompts are short questions
_SAMPLE = 256  # drawn requests to take the mean of a drawn length mix


@dataclass(frozen=True)
class CostModel:
    """Assumed speeds of one model on one machine.

    Attributes:
        step_s: One decoding step at batch 1, seconds.
        step_per_request_s: What each further request in the batch adds to a step, seconds.
        prefill_tokens_per_s: Prompt tokens processed per second.
        load_s: Loading the model once, seconds.
        name: What the figures are for, as the estimate line says it.
    """

    step_s: float
    step_per_request_s: float
    prefill_tokens_per_s: float
    load_s: float
    name: str

    def step(self, batch: int) -> float:
        """One decoding step with ``batch`` requests in flight."""
        return self.step_s + self.step_per_request_s * max(0, batch - 1)


#: A 7-8B model in bfloat16 on one H100 with vLLM: ~7 ms a step at batch 1 (memory-bound:
#: 16 GB of weights at ~3 TB/s, with overheads), ~16 ms at batch 128, prefill ~20,000 tokens/s.
H100_8B = CostModel(
    step_s=0.007,
    step_per_request_s=0.00007,
    prefill_tokens_per_s=20_000.0,
    load_s=60.0,
    name="a 7-8B model on one H100 (vLLM)",
)


def _mean_lengths(config: CaseConfig) -> tuple[float, float]:
    """Mean input and output tokens of the case's requests."""
    if config.prompts == "synthetic":
        drawn = draw_lengths(config, _SAMPLE)
        mean_in = sum(min(n, config.max_input_tokens) for n in drawn.inputs) / _SAMPLE
        if drawn.outputs is not None:
            return mean_in, sum(drawn.outputs) / _SAMPLE
        return mean_in, float(config.max_new_tokens)
    return float(min(_DEFAULT_PROMPT_TOKENS, config.max_input_tokens)), float(config.max_new_tokens)


def _offline_s(config: CaseConfig, model: CostModel, requests: int, batch: int) -> float:
    mean_in, mean_out = _mean_lengths(config)
    batches = math.ceil(requests / batch)
    per_batch = min(batch, requests) * mean_in / model.prefill_tokens_per_s
    return batches * (per_batch + mean_out * model.step(min(batch, requests)))


def window_seconds(config: CaseConfig, model: CostModel = H100_8B) -> float:
    """The expected length of one window of the case."""
    if config.scenario == "offline":
        return _offline_s(config, model, config.num_prompts, config.batch_size)
    if config.scenario == "single_stream":
        return _offline_s(config, model, config.num_prompts, 1)
    traffic = config.traffic
    if traffic.duration_s is not None:
        schedule = traffic.duration_s
        requests = max(1, round(traffic.duration_s * traffic.rate))
    else:
        requests = traffic.num_requests or config.num_prompts
        schedule = requests / traffic.rate
    in_flight = traffic.max_concurrency or requests
    busy = _offline_s(config, model, requests, in_flight)
    return max(schedule, busy) + _offline_s(config, model, 1, 1)


def case_seconds(config: CaseConfig, model: CostModel = H100_8B) -> float:
    """The expected run time of the case's warmup and measured windows (loading excluded)."""
    return (config.warmup + config.planned_repeat) * window_seconds(config, model)

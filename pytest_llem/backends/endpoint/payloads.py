"""The ``/v1/completions`` request body, with the extensions the server accepted."""

from __future__ import annotations

from typing import Any

from pytest_llem.config.models import SamplingConfig

__all__ = ["EXTENSION_GROUPS", "completion_payload"]

#: Request fields outside the OpenAI completions API, dropped in this order when a server
#: rejects them (trtllm-serve forbids unknown fields; vLLM and SGLang accept these).
EXTENSION_GROUPS: tuple[tuple[str, ...], ...] = (
    ("return_token_ids", "return_tokens_as_token_ids"),
    ("min_tokens", "ignore_eos"),
    ("stream_options",),
)


def completion_payload(
    *,
    served: str,
    prompt: str | list[int],
    max_tokens: int,
    min_tokens: int | None,
    extensions: frozenset[str] | set[str],
    token_source: str,
    sampling: SamplingConfig | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """A streamed completion request.

    Args:
        served: The model's name on the server.
        prompt: Text, or token ids sent as a list of ints.
        max_tokens: Most output tokens.
        min_tokens: Fewest output tokens (sent where the server accepts ``min_tokens``; with
            ``min_tokens >= max_tokens`` also ``ignore_eos``).
        extensions: The non-standard fields the server accepts.
        token_source: ``endpoint.token_source`` (``logprobs`` asks for logprobs).
        sampling: The case's sampling; None: greedy, without ``top_p`` (the load-time probe).
        seed: The request's seed, sent when sampling.
    """
    payload: dict[str, Any] = {"model": served, "prompt": prompt, "max_tokens": max_tokens}
    if sampling is None:
        payload.update(temperature=0.0, stream=True)
    else:
        payload.update(
            stream=True,
            temperature=sampling.temperature if sampling.do_sample else 0.0,
            top_p=sampling.top_p if sampling.do_sample else 1.0,
        )
        if sampling.do_sample:
            payload["seed"] = seed
            if sampling.top_k > 0:
                payload["top_k"] = sampling.top_k
    if "stream_options" in extensions:
        payload["stream_options"] = {"include_usage": True}
    if min_tokens is not None and "min_tokens" in extensions:
        payload["min_tokens"] = min_tokens
        if min_tokens >= max_tokens:
            payload["ignore_eos"] = True
    if "return_token_ids" in extensions:
        payload["return_token_ids"] = True
    if token_source == "logprobs":
        payload["logprobs"] = 1
        if "return_tokens_as_token_ids" in extensions:
            payload["return_tokens_as_token_ids"] = True
    return payload

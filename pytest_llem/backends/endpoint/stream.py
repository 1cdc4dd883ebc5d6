"""One streamed completion as the endpoint backend sees it: the events it delivered, how its
output tokens can be counted (ids, logprobs, usage or chunks) and when each token arrived."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pytest_llem.backends.endpoint.errors import NAME, error_of_event
from pytest_llem.backends.endpoint.transport import Transport
from pytest_llem.exceptions import BackendInferenceError

__all__ = [
    "ALLOWED",
    "COMPLETIONS",
    "COUNTING_LABELS",
    "RANK",
    "UNKNOWN_ID",
    "Method",
    "StreamedCompletion",
    "collect",
    "parse_event",
    "spread_times",
]

COMPLETIONS = "/v1/completions"
#: Placeholder id of an output token whose id the server did not return.
UNKNOWN_ID = -1

Method = Literal["ids", "logprob_ids", "logprobs", "usage", "chunks"]

#: How output tokens were counted, best first (``BackendInfo.extra["token_counting"]``).
COUNTING_LABELS: dict[str, str] = {
    "ids": "output token ids streamed by the server (return_token_ids)",
    "logprob_ids": "output token ids from the streamed logprobs (return_tokens_as_token_ids)",
    "logprobs": "output tokens counted from the streamed logprobs entries; ids are placeholders "
    "(-1)",
    "usage": "output tokens from the server's usage.completion_tokens; ids are placeholders (-1) "
    "and token times are spread over the stream chunks",
    "chunks": "output tokens counted from stream chunks, not ids (one token per chunk with text); "
    "ids are placeholders (-1)",
}
RANK = {method: rank for rank, method in enumerate(COUNTING_LABELS)}
#: The counting methods each ``endpoint.token_source`` accepts, best first.
ALLOWED: dict[str, tuple[Method, ...]] = {
    "auto": ("ids", "usage", "chunks"),
    "return_token_ids": ("ids",),
    "logprobs": ("logprob_ids", "logprobs"),
    "usage": ("usage",),
    "chunks": ("chunks",),
}


@dataclass
class StreamedCompletion:
    """What one streamed completion delivered, event by event."""

    id_values: list[int] = field(default_factory=list)
    id_times: list[float] = field(default_factory=list)
    ids_seen: bool = False
    logprob_tokens: list[str] = field(default_factory=list)
    logprob_times: list[float] = field(default_factory=list)
    logprobs_seen: bool = False
    chunk_times: list[float] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    prompt_token_ids: list[int] | None = None
    usage: dict[str, Any] | None = None
    last_time: float | None = None
    finish_reason: str | None = None
    done: bool = False

    def add(self, event: dict[str, Any], arrival: float) -> None:
        """Take one parsed event (called once per event: kept lean)."""
        usage = event.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        choices = event.get("choices")
        if not choices:
            return
        choice = choices[0]
        self.last_time = arrival
        finish_reason = choice.get("finish_reason")
        if finish_reason:
            self.finish_reason = str(finish_reason)
        if self.prompt_token_ids is None:
            prompt_ids = choice.get("prompt_token_ids")
            if isinstance(prompt_ids, list):
                self.prompt_token_ids = [int(t) for t in prompt_ids]
        ids = choice.get("token_ids")
        if isinstance(ids, list):
            self.ids_seen = True
            self.id_values.extend([int(t) for t in ids])
            self.id_times.extend([arrival] * len(ids))
        logprobs = choice.get("logprobs")
        if logprobs:
            tokens = logprobs.get("tokens") if isinstance(logprobs, dict) else None
            if isinstance(tokens, list):
                self.logprobs_seen = True
                self.logprob_tokens.extend([str(t) for t in tokens])
                self.logprob_times.extend([arrival] * len(tokens))
        text = choice.get("text")
        if text:
            self.text.append(text)
            self.chunk_times.append(arrival)

    def available(self) -> list[Method]:
        """The counting methods this stream supports, best first."""
        methods: list[Method] = []
        if self.ids_seen:
            methods.append("ids")
        if self.logprobs_seen:
            ids = _logprob_ids(self.logprob_tokens)
            methods.append("logprob_ids" if ids is not None else "logprobs")
        if self.usage is not None and isinstance(self.usage.get("completion_tokens"), int):
            methods.append("usage")
        methods.append("chunks")
        return methods

    def live(self, method: Method, start: int) -> list[int]:
        """Ids (placeholders where unknown) of the tokens counted by ``method`` from ``start``
        on, as far as the stream has come; only methods that count per chunk."""
        if method == "ids":
            return self.id_values[start:]
        if method in ("logprob_ids", "logprobs"):
            tail = self.logprob_tokens[start:]
            ids = _logprob_ids(tail) if method == "logprob_ids" else None
            return ids if ids is not None else [UNKNOWN_ID] * len(tail)
        if method == "chunks":
            return [UNKNOWN_ID] * max(0, len(self.chunk_times) - start)
        return []

    def tokens(self, method: Method) -> tuple[list[int], list[float]]:
        """Output token ids (placeholders where unknown) and their times, by ``method``."""
        if method == "ids":
            return list(self.id_values), list(self.id_times)
        if method in ("logprob_ids", "logprobs"):
            ids = _logprob_ids(self.logprob_tokens) if method == "logprob_ids" else None
            count = len(self.logprob_tokens)
            return (ids if ids is not None else [UNKNOWN_ID] * count), list(self.logprob_times)
        if method == "usage":
            count = int((self.usage or {}).get("completion_tokens") or 0)
            return [UNKNOWN_ID] * count, spread_times(count, self.chunk_times, self.last_time)
        return [UNKNOWN_ID] * len(self.chunk_times), list(self.chunk_times)


def _logprob_ids(tokens: list[str]) -> list[int] | None:
    """Ids from ``token_id:N`` strings (vLLM's return_tokens_as_token_ids), else None."""
    ids: list[int] = []
    for token in tokens:
        head, _, tail = token.partition(":")
        if head != "token_id" or not tail.lstrip("-").isdigit():
            return None
        ids.append(int(tail))
    return ids


def spread_times(count: int, times: list[float], last: float | None) -> list[float]:
    """``count`` token times over the chunk ``times``: the first token at the first chunk, the
    last at the last, the others evenly between (chunks then hold one or more tokens)."""
    if count <= 0:
        return []
    if not times:
        return [last if last is not None else time.perf_counter()] * count
    if count == 1:
        return [times[-1]]
    span = len(times) - 1
    return [times[round(i * span / (count - 1))] for i in range(count)]


def parse_event(data: str, url: str) -> dict[str, Any]:
    """One event's data as a JSON object; an ``error`` event raises the error it means."""
    try:
        event = json.loads(data)
    except ValueError as e:
        raise BackendInferenceError(f"{NAME}: {url} streamed invalid JSON: {data[:200]!r}") from e
    if not isinstance(event, dict):
        raise BackendInferenceError(f"{NAME}: {url} streamed a non-object event: {data[:200]!r}")
    error = event.get("error")
    if error:
        raise error_of_event(error, url=url)
    return event


async def collect(
    transport: Transport,
    payload: dict[str, Any],
    on_event: Callable[[StreamedCompletion, float], None] | None = None,
) -> StreamedCompletion:
    """Run one streamed completion and collect its events.

    Args:
        transport: The client.
        payload: The ``/v1/completions`` request (``stream`` set).
        on_event: Called after each event with the stream so far and the event's arrival time.

    Raises:
        BackendInferenceError: the stream ended without a finish reason or ``[DONE]``.
        BackendError: as :meth:`Transport.stream`.
    """
    url = transport.server.join(COMPLETIONS)
    stream = StreamedCompletion()

    def take(data: str, arrival: float) -> bool:
        if data == "[DONE]":
            stream.done = True
            return True
        stream.add(parse_event(data, url), arrival)
        if on_event is not None:
            on_event(stream, arrival)
        return False

    await transport.stream(COMPLETIONS, payload, take)
    if not stream.done and stream.finish_reason is None:
        # A server that fails mid-stream closes the connection: a cut stream is an error,
        # never a completion with the tokens that happened to arrive.
        raise BackendInferenceError(
            f"{NAME}: {url} closed the stream before it finished (no finish_reason, no [DONE])"
        )
    return stream

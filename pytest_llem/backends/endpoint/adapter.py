"""The endpoint backend's adapter: the Backend protocol over an OpenAI-compatible server.

It turns requests into streamed ``/v1/completions`` calls on the transport's event loop (at
most ``endpoint.max_concurrency`` at once) and the streams back into Generations with one time
per output token; what the server supports is probed at load (:mod:`.probing`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial

from pytest_llem import __version__
from pytest_llem.backends.base import (
    BackendCapabilities,
    BackendInfo,
    GenerateParams,
    Generation,
    MemoryUsage,
    Request,
    TokenCallback,
    Vocabulary,
)
from pytest_llem.backends.endpoint.errors import NAME
from pytest_llem.backends.endpoint.payloads import completion_payload
from pytest_llem.backends.endpoint.probing import ServerFacts, probe_server
from pytest_llem.backends.endpoint.stream import (
    ALLOWED,
    COUNTING_LABELS,
    RANK,
    Method,
    StreamedCompletion,
    collect,
)
from pytest_llem.backends.endpoint.tokens import PromptTokens
from pytest_llem.backends.endpoint.transport import ServerAddress, Transport
from pytest_llem.backends.support.checkpoint import local_folder
from pytest_llem.backends.support.failures import require_loaded
from pytest_llem.backends.support.progress import ProgressCallback
from pytest_llem.backends.support.scheduling import EngineScheduledBackend
from pytest_llem.config.models import CaseConfig
from pytest_llem.exceptions import BackendInferenceError, BackendNotAvailableError

__all__ = ["EndpointBackend"]

logger = logging.getLogger("pytest_llem")

_START_HINT = (
    "start an OpenAI-compatible server (vllm serve, trtllm-serve, ...) on this machine and "
    "pass --llem-endpoint=URL"
)


@dataclass
class _LiveTokens:
    """Reports each output token of one request to ``on_token`` as its event arrives."""

    index: int
    method: Method
    on_token: TokenCallback
    reported: int = 0

    def __call__(self, stream: StreamedCompletion, arrival: float) -> None:
        ids = stream.live(self.method, self.reported)
        self.reported += len(ids)
        for token in ids:
            self.on_token(self.index, token, arrival)


class EndpointBackend(EngineScheduledBackend):
    """Sends a case's requests to an OpenAI-compatible server's ``/v1/completions``.

    The server schedules the requests itself: ``generate`` starts them all at once (at most
    ``endpoint.max_concurrency`` open, the rest wait in this client) and gathers them in order;
    ``on_token`` is called on the client's event loop thread as each chunk arrives (id -1 where
    the server sends no ids; with usage counting, once the stream has ended). A failed request
    raises what :mod:`.errors` maps it to: ``BackendConfigError`` for HTTP 4xx,
    ``BackendTimeoutError`` past ``endpoint.timeout_s``, ``RetryableError`` when the server ran
    out of memory or was busy, ``BackendInferenceError`` otherwise.

    Args:
        config: The case; ``endpoint.*`` says where the server is and how to talk to it,
            ``model`` (or ``endpoint.served_model``) which model it serves.
        progress: Called with short lines of text during slow steps.
    """

    name = NAME
    capabilities = BackendCapabilities(
        streaming=True,
        batching=True,
        devices=("cpu", "cuda"),
        dtypes=("auto", "float32", "float16", "bfloat16"),
        scheduling=True,
    )

    def __init__(self, config: CaseConfig, *, progress: ProgressCallback | None = None) -> None:
        super().__init__(config, progress=progress)
        self._options = config.endpoint
        self._served = config.endpoint.served_model or config.model
        self._transport: Transport | None = None
        self._facts: ServerFacts | None = None
        self._tokens: PromptTokens | None = None
        self._warned_short = False
        self._fallback: Method | None = None

    # -- loading -------------------------------------------------------------------------------

    def load(self) -> BackendInfo:
        """Check the server and probe what it supports; nothing is loaded here.

        Returns:
            Facts about the server and the served model for the run record.

        Raises:
            BackendNotAvailableError: no ``endpoint.url`` was given.
            BackendInitializationError: the server cannot be reached.
            BackendConfigError: the server does not serve the model, refuses the key, or
                cannot provide the counting method ``endpoint.token_source`` asks for.
            BackendTimeoutError: the server did not answer in time.
        """
        if self._info is not None:
            return self._info
        url = self._options.url
        if url is None:
            raise BackendNotAvailableError(NAME, _START_HINT)
        transport = Transport(
            ServerAddress.parse(url),
            headers=self._base_headers(),
            timeout_s=self._options.timeout_s,
            connect_timeout_s=self._options.connect_timeout_s,
            max_concurrency=self._options.max_concurrency,
        )
        started = time.perf_counter()
        self._report(f"checking the server at {url} for model {self._served!r}")
        transport.start()
        try:
            facts = transport.call(
                probe_server(
                    transport, served=self._served, token_source=self._options.token_source
                )
            )
        except BaseException:
            transport.close()
            raise
        self._transport, self._facts = transport, facts
        self._tokens = PromptTokens(
            transport,
            served=self._served,
            model=self._config.model,
            model_root=facts.model_root,
            remote=facts.tokenize,
            progress=self._progress,
        )
        self._info = BackendInfo(
            name=NAME,
            version=facts.version,
            device="server",
            dtype="server",
            model=self._config.model,
            model_path=self._local_root(),
            load_seconds=time.perf_counter() - started,
            extra=self._extra(facts, authorized="Authorization" in self._base_headers()),
        )
        logger.info("endpoint %s serves %s (%s)", url, self._served, facts.features.method)
        return self._info

    def _base_headers(self) -> dict[str, str]:
        headers = {"User-Agent": f"pytest-llem/{__version__}", "Accept": "application/json"}
        key = os.environ.get(self._options.api_key_env, "").strip()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _local_root(self) -> str | None:
        """The model's folder on this machine, when the case or the server names one."""
        root = self._facts.model_root if self._facts is not None else None
        return local_folder(self._config.model) or local_folder(root)

    def _extra(self, facts: ServerFacts, *, authorized: bool) -> dict[str, str]:
        features = facts.features
        fixed = (
            "min_tokens and ignore_eos are sent for fixed output lengths"
            if "min_tokens" in features.extensions
            else "the server rejected min_tokens/ignore_eos: outputs may be shorter than asked "
            "and are counted as returned"
        )
        extra = {
            "url": str(self._options.url),
            "served_model": self._served,
            "token_counting": COUNTING_LABELS[features.method],
            "fixed_lengths": fixed,
            "usage_in_stream": str(features.usage_in_stream).lower(),
            "tokenizer": "server /tokenize" if facts.tokenize else "local tokenizer",
            "api_key": f"from ${self._options.api_key_env}" if authorized else "none",
            "memory": "not measured: the server runs in its own process",
            "energy": "measured by this machine's meters: the server must run on this machine",
        }
        for key in ("owned_by", "root", "max_model_len"):
            if facts.entry.get(key) is not None:
                extra[f"server_{key}"] = str(facts.entry[key])
        return extra

    # -- generation ------------------------------------------------------------------------------

    def _loaded(self) -> bool:
        return self._transport is not None and self._facts is not None

    def _start(
        self,
        requests: Sequence[Request],
        *,
        params: GenerateParams,
        on_token: TokenCallback | None,
    ) -> list[Future[Generation]]:
        """Hand each request to the transport, which opens its stream when a slot is free
        (cancelling a future cancels its stream, waiting or running)."""
        transport = self._client()
        return [
            transport.spawn(partial(self._complete, request, params, on_token))
            for request in requests
        ]

    def _client(self) -> Transport:
        transport = self._transport if self._facts is not None else None
        return require_loaded(transport, backend=NAME, what="generate")

    async def _complete(
        self, request: Request, params: GenerateParams, on_token: TokenCallback | None
    ) -> Generation:
        transport = self._client()
        assert self._facts is not None
        probed = self._facts.features.method
        params = params.for_request(request)
        payload, sent_ids = self._payload(request, params)
        live = (
            _LiveTokens(request.index, probed, on_token)
            if on_token is not None and probed != "usage"
            else None
        )
        issued_at = time.perf_counter()
        stream = await collect(transport, payload, live)
        streamed = live.reported if live is not None else 0
        method = self._method_for(stream)
        ids, times = stream.tokens(method)
        if on_token is not None and (method != probed or method == "usage"):
            # Counts known only at the end: the tokens are reported now, with their times.
            for token, at in zip(ids[streamed:], times[streamed:], strict=True):
                on_token(request.index, token, at)
        self._check_length(len(ids), params)
        return Generation(
            request_index=request.index,
            input_tokens=await self._input_tokens(request, stream, sent_ids),
            output_token_ids=ids,
            token_times=times,
            issued_at=issued_at,
            text="".join(stream.text),
        )

    def _method_for(self, stream: StreamedCompletion) -> Method:
        """The probed method, or the best one this response supports when it lacks that one
        (the record then names the weakest method used, as ``token_counting_fallback``)."""
        assert self._facts is not None
        assert self._info is not None
        available = stream.available()
        if self._facts.features.method in available:
            return self._facts.features.method
        allowed = ALLOWED[self._options.token_source]
        method = ([m for m in available if m in allowed] or available)[0]
        if self._fallback is None or RANK[method] > RANK[self._fallback]:
            self._fallback = method
            self._info.extra["token_counting_fallback"] = COUNTING_LABELS[method]
        return method

    def _check_length(self, count: int, params: GenerateParams) -> None:
        wanted = params.min_new_tokens
        if wanted is None or count >= wanted or self._warned_short:
            return
        self._warned_short = True
        logger.warning(
            "%s: the server returned %d output tokens where at least %d were asked for; "
            "they are counted as returned",
            NAME,
            count,
            wanted,
        )

    def _payload(
        self, request: Request, params: GenerateParams
    ) -> tuple[dict[str, object], list[int] | None]:
        assert self._facts is not None
        prompt, sent_ids = self._prompt(request, params.max_input_tokens)
        payload = completion_payload(
            served=self._served,
            prompt=prompt,
            max_tokens=params.max_new_tokens,
            min_tokens=params.min_new_tokens,
            extensions=self._facts.features.extensions,
            token_source=self._options.token_source,
            sampling=params.sampling,
            # One seed per request: reproducible, yet requests do not share their draws.
            seed=(params.seed + request.index) % 2**31,
        )
        return payload, sent_ids

    def _prompt(
        self, request: Request, max_input_tokens: int | None
    ) -> tuple[str | list[int], list[int] | None]:
        """The prompt to send: token ids when the request has them or when a counted text is
        longer than ``max_input_tokens`` (its head is kept), else the text."""
        ids = request.token_ids
        if ids is None:
            known = self._tokens.known(request.prompt) if self._tokens is not None else None
            if known is None or max_input_tokens is None or len(known) <= max_input_tokens:
                return request.prompt, None
            ids = known
        if not ids:
            raise BackendInferenceError(
                f"{NAME}: request {request.index} has an empty token_ids prompt"
            )
        sent = list(ids[:max_input_tokens] if max_input_tokens is not None else ids)
        return sent, sent

    async def _input_tokens(
        self, request: Request, stream: StreamedCompletion, sent_ids: list[int] | None
    ) -> int:
        usage = stream.usage or {}
        if isinstance(usage.get("prompt_tokens"), int):
            return int(usage["prompt_tokens"])
        if stream.prompt_token_ids is not None:
            return len(stream.prompt_token_ids)
        if sent_ids is not None:
            return len(sent_ids)
        # Not counted before (the harness always counts first): count it now, off the loop,
        # which the server's /tokenize call needs free.
        (count,) = await asyncio.to_thread(self.count_tokens, [request.prompt])
        return count

    # -- tokens ----------------------------------------------------------------------------------

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Prompt tokens of each text: by the server's ``/tokenize`` when it has one, else by
        the model's tokenizer on this machine.

        The ids are kept, so a prompt longer than ``max_input_tokens`` can be sent truncated.

        Raises:
            BackendInferenceError: the backend is not loaded.
            BackendConfigError: neither the server nor this machine can tokenize for the model.
        """
        return require_loaded(self._tokens, backend=NAME, what="count_tokens").count(texts)

    def vocabulary(self) -> Vocabulary:
        """The ids the model accepts, from its tokenizer on this machine.

        Raises:
            BackendInferenceError: the backend is not loaded.
            BackendConfigError: the model's tokenizer is not on this machine.
        """
        return require_loaded(self._tokens, backend=NAME, what="vocabulary").vocabulary()

    # -- device state ----------------------------------------------------------------------------

    def synchronize(self) -> None:
        """Nothing to wait for: every request has returned when ``generate`` returns."""

    def reset_peak_memory(self) -> None:
        """Nothing to reset: the server's memory is not this process's."""

    def peak_memory(self) -> MemoryUsage:
        """Unavailable: the server runs in its own process."""
        return MemoryUsage(
            peak_mb=None,
            kind="unavailable",
            note="the server runs in its own process; its memory is not measured",
        )

    def close(self) -> None:
        """Stop the client (waiting for requests in flight) and drop the tokenizer."""
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.close()
        self._facts = None
        self._info = None
        self._tokens = None

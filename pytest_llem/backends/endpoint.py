"""The endpoint backend: an OpenAI-compatible HTTP server (vLLM, trtllm-serve, SGLang, TGI,
llama.cpp) that runs on the measured machine.

Every request is one streamed ``POST /v1/completions`` on its own connection, from a thread pool
bounded by ``endpoint.max_concurrency``; the arrival time of each server-sent event is the time
of the tokens it carries. Energy comes from this machine's meters, so the server must run here;
its process is not ours, so no peak memory is reported. Only the standard library is used.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

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
from pytest_llem.config.models import CaseConfig
from pytest_llem.exceptions import (
    BackendConfigError,
    BackendError,
    BackendInferenceError,
    BackendInitializationError,
    BackendNotAvailableError,
    BackendTimeoutError,
    LlemError,
    RetryableError,
)

__all__ = ["COUNTING_LABELS", "EndpointBackend"]

logger = logging.getLogger("pytest_llem")

_NAME = "endpoint"
_START_HINT = (
    "start an OpenAI-compatible server (vllm serve, trtllm-serve, ...) on this machine and "
    "pass --llem-endpoint=URL"
)
#: Placeholder id of an output token whose id the server did not return.
_UNKNOWN_ID = -1
_MAX_ERROR_CHARS = 500
_PROBE_PROMPT = "Hello"
_PROBE_TOKENS = 2
#: Failures of the connection or of the bytes on it (UnicodeDecodeError: a broken stream).
_TRANSPORT_ERRORS = (OSError, http.client.HTTPException, UnicodeDecodeError)

_Method = Literal["ids", "logprob_ids", "logprobs", "usage", "chunks"]

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
_RANK = {method: rank for rank, method in enumerate(COUNTING_LABELS)}
#: The counting methods each ``endpoint.token_source`` accepts, best first.
_ALLOWED: dict[str, tuple[_Method, ...]] = {
    "auto": ("ids", "usage", "chunks"),
    "return_token_ids": ("ids",),
    "logprobs": ("logprob_ids", "logprobs"),
    "usage": ("usage",),
    "chunks": ("chunks",),
}
#: Request fields outside the OpenAI completions API, dropped in this order when a server
#: rejects them (trtllm-serve forbids unknown fields; vLLM and SGLang accept these).
_EXTENSION_GROUPS: tuple[tuple[str, ...], ...] = (
    ("return_token_ids", "return_tokens_as_token_ids"),
    ("min_tokens", "ignore_eos"),
    ("stream_options",),
)


@dataclass(frozen=True)
class _Server:
    """Where the server listens; API paths are joined to ``root``."""

    url: str
    scheme: str
    host: str
    port: int
    root: str

    @classmethod
    def parse(cls, url: str) -> _Server:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BackendConfigError(_NAME, "endpoint.url", f"expected an http(s) URL, got {url!r}")
        root = parts.path.rstrip("/").removesuffix("/v1")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(url, parts.scheme, parts.hostname, port, root)

    def path(self, api_path: str) -> str:
        return f"{self.root}{api_path}"


@dataclass
class _Features:
    """What the server accepted when probed at load time."""

    extensions: frozenset[str]
    method: _Method
    usage_in_stream: bool


@dataclass
class _Stream:
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
        """Take one parsed event."""
        usage = event.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        choices = event.get("choices") or []
        if not choices:
            return
        choice = choices[0]
        self.last_time = arrival
        if choice.get("finish_reason"):
            self.finish_reason = str(choice["finish_reason"])
        if self.prompt_token_ids is None and isinstance(choice.get("prompt_token_ids"), list):
            self.prompt_token_ids = [int(t) for t in choice["prompt_token_ids"]]
        ids = choice.get("token_ids")
        if isinstance(ids, list):
            self.ids_seen = True
            self.id_values.extend(int(t) for t in ids)
            self.id_times.extend([arrival] * len(ids))
        logprobs = choice.get("logprobs")
        tokens = logprobs.get("tokens") if isinstance(logprobs, dict) else None
        if isinstance(tokens, list):
            self.logprobs_seen = True
            self.logprob_tokens.extend(str(t) for t in tokens)
            self.logprob_times.extend([arrival] * len(tokens))
        text = choice.get("text") or ""
        if text:
            self.text.append(text)
            self.chunk_times.append(arrival)

    def available(self) -> list[_Method]:
        """The counting methods this stream supports, best first."""
        methods: list[_Method] = []
        if self.ids_seen:
            methods.append("ids")
        if self.logprobs_seen:
            ids = _logprob_ids(self.logprob_tokens)
            methods.append("logprob_ids" if ids is not None else "logprobs")
        if self.usage is not None and isinstance(self.usage.get("completion_tokens"), int):
            methods.append("usage")
        methods.append("chunks")
        return methods

    def live(self, method: _Method, start: int) -> list[int]:
        """Ids (placeholders where unknown) of the tokens counted by ``method`` from ``start``
        on, as far as the stream has come; only methods that count per chunk."""
        if method == "ids":
            return self.id_values[start:]
        if method in ("logprob_ids", "logprobs"):
            tail = self.logprob_tokens[start:]
            ids = _logprob_ids(tail) if method == "logprob_ids" else None
            return ids if ids is not None else [_UNKNOWN_ID] * len(tail)
        if method == "chunks":
            return [_UNKNOWN_ID] * max(0, len(self.chunk_times) - start)
        return []

    def tokens(self, method: _Method) -> tuple[list[int], list[float]]:
        """Output token ids (placeholders where unknown) and their times, by ``method``."""
        if method == "ids":
            return list(self.id_values), list(self.id_times)
        if method in ("logprob_ids", "logprobs"):
            ids = _logprob_ids(self.logprob_tokens) if method == "logprob_ids" else None
            count = len(self.logprob_tokens)
            return (ids if ids is not None else [_UNKNOWN_ID] * count), list(self.logprob_times)
        if method == "usage":
            count = int((self.usage or {}).get("completion_tokens") or 0)
            return [_UNKNOWN_ID] * count, _spread(count, self.chunk_times, self.last_time)
        return [_UNKNOWN_ID] * len(self.chunk_times), list(self.chunk_times)


def _logprob_ids(tokens: list[str]) -> list[int] | None:
    """Ids from ``token_id:N`` strings (vLLM's return_tokens_as_token_ids), else None."""
    ids: list[int] = []
    for token in tokens:
        head, _, tail = token.partition(":")
        if head != "token_id" or not tail.lstrip("-").isdigit():
            return None
        ids.append(int(tail))
    return ids


def _spread(count: int, times: list[float], last: float | None) -> list[float]:
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


class EndpointBackend:
    """Sends a case's requests to an OpenAI-compatible server's ``/v1/completions``.

    Args:
        config: The case; ``endpoint.*`` says where the server is and how to talk to it,
            ``model`` (or ``endpoint.served_model``) which model it serves.
        progress: Called with short lines of text during slow steps.
    """

    name = _NAME
    capabilities = BackendCapabilities(
        streaming=True,
        batching=True,
        devices=("cpu", "cuda"),
        dtypes=("auto", "float32", "float16", "bfloat16"),
        scheduling=True,
    )

    def __init__(
        self, config: CaseConfig, *, progress: Callable[[str], None] | None = None
    ) -> None:
        self._config = config
        self._options = config.endpoint
        self._progress = progress
        self._server: _Server | None = None
        self._headers: dict[str, str] = {}
        self._served = config.endpoint.served_model or config.model
        self._features: _Features | None = None
        self._tokenize = False
        self._model_root: str | None = None
        self._tokenizer: Any = None
        self._vocabulary: Vocabulary | None = None
        self._prompt_ids: dict[str, tuple[int, ...]] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        # Tokenizing may happen on the request threads (a prompt not counted before).
        self._tokenizer_lock = threading.Lock()
        self._warned_short = False
        self._fallback: _Method | None = None
        self._info: BackendInfo | None = None

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
            raise BackendNotAvailableError(_NAME, _START_HINT)
        self._server = _Server.parse(url)
        self._headers = self._base_headers()
        started = time.perf_counter()
        self._report(f"checking the server at {url} for model {self._served!r}")
        entry = self._served_model_entry()
        root = entry.get("root")
        self._model_root = str(root) if isinstance(root, str) and root else None
        version = self._server_version()
        self._tokenize = self._probe_tokenize()
        self._features = self._probe_completions()
        self._pool = ThreadPoolExecutor(
            max_workers=self._options.max_concurrency, thread_name_prefix="llem-endpoint"
        )
        self._info = BackendInfo(
            name=_NAME,
            version=version,
            device="server",
            dtype="server",
            model=self._config.model,
            model_path=self._local_root(),
            load_seconds=time.perf_counter() - started,
            extra=self._extra(entry),
        )
        logger.info("endpoint %s serves %s (%s)", url, self._served, self._features.method)
        return self._info

    def _report(self, message: str) -> None:
        logger.info(message)
        if self._progress is not None:
            self._progress(message)

    def _base_headers(self) -> dict[str, str]:
        headers = {"User-Agent": f"pytest-llem/{__version__}", "Accept": "application/json"}
        key = os.environ.get(self._options.api_key_env, "").strip()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _served_model_entry(self) -> dict[str, Any]:
        """The ``/v1/models`` entry of the served model (empty when the server lists none)."""
        body = self._request_json("GET", "/v1/models")
        data = body.get("data") if isinstance(body, dict) else None
        entries = [e for e in data or [] if isinstance(e, dict) and "id" in e]
        if not entries:
            return {}
        for entry in entries:
            if entry["id"] == self._served:
                return entry
        served = ", ".join(repr(e["id"]) for e in entries)
        raise BackendConfigError(
            _NAME,
            "endpoint.served_model",
            f"the server at {self._options.url} serves {served}, not {self._served!r}; set "
            "--llem-model to the model it serves, or endpoint.served_model to its name there",
        )

    def _server_version(self) -> str | None:
        """The server's ``/version`` (vLLM, SGLang), where it answers one."""
        try:
            body = self._request_json("GET", "/version", missing_ok=True)
        except (BackendConfigError, BackendInferenceError) as e:
            logger.info("the server's /version is not usable: %s", e)
            return None
        version = body.get("version") if isinstance(body, dict) else None
        return str(version) if version is not None else None

    def _local_root(self) -> str | None:
        for candidate in (self._config.model, self._model_root):
            if candidate and Path(candidate).expanduser().is_dir():
                return str(Path(candidate).expanduser().resolve())
        return None

    def _probe_tokenize(self) -> bool:
        """Whether the server has a vLLM-style ``/tokenize`` that returns token ids."""
        try:
            body = self._request_json(
                "POST",
                "/tokenize",
                {"model": self._served, "prompt": _PROBE_PROMPT},
                missing_ok=True,
            )
        except (BackendConfigError, BackendInferenceError) as e:
            logger.info("the server's /tokenize is not usable: %s", e)
            return False
        return isinstance(body, dict) and isinstance(body.get("tokens"), list)

    def _probe_completions(self) -> _Features:
        """Send a two-token completion with every extension, dropping those the server rejects,
        and see which counting method the stream supports."""
        source = self._options.token_source
        extensions = {"stream_options", "min_tokens", "ignore_eos"}
        if source in ("auto", "return_token_ids"):
            extensions.add("return_token_ids")
        if source == "logprobs":
            extensions.add("return_tokens_as_token_ids")
        groups = [g for g in _EXTENSION_GROUPS if extensions.intersection(g)]
        while True:
            payload = self._probe_payload(extensions)
            try:
                stream = self._stream(payload, on_event=None)
                break
            except BackendConfigError as e:
                if not groups or e.param != "request":
                    raise
                dropped = groups.pop(0)
                logger.info("the server rejected %s (%s); trying without", dropped, e)
                extensions.difference_update(dropped)
        allowed = _ALLOWED[source]
        usable = [m for m in stream.available() if m in allowed]
        if not usable:
            raise BackendConfigError(
                _NAME,
                "endpoint.token_source",
                f"the server at {self._options.url} does not stream what token_source="
                f"{source!r} needs (it sent: {', '.join(stream.available())})",
            )
        return _Features(frozenset(extensions), usable[0], stream.usage is not None)

    def _probe_payload(self, extensions: set[str]) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self._served,
            "prompt": _PROBE_PROMPT,
            "max_tokens": _PROBE_TOKENS,
            "temperature": 0.0,
            "stream": True,
        }
        if "stream_options" in extensions:
            payload["stream_options"] = {"include_usage": True}
        if "min_tokens" in extensions:
            payload.update(min_tokens=_PROBE_TOKENS, ignore_eos=True)
        if "return_token_ids" in extensions:
            payload["return_token_ids"] = True
        if self._options.token_source == "logprobs":
            payload["logprobs"] = 1
            if "return_tokens_as_token_ids" in extensions:
                payload["return_tokens_as_token_ids"] = True
        return payload

    def _extra(self, entry: dict[str, Any]) -> dict[str, str]:
        features = self._features
        assert features is not None
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
            "tokenizer": "server /tokenize" if self._tokenize else "local tokenizer",
            "api_key": f"from ${self._options.api_key_env}"
            if "Authorization" in self._headers
            else "none",
            "memory": "not measured: the server runs in its own process",
            "energy": "measured by this machine's meters: the server must run on this machine",
        }
        for key in ("owned_by", "root", "max_model_len"):
            if entry.get(key) is not None:
                extra[f"server_{key}"] = str(entry[key])
        return extra

    # -- generation ------------------------------------------------------------------------------

    def generate(
        self,
        requests: Sequence[Request],
        *,
        params: GenerateParams,
        on_token: TokenCallback | None = None,
    ) -> list[Generation]:
        """Send every request at once (each on its own connection) and wait for all of them.

        Args:
            requests: The prompts: token ids are sent as a list of ints, texts as text.
            params: Output lengths, input truncation, sampling and seed.
            on_token: Called as ``on_token(request.index, token_id, time)`` for each output
                token as its chunk arrives (id -1 where the server sends no ids; with
                usage counting, once the stream has ended).

        Returns:
            One Generation per request, in order.

        Raises:
            BackendInferenceError: the backend is not loaded or the server failed.
            BackendConfigError: the server rejected a request (HTTP 4xx).
            BackendTimeoutError: the server did not answer within ``endpoint.timeout_s``.
            RetryableError: the server ran out of memory or was busy.
        """
        pool = self._require_pool()
        futures = [pool.submit(self._complete, r, params, on_token) for r in requests]
        try:
            return [future.result() for future in futures]
        finally:
            for future in futures:
                future.cancel()

    def submit(
        self,
        request: Request,
        *,
        params: GenerateParams,
        on_token: TokenCallback | None = None,
    ) -> Future[Generation]:
        """Start ``request`` now on its own connection and return at once.

        When ``endpoint.max_concurrency`` requests are open it waits in this client's queue.
        """
        return self._require_pool().submit(self._complete, request, params, on_token)

    def _require_pool(self) -> ThreadPoolExecutor:
        if self._pool is None or self._features is None:
            raise BackendInferenceError(f"{_NAME}: generate() called before load()")
        return self._pool

    def _complete(
        self, request: Request, params: GenerateParams, on_token: TokenCallback | None
    ) -> Generation:
        features = self._features
        assert features is not None
        payload, sent_ids = self._payload(request, params)
        streamed = 0

        def on_event(stream: _Stream, arrival: float) -> None:
            nonlocal streamed
            if on_token is None or features.method == "usage":
                return
            ids = stream.live(features.method, streamed)
            streamed += len(ids)
            with self._lock:
                for token in ids:
                    on_token(request.index, token, arrival)

        issued_at = time.perf_counter()
        stream = self._stream(payload, on_event=on_event if on_token is not None else None)
        method = self._method_for(stream)
        ids, times = stream.tokens(method)
        if on_token is not None and (method != features.method or method == "usage"):
            # Counts known only at the end: the tokens are reported now, with their times.
            with self._lock:
                for token, at in zip(ids[streamed:], times[streamed:], strict=True):
                    on_token(request.index, token, at)
        self._check_length(len(ids), params)
        return Generation(
            request_index=request.index,
            input_tokens=self._input_tokens(request, stream, sent_ids),
            output_token_ids=ids,
            token_times=times,
            issued_at=issued_at,
            text="".join(stream.text),
        )

    def _method_for(self, stream: _Stream) -> _Method:
        """The probed method, or the best one this response supports when it lacks that one
        (the record then names the weakest method used, as ``token_counting_fallback``)."""
        features = self._features
        assert features is not None
        assert self._info is not None
        available = stream.available()
        if features.method in available:
            return features.method
        allowed = _ALLOWED[self._options.token_source]
        usable = [m for m in available if m in allowed] or available
        method = usable[0]
        with self._lock:
            if self._fallback is None or _RANK[method] > _RANK[self._fallback]:
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
            _NAME,
            count,
            wanted,
        )

    def _payload(
        self, request: Request, params: GenerateParams
    ) -> tuple[dict[str, Any], list[int] | None]:
        features = self._features
        assert features is not None
        prompt, sent_ids = self._prompt(request, params.max_input_tokens)
        sampling = params.sampling
        payload: dict[str, Any] = {
            "model": self._served,
            "prompt": prompt,
            "max_tokens": params.max_new_tokens,
            "stream": True,
            "temperature": sampling.temperature if sampling.do_sample else 0.0,
            "top_p": sampling.top_p if sampling.do_sample else 1.0,
        }
        if sampling.do_sample:
            # One seed per request: reproducible, yet requests do not share their draws.
            payload["seed"] = (params.seed + request.index) % 2**31
            if sampling.top_k > 0:
                payload["top_k"] = sampling.top_k
        extensions = features.extensions
        if "stream_options" in extensions:
            payload["stream_options"] = {"include_usage": True}
        if params.min_new_tokens is not None and "min_tokens" in extensions:
            payload["min_tokens"] = params.min_new_tokens
            if params.min_new_tokens >= params.max_new_tokens:
                payload["ignore_eos"] = True
        if "return_token_ids" in extensions:
            payload["return_token_ids"] = True
        if self._options.token_source == "logprobs":
            payload["logprobs"] = 1
            if "return_tokens_as_token_ids" in extensions:
                payload["return_tokens_as_token_ids"] = True
        return payload, sent_ids

    def _prompt(
        self, request: Request, max_input_tokens: int | None
    ) -> tuple[str | list[int], list[int] | None]:
        """The prompt to send: token ids when the request has them or when a counted text is
        longer than ``max_input_tokens`` (its head is kept), else the text."""
        ids = request.token_ids
        if ids is None:
            known = self._prompt_ids.get(request.prompt)
            if known is None or max_input_tokens is None or len(known) <= max_input_tokens:
                return request.prompt, None
            ids = known
        if not ids:
            raise BackendInferenceError(
                f"{_NAME}: request {request.index} has an empty token_ids prompt"
            )
        sent = list(ids[:max_input_tokens] if max_input_tokens is not None else ids)
        return sent, sent

    def _input_tokens(self, request: Request, stream: _Stream, sent_ids: list[int] | None) -> int:
        usage = stream.usage or {}
        if isinstance(usage.get("prompt_tokens"), int):
            return int(usage["prompt_tokens"])
        if stream.prompt_token_ids is not None:
            return len(stream.prompt_token_ids)
        if sent_ids is not None:
            return len(sent_ids)
        # Not counted before (the harness always counts first): count it now.
        return self.count_tokens([request.prompt])[0]

    # -- HTTP ------------------------------------------------------------------------------------

    def _connect(self) -> http.client.HTTPConnection:
        server = self._server
        assert server is not None
        kind = (
            http.client.HTTPSConnection if server.scheme == "https" else http.client.HTTPConnection
        )
        connection = kind(server.host, server.port, timeout=self._options.connect_timeout_s)
        try:
            connection.connect()
        except TimeoutError as e:
            connection.close()
            raise BackendTimeoutError(
                f"{_NAME}: no connection to {server.url} within "
                f"{self._options.connect_timeout_s:g} s (endpoint.connect_timeout_s)"
            ) from e
        except OSError as e:
            connection.close()
            raise _connection_error(server.url, e) from e
        assert connection.sock is not None
        connection.sock.settimeout(self._options.timeout_s)
        return connection

    def _exchange(
        self, method: str, path: str, body: dict[str, Any] | None, *, stream: bool
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send one request on a new connection; returns it with the response head read."""
        server = self._server
        assert server is not None
        headers = dict(self._headers)
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if stream:
            headers["Accept"] = "text/event-stream"
        connection = self._connect()
        try:
            connection.request(method, server.path(path), body=data, headers=headers)
            return connection, connection.getresponse()
        except _TRANSPORT_ERRORS as e:
            connection.close()
            raise self._transport_error(path, e) from e
        except BaseException:
            connection.close()
            raise

    def _transport_error(self, path: str, error: Exception) -> BackendError:
        server = self._server
        assert server is not None
        if isinstance(error, TimeoutError):
            return BackendTimeoutError(
                f"{_NAME}: {server.url}{path} sent nothing for {self._options.timeout_s:g} s "
                "(endpoint.timeout_s)"
            )
        if isinstance(error, ConnectionRefusedError):
            return _connection_error(server.url, error)
        return BackendInferenceError(f"{_NAME}: {server.url}{path} failed: {error!r}")

    def _request_json(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        missing_ok: bool = False,
    ) -> Any:
        """One JSON request; None when ``missing_ok`` and the server has no such endpoint."""
        connection, response = self._exchange(method, path, body, stream=False)
        try:
            raw = response.read()
        except _TRANSPORT_ERRORS as e:
            raise self._transport_error(path, e) from e
        finally:
            connection.close()
        if missing_ok and response.status in (404, 405, 501):
            return None
        if response.status >= 400:
            raise _status_error(response.status, _error_message(raw), url=self._url(path))
        try:
            return json.loads(raw)
        except ValueError as e:
            if missing_ok:
                return None
            raise BackendInferenceError(f"{_NAME}: {self._url(path)} sent invalid JSON") from e

    def _stream(
        self,
        payload: dict[str, Any],
        *,
        on_event: Callable[[_Stream, float], None] | None,
    ) -> _Stream:
        """Run one streamed completion and collect its events."""
        path = "/v1/completions"
        connection, response = self._exchange("POST", path, payload, stream=True)
        stream = _Stream()
        try:
            if response.status >= 400:
                message = _error_message(response.read())
                raise _status_error(response.status, message, url=self._url(path))
            for data, arrival in _sse_events(response):
                if data == "[DONE]":
                    stream.done = True
                    break
                stream.add(_json_event(data, self._url(path)), arrival)
                if on_event is not None:
                    on_event(stream, arrival)
        except _TRANSPORT_ERRORS as e:
            raise self._transport_error(path, e) from e
        finally:
            connection.close()
        if not stream.done and stream.finish_reason is None:
            # A server that fails mid-stream closes the connection: a cut stream is an error,
            # never a completion with the tokens that happened to arrive.
            raise BackendInferenceError(
                f"{_NAME}: {self._url(path)} closed the stream before it finished "
                "(no finish_reason, no [DONE])"
            )
        return stream

    def _url(self, path: str) -> str:
        server = self._server
        assert server is not None
        return f"{server.url.rstrip('/').removesuffix('/v1')}{path}"

    # -- tokens ----------------------------------------------------------------------------------

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Prompt tokens of each text: by the server's ``/tokenize`` when it has one, else by
        the model's tokenizer on this machine.

        The ids are kept, so a prompt longer than ``max_input_tokens`` can be sent truncated.

        Raises:
            BackendInferenceError: the backend is not loaded.
            BackendConfigError: neither the server nor this machine can tokenize for the model.
        """
        if self._features is None:
            raise BackendInferenceError(f"{_NAME}: count_tokens() called before load()")
        counts: list[int] = []
        for text in texts:
            ids = self._prompt_ids.get(text)
            if ids is None:
                ids = self._tokenize_remote(text) if self._tokenize else self._tokenize_local(text)
                self._prompt_ids[text] = ids
            counts.append(len(ids))
        return counts

    def _tokenize_remote(self, text: str) -> tuple[int, ...]:
        body = self._request_json("POST", "/tokenize", {"model": self._served, "prompt": text})
        tokens = body.get("tokens") if isinstance(body, dict) else None
        if not isinstance(tokens, list):
            raise BackendInferenceError(f"{_NAME}: {self._url('/tokenize')} sent no token ids")
        return tuple(int(t) for t in tokens)

    def _tokenize_local(self, text: str) -> tuple[int, ...]:
        with self._tokenizer_lock:
            tokenizer = self._local_tokenizer()
            try:
                encoded = tokenizer(text, verbose=False)["input_ids"]
            except Exception as e:
                raise BackendInferenceError(f"{_NAME}: tokenizing failed: {e}") from e
        return tuple(int(t) for t in encoded)

    def vocabulary(self) -> Vocabulary:
        """The ids the model accepts, from its tokenizer on this machine.

        Raises:
            BackendInferenceError: the backend is not loaded.
            BackendConfigError: the model's tokenizer is not on this machine.
        """
        if self._features is None:
            raise BackendInferenceError(f"{_NAME}: vocabulary() called before load()")
        if self._vocabulary is None:
            with self._tokenizer_lock:
                tokenizer = self._local_tokenizer()
            size = len(tokenizer)
            special = {int(t) for t in tokenizer.all_special_ids}
            special.update(
                int(token)
                for token, added in tokenizer.added_tokens_decoder.items()
                if getattr(added, "special", False)
            )
            self._vocabulary = Vocabulary(
                size=size, special_ids=frozenset(t for t in special if 0 <= t < size)
            )
        return self._vocabulary

    def _local_tokenizer(self) -> Any:
        """The model's tokenizer from llem-tiny, a local folder (the case's model or the
        server's model root) or the local Hugging Face cache."""
        if self._tokenizer is not None:
            return self._tokenizer
        try:
            from transformers import AutoTokenizer
        except ImportError as e:
            raise BackendConfigError(
                _NAME,
                "model",
                "the server has no /tokenize endpoint and transformers is not installed to "
                "tokenize here (pip install 'pytest-llem[transformers]')",
            ) from e
        failures: list[str] = []
        for source in self._tokenizer_sources():
            try:
                self._tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
                return self._tokenizer
            except LlemError:
                raise  # a CaseTimeoutError is not a missing tokenizer
            except Exception as e:
                failures.append(f"{source}: {type(e).__name__}")
        tried = "; ".join(failures) or "no candidate"
        raise BackendConfigError(
            _NAME,
            "model",
            f"cannot tokenize for {self._config.model!r}: the server has no usable /tokenize "
            "endpoint and the model is not llem-tiny, a local folder or in the local Hugging "
            f"Face cache (tried {tried})",
        )

    def _tokenizer_sources(self) -> list[str]:
        from pytest_llem.data.tiny_model import TINY_MODEL_NAME, ensure_tiny_model

        sources: list[str] = []
        for name in (self._config.model, self._model_root):
            if not name:
                continue
            if name == TINY_MODEL_NAME:
                sources.append(str(ensure_tiny_model(progress=self._progress)))
            else:
                sources.append(str(Path(name).expanduser()) if name.startswith("~") else name)
        return list(dict.fromkeys(sources))

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
        """Stop the client's threads (waiting for requests in flight) and drop the tokenizer."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool = None
        self._features = None
        self._info = None
        self._tokenizer = None
        self._vocabulary = None
        self._prompt_ids.clear()


def _sse_events(response: http.client.HTTPResponse) -> Iterator[tuple[str, float]]:
    """The data of each server-sent event with its arrival time (``time.perf_counter``)."""
    lines: list[str] = []
    while True:
        raw = response.readline()
        if not raw:
            break
        line = raw.decode("utf-8").rstrip("\r\n")
        if line:
            if line.startswith("data:"):
                lines.append(line[5:].removeprefix(" "))
            continue
        if lines:
            yield "\n".join(lines), time.perf_counter()
            lines = []
    if lines:
        yield "\n".join(lines), time.perf_counter()


def _json_event(data: str, url: str) -> dict[str, Any]:
    try:
        event = json.loads(data)
    except ValueError as e:
        raise BackendInferenceError(f"{_NAME}: {url} streamed invalid JSON: {data[:200]!r}") from e
    if not isinstance(event, dict):
        raise BackendInferenceError(f"{_NAME}: {url} streamed a non-object event: {data[:200]!r}")
    error = event.get("error")
    if error:
        message = _message_of(error) or json.dumps(error)[:_MAX_ERROR_CHARS]
        code = error.get("code") if isinstance(error, dict) else None
        status = code if isinstance(code, int) and 400 <= code < 600 else 500
        raise _status_error(status, message, url=url)
    return event


def _message_of(error: Any) -> str | None:
    if isinstance(error, str):
        return error
    if isinstance(error, dict):
        for key in ("message", "detail", "error"):
            value = error.get(key)
            if isinstance(value, str):
                return value
            nested = _message_of(value) if isinstance(value, (dict, list)) else None
            if nested:
                return nested
    if isinstance(error, list) and error:
        return "; ".join(str(_message_of(item) or item) for item in error)
    return None


def _error_message(raw: bytes) -> str:
    """The server's own error message from an error body (OpenAI, FastAPI or plain text)."""
    text = raw.decode("utf-8", errors="replace").strip()
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    message = _message_of(body) if body is not None else None
    return (message or text or "no message")[:_MAX_ERROR_CHARS]


def _looks_out_of_memory(message: str) -> bool:
    lowered = message.lower()
    return "out of memory" in lowered or "outofmemory" in lowered or "oom" in lowered.split()


def _status_error(status: int, message: str, *, url: str) -> LlemError:
    """The error an HTTP status means, carrying the server's message."""
    text = f"HTTP {status} from {url}: {message}"
    if _looks_out_of_memory(message):
        return RetryableError(f"{_NAME}: the server ran out of memory: {text}")
    if status in (429, 503):
        return RetryableError(f"{_NAME}: the server is busy: {text}")
    if status in (401, 403):
        return BackendConfigError(_NAME, "endpoint.api_key_env", text)
    if status == 404:
        param = "endpoint.served_model" if "model" in message.lower() else "endpoint.url"
        return BackendConfigError(_NAME, param, text)
    if 400 <= status < 500:
        return BackendConfigError(_NAME, "request", text)
    return BackendInferenceError(f"{_NAME}: {text}")


def _connection_error(url: str, error: OSError) -> BackendError:
    if isinstance(error, ConnectionRefusedError):
        reason = "connection refused (is the server running on this machine?)"
    elif isinstance(error, socket.gaierror):
        reason = f"the host name does not resolve ({error})"
    else:
        reason = f"{type(error).__name__}: {error}"
    return BackendInitializationError(f"{_NAME}: cannot connect to {url}: {reason}")

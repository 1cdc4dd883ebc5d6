"""A small OpenAI-compatible HTTP server over the real transformers backend, for tests.

It listens on 127.0.0.1 (a ``ThreadingHTTPServer`` in a thread) and serves, like vLLM's:

- ``GET /v1/models``: the one served model, with ``root`` (its folder) and ``max_model_len``.
- ``POST /v1/completions``: text or token-id prompts, streamed as server-sent events
  (``data: {...}`` blank-line framed, ending with ``data: [DONE]``) or as one JSON body.
  ``stream_options.include_usage`` adds a last chunk with ``usage``. Extensions as in vLLM:
  ``top_k``, ``min_tokens``, ``ignore_eos`` and ``return_token_ids`` (each chunk then carries the
  ids of its tokens in ``choices[0].token_ids``, the first one also ``prompt_token_ids``).
- ``POST /tokenize``: ``{"count", "max_model_len", "tokens"}``.
- ``GET /version``: ``{"version": ...}``.

Attributes switch behaviour for a test: leave the extensions out of what the server accepts
(rejected with HTTP 400, as a server with strict request models does) or accept and ignore them,
stop sending ids or usage, group several tokens per chunk, stall before answering, cap output
lengths, or fail the next completion with a given status and message. Tokens are generated for
real, one request at a time, and each chunk is written as soon as its tokens exist.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from pytest_llem.backends.base import GenerateParams, Request
from pytest_llem.backends.transformers import TransformersBackend
from pytest_llem.config.models import CaseConfig, SamplingConfig

__all__ = ["EXTENSIONS", "FakeOpenAIServer", "running_server"]

#: Request fields of the OpenAI completions API this server understands.
STANDARD_FIELDS = frozenset(
    {
        "model",
        "prompt",
        "max_tokens",
        "temperature",
        "top_p",
        "n",
        "stream",
        "stream_options",
        "seed",
        "stop",
        "user",
        "logprobs",
        "echo",
        "presence_penalty",
        "frequency_penalty",
    }
)
#: vLLM's extensions this server implements.
EXTENSIONS = frozenset({"top_k", "min_tokens", "ignore_eos", "return_token_ids"})
MAX_MODEL_LEN = 2048


class FakeOpenAIServer:
    """An OpenAI-compatible server for ``model_dir`` (a transformers model folder).

    Args:
        model_dir: The model to serve (llem-tiny's folder in the tests).
        served_model: The name clients use for it.
        api_key: When set, requests need ``Authorization: Bearer <api_key>``.
    """

    def __init__(
        self, model_dir: Path, *, served_model: str = "llem-tiny", api_key: str | None = None
    ) -> None:
        self.model_dir = model_dir
        self.served_model = served_model
        self.api_key = api_key
        self.reset()
        self._backend = TransformersBackend(CaseConfig(model=str(model_dir), device="cpu"))
        # One lock for the model and its tokenizer: a Rust tokenizer shared between threads
        # fails with "Already borrowed" when one call changes its truncation settings.
        self._lock = threading.RLock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def reset(self) -> None:
        """Back to the default behaviour, with no requests seen."""
        #: Extensions accepted; the others are refused with HTTP 400.
        self.accepted_extensions: frozenset[str] = EXTENSIONS
        #: Accept and silently ignore every extension (a lenient server without them).
        self.ignore_extensions = False
        self.send_token_ids = True
        self.send_usage = True
        self.tokenize_enabled = True
        #: Whether /v1/models names the model's folder as ``root`` (as vLLM does).
        self.list_root = True
        self.tokens_per_chunk = 1
        #: Seconds to wait before answering a completion (after the probe at load, say).
        self.stall_s = 0.0
        #: Most output tokens generated, whatever was asked (a server that stops early).
        self.output_cap: int | None = None
        #: ``(status, message)`` answered to the next completion, once.
        self.fail_next: tuple[int, str] | None = None
        self.completions = 0
        self.payloads: list[dict[str, Any]] = []

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> FakeOpenAIServer:
        """Load the model and start listening on a free port of 127.0.0.1."""
        self._backend.load()
        handler = type("Handler", (_Handler,), {"fake": self})
        self._httpd = _Server(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and release the model."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._httpd = self._thread = None
        self._backend.close()

    @property
    def port(self) -> int:
        """The port the server listens on."""
        assert self._httpd is not None
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        """The server's base URL."""
        return f"http://127.0.0.1:{self.port}"

    # -- the model ---------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` as a completion counts them (special tokens included)."""
        with self._lock:
            encoded = self._backend._tokenizer(text, verbose=False)["input_ids"]
        return [int(t) for t in encoded]

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``, special tokens skipped."""
        with self._lock:
            return str(self._backend._tokenizer.decode(ids, skip_special_tokens=True))

    def generate(
        self, prompt: str | list[int], params: GenerateParams, on_token: Any
    ) -> tuple[list[int], int]:
        """Generate for one prompt; returns the output ids and the prompt's length."""
        request = (
            Request(index=0, prompt="<ids>", token_ids=tuple(prompt))
            if isinstance(prompt, list)
            else Request(index=0, prompt=prompt)
        )
        with self._lock:
            (generation,) = self._backend.generate([request], params=params, on_token=on_token)
        return generation.output_token_ids, generation.input_tokens


@contextmanager
def running_server(model_dir: Path, **kwargs: Any) -> Iterator[FakeOpenAIServer]:
    """A started :class:`FakeOpenAIServer`, stopped on exit."""
    server = FakeOpenAIServer(model_dir, **kwargs).start()
    try:
        yield server
    finally:
        server.stop()


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # a client that gave up (a timeout test) is not the server's fault
        super().handle_error(request, client_address)


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _Handler(BaseHTTPRequestHandler):
    """One connection's requests; ``fake`` is set on the subclass made in ``start``."""

    fake: FakeOpenAIServer
    protocol_version = "HTTP/1.1"
    client_gone = False

    def log_message(self, format: str, *args: Any) -> None:
        return None

    # -- routing -----------------------------------------------------------------------------

    def do_GET(self) -> None:
        if not self._authorized():
            return
        if self.path == "/v1/models":
            self._json(200, self._models())
        elif self.path == "/version":
            self._json(200, {"version": "fake-openai-server 1.0"})
        else:
            self._error(404, f"no route {self.path}")

    def do_POST(self) -> None:
        if not self._authorized():
            return
        try:
            body = self._body()
            if self.path == "/v1/completions":
                self._completions(body)
            elif self.path == "/tokenize" and self.fake.tokenize_enabled:
                self._tokenize(body)
            else:
                self._error(404, f"no route {self.path}")
        except _BadRequest as e:
            self._error(e.status, e.message)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up (a timeout test)

    def _authorized(self) -> bool:
        key = self.fake.api_key
        if key is None or self.headers.get("Authorization") == f"Bearer {key}":
            return True
        self._error(401, "invalid API key")
        return False

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except ValueError as e:
            raise _BadRequest(400, f"invalid JSON: {e}") from e
        if not isinstance(body, dict):
            raise _BadRequest(400, "the body must be a JSON object")
        return body

    # -- endpoints ---------------------------------------------------------------------------

    def _models(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "id": self.fake.served_model,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "pytest-llem-fake",
            "max_model_len": MAX_MODEL_LEN,
        }
        if self.fake.list_root:
            entry["root"] = str(self.fake.model_dir)
        return {"object": "list", "data": [entry]}

    def _tokenize(self, body: dict[str, Any]) -> None:
        self._check_model(body)
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise _BadRequest(400, "prompt must be a string")
        tokens = self.fake.tokenize(prompt)
        self._json(200, {"count": len(tokens), "max_model_len": MAX_MODEL_LEN, "tokens": tokens})

    def _completions(self, body: dict[str, Any]) -> None:
        fake = self.fake
        fake.completions += 1
        fake.payloads.append(body)
        self._check_model(body)
        self._check_fields(body)
        if fake.fail_next is not None:
            status, message = fake.fail_next
            fake.fail_next = None
            raise _BadRequest(status, message)
        if fake.stall_s:
            time.sleep(fake.stall_s)
        prompt = self._prompt(body)
        params = self._params(body, prompt)
        if body.get("stream"):
            self._stream(body, prompt, params)
        else:
            ids, input_tokens = fake.generate(prompt, params, None)
            choice: dict[str, Any] = {
                "index": 0,
                "text": fake.decode(ids),
                "logprobs": None,
                "finish_reason": _finish_reason(ids, params),
            }
            if self._wants_ids(body):
                choice["token_ids"] = ids
            result = _completion(fake.served_model, [choice])
            result["usage"] = _usage(input_tokens, len(ids))
            self._json(200, result)

    def _check_model(self, body: dict[str, Any]) -> None:
        if body.get("model") != self.fake.served_model:
            raise _BadRequest(404, f"The model `{body.get('model')}` does not exist.")

    def _check_fields(self, body: dict[str, Any]) -> None:
        fake = self.fake
        for name in body:
            if name in STANDARD_FIELDS and name != "logprobs":
                continue
            if name == "logprobs" and body[name] is None:
                continue
            if name in EXTENSIONS and (fake.ignore_extensions or name in fake.accepted_extensions):
                continue
            raise _BadRequest(400, f"{name}: Extra inputs are not permitted")

    def _prompt(self, body: dict[str, Any]) -> str | list[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return prompt
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            return [int(t) for t in prompt]
        raise _BadRequest(400, "prompt must be a string or a non-empty list of token ids")

    def _params(self, body: dict[str, Any], prompt: str | list[int]) -> GenerateParams:
        fake = self.fake
        max_tokens = int(body.get("max_tokens") or 16)
        length = len(prompt) if isinstance(prompt, list) else len(fake.tokenize(prompt))
        if length + max_tokens > MAX_MODEL_LEN:
            raise _BadRequest(
                400,
                f"This model's maximum context length is {MAX_MODEL_LEN} tokens. However, you "
                f"requested {length + max_tokens} tokens ({length} in the prompt, {max_tokens} "
                "for the completion).",
            )
        honour = not fake.ignore_extensions
        min_tokens = body.get("min_tokens") if honour else None
        if honour and body.get("ignore_eos"):
            min_tokens = max_tokens  # the transformers equivalent of never stopping at EOS
        if fake.output_cap is not None:
            max_tokens = min(max_tokens, fake.output_cap)
            min_tokens = min(min_tokens, max_tokens) if min_tokens else None
        temperature = float(body.get("temperature", 1.0))
        if temperature == 0.0:
            sampling = SamplingConfig()
        else:
            top_k = int(body.get("top_k") or 0) if honour else 0
            sampling = SamplingConfig(
                do_sample=True,
                temperature=temperature,
                top_p=float(body.get("top_p", 1.0)),
                top_k=max(top_k, 0),
            )
        return GenerateParams(
            max_new_tokens=max_tokens,
            min_new_tokens=int(min_tokens) if min_tokens else None,
            sampling=sampling,
            seed=int(body.get("seed") or 0),
        )

    def _wants_ids(self, body: dict[str, Any]) -> bool:
        fake = self.fake
        return (
            bool(body.get("return_token_ids"))
            and fake.send_token_ids
            and not (fake.ignore_extensions)
        )

    # -- streaming ---------------------------------------------------------------------------

    def _stream(
        self, body: dict[str, Any], prompt: str | list[int], params: GenerateParams
    ) -> None:
        fake = self.fake
        wants_ids = self._wants_ids(body)
        options = body.get("stream_options") or {}
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        ids: list[int] = []
        pending: list[int] = []
        first = True

        def emit(tokens: list[int], finish_reason: str | None) -> None:
            nonlocal first
            before = fake.decode(ids[: len(ids) - len(tokens)])
            choice: dict[str, Any] = {
                "index": 0,
                "text": fake.decode(ids)[len(before) :],
                "logprobs": None,
                "finish_reason": finish_reason,
            }
            if wants_ids:
                choice["token_ids"] = list(tokens)
                if first:
                    choice["prompt_token_ids"] = (
                        prompt if isinstance(prompt, list) else fake.tokenize(prompt)
                    )
            first = False
            self._event(_completion(fake.served_model, [choice]))

        def on_token(_index: int, token: int, _at: float) -> None:
            ids.append(token)
            pending.append(token)
            if len(pending) >= fake.tokens_per_chunk:
                emit(pending[:], None)
                pending.clear()

        out, input_tokens = fake.generate(prompt, params, on_token)
        emit(pending[:], _finish_reason(out, params))
        if options.get("include_usage") and fake.send_usage:
            usage = _completion(fake.served_model, [])
            usage["usage"] = _usage(input_tokens, len(out))
            self._event(usage)
        self._chunk(b"data: [DONE]\n\n")
        self._chunk(b"")

    def _event(self, payload: dict[str, Any]) -> None:
        self._chunk(f"data: {json.dumps(payload)}\n\n".encode())

    def _chunk(self, data: bytes) -> None:
        if self.client_gone:
            return  # generation still runs to its end, unseen
        try:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()
        except ConnectionError:
            self.client_gone = self.close_connection = True

    # -- plain responses ---------------------------------------------------------------------

    def _json(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        kind = "NotFoundError" if status == 404 else "BadRequestError"
        self._json(
            status,
            {"error": {"message": message, "type": kind, "param": None, "code": status}},
        )


def _completion(model: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": "cmpl-fake",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
    }


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _finish_reason(ids: list[int], params: GenerateParams) -> str:
    return "length" if len(ids) >= params.max_new_tokens else "stop"

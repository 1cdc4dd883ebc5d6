"""An OpenAI-compatible server that streams tokens at a fixed pace, for transport tests and the
endpoint benchmark (``tests/benchmarks/bench_endpoint.py``). Standard library only.

Like an engine that takes one decoding step per ``interval_s``, every open stream gets one
token per step (a token the tests can recognise: id 42, text ``" é"``); a request joins at the
next step. With ``slots`` set, at most that many streams decode at once, as an engine with a
fixed batch: a request beyond them waits in a queue (first come, first served) and takes the
slot a finished stream frees, from the step after. It serves ``GET /v1/models``, ``GET /version``, ``GET /health``, ``POST /tokenize``
(one token per whitespace-separated word) and ``POST /v1/completions`` (streamed or not;
``max_tokens`` tokens, always; ``stream_options.include_usage`` and ``return_token_ids`` as in
vLLM). Attributes make it misbehave for a test: write each event in pieces across steps
(``split_events``, with CRLF line ends), stall before answering (``stall_s``), drop the
connection after some tokens (``cut_after``), or end the body a step after ``[DONE]``
(``late_end``).

Run it on its own: ``python -m tests.fakes.paced_server --interval-ms 1`` prints
``PORT <n>`` and serves until stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TOKEN_ID", "TOKEN_TEXT", "PacedServer", "running_paced_server"]

TOKEN_ID = 42
TOKEN_TEXT = " é"  # two UTF-8 bytes: a split event can cut a character in half
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found"}


@dataclass
class _Stream:
    """One open streamed response: the byte pieces still to write, one per step."""

    writer: asyncio.Transport
    pieces: list[bytes]
    cut_after: int | None = None
    written: int = field(default=0)


class PacedServer:
    """The server; :meth:`start` runs it on an event loop in a thread of its own.

    Args:
        interval_s: Seconds per decoding step (one token per open stream each step).
        served_model: The model name it serves.
        slots: Most streams decoding at once (None: no limit); the rest wait their turn.
    """

    def __init__(
        self,
        *,
        interval_s: float = 0.001,
        served_model: str = "llem-tiny",
        slots: int | None = None,
    ) -> None:
        self.interval_s = interval_s
        self.served_model = served_model
        self.slots = slots
        #: Write each event in three pieces on three steps, with CRLF line ends.
        self.split_events = False
        #: Seconds to wait before answering a completion.
        self.stall_s = 0.0
        #: Drop the connection after this many token events of a stream.
        self.cut_after: int | None = None
        #: End the chunked body one step after ``[DONE]`` (as a server that sends its end
        #: separately does) instead of with it.
        self.late_end = False
        self.completions = 0
        #: Connections accepted, and the most streams open at once.
        self.connections = 0
        self.most_open = 0
        self._streams: list[_Stream] = []
        #: Streams waiting for a slot, oldest first.
        self._waiting: list[_Stream] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._ticking = False

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> PacedServer:
        """Listen on a free port of 127.0.0.1, on a loop in a background thread."""
        loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=loop.run_forever, daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.listen(loop), loop).result(timeout=10)
        return self

    async def listen(self, loop: asyncio.AbstractEventLoop, port: int = 0) -> None:
        """Start listening on ``loop`` (the current one)."""
        self._loop = loop
        self._server = await loop.create_server(lambda: _Connection(self), "127.0.0.1", port)

    def stop(self) -> None:
        """Stop listening and stop the loop."""
        loop, server = self._loop, self._server
        if loop is None or server is None:
            return

        async def close() -> None:
            server.close()
            for stream in [*self._streams, *self._waiting]:
                stream.writer.abort()

        asyncio.run_coroutine_threadsafe(close(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)
        if not loop.is_running():
            loop.close()
        self._loop = self._server = self._thread = None

    @property
    def port(self) -> int:
        """The port it listens on."""
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        """The server's base URL."""
        return f"http://127.0.0.1:{self.port}"

    # -- streaming ---------------------------------------------------------------------------

    def open_stream(self, writer: asyncio.Transport, body: dict[str, Any]) -> None:
        """Start a streamed completion; its tokens come one per step from the next step on."""
        pieces = self._pieces(body)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        stream = _Stream(writer, pieces, self.cut_after)
        if self.slots is not None and len(self._streams) >= self.slots:
            self._waiting.append(stream)
        else:
            self._streams.append(stream)
        self.most_open = max(self.most_open, len(self._streams))
        if not self._ticking:
            self._ticking = True
            assert self._loop is not None
            self._loop.call_soon(self._step, self._loop.time())

    def _step(self, planned: float) -> None:
        """One decoding step: the next piece of every open stream."""
        streams = self._streams
        for stream in list(streams):
            if stream.writer.is_closing():
                streams.remove(stream)
                continue
            if stream.cut_after is not None and stream.written >= stream.cut_after:
                stream.writer.abort()  # no last chunk: the client sees a cut stream
                streams.remove(stream)
                continue
            stream.writer.write(stream.pieces[stream.written])
            stream.written += 1
            if stream.written == len(stream.pieces):
                streams.remove(stream)
        # A freed slot goes to the oldest waiting stream; its first token comes next step.
        while self._waiting and (self.slots is None or len(streams) < self.slots):
            streams.append(self._waiting.pop(0))
        if not streams:
            self._ticking = False
            return
        assert self._loop is not None
        # Late steps are not made up for: a busy engine slows down, it does not burst.
        following = max(planned + self.interval_s, self._loop.time())
        self._loop.call_at(following, self._step, following)

    def _pieces(self, body: dict[str, Any]) -> list[bytes]:
        """The bytes written at each step: one token event each, the last one with the usage
        event, ``[DONE]`` and the end of the chunked body."""
        count = max(int(body.get("max_tokens") or 16), 1)
        wants_ids = bool(body.get("return_token_ids"))
        middle = self._event([self._choice(wants_ids, None)])
        events = [middle] * (count - 1) + [self._event([self._choice(wants_ids, "length")])]
        tail = b""
        if (body.get("stream_options") or {}).get("include_usage"):
            tail += self._event([], usage=_usage(_prompt_tokens(body), count))
        tail += self._frame(b"data: [DONE]")
        pieces = []
        for event in events:
            if not self.split_events:
                pieces.append(_chunk(event))
                continue
            cut = event.index(TOKEN_TEXT.encode()) + 2  # inside the two-byte character
            pieces += [_chunk(event[:cut]), _chunk(event[cut:-1]), _chunk(event[-1:])]
        pieces[-1] += _chunk(tail)
        end = b"0\r\n\r\n"
        if self.late_end:
            pieces.append(end)
        else:
            pieces[-1] += end
        return pieces

    def _choice(self, wants_ids: bool, finish: str | None) -> dict[str, Any]:
        choice: dict[str, Any] = {
            "index": 0,
            "text": TOKEN_TEXT,
            "logprobs": None,
            "finish_reason": finish,
        }
        if wants_ids:
            choice["token_ids"] = [TOKEN_ID]
        return choice

    def _event(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        payload = {**_completion(self.served_model, choices), **extra}
        return self._frame(b"data: " + json.dumps(payload, ensure_ascii=False).encode())

    def _frame(self, line: bytes) -> bytes:
        return line + (b"\r\n\r\n" if self.split_events else b"\n\n")

    # -- plain answers -----------------------------------------------------------------------

    def answer(self, method: str, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        """The status and JSON body of a request that is not a stream."""
        if (method, path) == ("GET", "/v1/models"):
            entry = {"id": self.served_model, "object": "model", "owned_by": "paced"}
            return 200, {"object": "list", "data": [entry]}
        if (method, path) == ("GET", "/version"):
            return 200, {"version": "paced-server 1.0"}
        if (method, path) == ("GET", "/health"):
            return 200, {}
        if body.get("model") != self.served_model:
            return 404, {"error": {"message": f"The model `{body.get('model')}` does not exist."}}
        if (method, path) == ("POST", "/tokenize"):
            tokens = [TOKEN_ID] * _prompt_tokens(body)
            return 200, {"count": len(tokens), "tokens": tokens}
        if (method, path) == ("POST", "/v1/completions"):
            count = max(int(body.get("max_tokens") or 16), 1)
            choice = {"index": 0, "text": TOKEN_TEXT * count, "finish_reason": "length"}
            result = _completion(self.served_model, [choice])
            return 200, {**result, "usage": _usage(_prompt_tokens(body), count)}
        return 404, {"error": {"message": f"no route {path}"}}


class _Connection(asyncio.Protocol):
    """One client connection: HTTP/1.1 requests with a Content-Length body, kept alive."""

    def __init__(self, server: PacedServer) -> None:
        self._server = server
        self._buffer = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._server.connections += 1

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while True:
            head_end = self._buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            lines = self._buffer[:head_end].decode("latin-1").split("\r\n")
            headers = dict(line.split(":", 1) for line in lines[1:] if ":" in line)
            length = int({k.lower(): v for k, v in headers.items()}.get("content-length", 0))
            if len(self._buffer) < head_end + 4 + length:
                return
            raw = self._buffer[head_end + 4 : head_end + 4 + length]
            self._buffer = self._buffer[head_end + 4 + length :]
            method, path, _ = lines[0].split(" ", 2)
            self._handle(method, path, json.loads(raw) if raw else {})

    def _handle(self, method: str, path: str, body: dict[str, Any]) -> None:
        server, writer = self._server, self._transport
        assert writer is not None
        assert server._loop is not None
        streamed = path == "/v1/completions" and body.get("stream")
        if not streamed or body.get("model") != server.served_model:
            status, answer = server.answer(method, path, body)
            data = json.dumps(answer).encode()
            head = f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
            head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
            writer.write(head.encode() + data)
            return
        server.completions += 1
        if server.stall_s:
            server._loop.call_later(server.stall_s, server.open_stream, writer, body)
        else:
            server.open_stream(writer, body)


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def _completion(model: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": "cmpl-paced",
        "object": "text_completion",
        "created": 0,
        "model": model,
        "choices": choices,
    }


def _prompt_tokens(body: dict[str, Any]) -> int:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        return len(prompt)
    if isinstance(prompt, list):
        prompt = " ".join(str(p) for p in prompt)
    return max(len(str(prompt or "").split()), 1)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@contextmanager
def running_paced_server(**kwargs: Any) -> Iterator[PacedServer]:
    """A started :class:`PacedServer`, stopped on exit."""
    server = PacedServer(**kwargs).start()
    try:
        yield server
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> None:
    """Serve in the foreground; prints ``PORT <n>`` once listening."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interval-ms", type=float, default=1.0)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--slots", type=int, default=None)
    args = parser.parse_args(argv)
    server = PacedServer(interval_s=args.interval_ms / 1000, slots=args.slots)

    async def serve() -> None:
        await server.listen(asyncio.get_running_loop(), args.port)
        print(f"PORT {server.port}", flush=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()

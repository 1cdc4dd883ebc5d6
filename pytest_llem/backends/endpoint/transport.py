"""HTTP and server-sent events for the endpoint backend, over aiohttp on one event loop.

The loop runs in a thread of its own (the support layer's
:class:`~pytest_llem.backends.support.event_loop.EventLoopThread`), so the backend's
synchronous API (``load``, ``generate``, ``submit``) hands it coroutines and waits on the
futures they return. Streamed responses are read as the bytes arrive; each event's
``time.perf_counter()`` is taken as soon as its bytes are split off the read, before it is
parsed. Connections are pooled and kept alive, at most ``endpoint.max_concurrency`` streams run
at once, and aiohttp is imported only when a transport starts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from pytest_llem.backends.endpoint.errors import (
    NAME,
    connection_error,
    error_message,
    status_error,
)
from pytest_llem.backends.support.event_loop import EventLoopThread
from pytest_llem.exceptions import (
    BackendConfigError,
    BackendError,
    BackendInferenceError,
    BackendTimeoutError,
)

if TYPE_CHECKING:
    import aiohttp

__all__ = ["EventHandler", "ServerAddress", "SseDecoder", "Transport"]

T = TypeVar("T")

logger = logging.getLogger("pytest_llem")

#: Called with each event's data and its arrival time; returns True to end the stream there.
EventHandler = Callable[[str, float], bool]

#: Most seconds to wait for the end of a response after its last event, so that its
#: connection can be reused; a server that keeps the stream open longer loses the connection.
_DRAIN_S = 0.1
#: Connections beyond the streams' own, for /tokenize calls made while every stream is open.
_SPARE_CONNECTIONS = 4
_JOIN_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class ServerAddress:
    """Where the server listens; API paths such as ``/v1/completions`` are joined to ``base``.

    Attributes:
        url: The URL as configured (``endpoint.url``).
        base: Scheme, host, port and any path prefix, without a trailing ``/v1``.
    """

    url: str
    base: str

    @classmethod
    def parse(cls, url: str) -> ServerAddress:
        """Check ``url`` and split off a trailing ``/v1``.

        Raises:
            BackendConfigError: ``url`` is not an http(s) URL with a host.
        """
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BackendConfigError(NAME, "endpoint.url", f"expected an http(s) URL, got {url!r}")
        return cls(url, url.rstrip("/").removesuffix("/v1"))

    def join(self, path: str) -> str:
        """The full URL of the API path ``path``."""
        return f"{self.base}{path}"


class SseDecoder:
    """Splits a byte stream into server-sent events, whatever the reads' boundaries.

    Only ``data:`` fields matter here; an event with several ``data:`` lines gives them joined
    by newlines, comments and other fields are skipped. Events are decoded from UTF-8 whole, so
    a character split across two reads is never cut.
    """

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, data: bytes) -> list[str]:
        """The data of each event that ``data`` completes."""
        buffer = self._pending + data if self._pending else data
        if b"\r" in buffer:
            # A CR at the very end may be the first half of a CRLF: wait for the next read.
            held = buffer.endswith(b"\r")
            if held:
                buffer = buffer[:-1]
            buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            if held:
                buffer += b"\r"
        *blocks, self._pending = buffer.split(b"\n\n")
        events: list[str] = []
        for block in blocks:
            event = _data_of(block)
            if event is not None:
                events.append(event)
        return events

    def flush(self) -> list[str]:
        """The data of an event left unterminated when the stream ended."""
        block, self._pending = self._pending.rstrip(b"\r\n"), b""
        event = _data_of(block) if block else None
        return [event] if event is not None else []


def _data_of(block: bytes) -> str | None:
    """The data of one event block (its lines without the blank line ending it)."""
    if block.startswith(b"data: ") and b"\n" not in block:
        return block[6:].decode("utf-8")  # the usual shape: one data line
    lines = [
        line[5:].removeprefix(b" ") for line in block.split(b"\n") if line.startswith(b"data:")
    ]
    return b"\n".join(lines).decode("utf-8") if lines else None


class Transport:
    """An aiohttp session on an event loop in a background thread.

    Args:
        server: Where the server listens.
        headers: Sent with every request (user agent, authorization).
        timeout_s: Most seconds to wait for the server's next bytes (``endpoint.timeout_s``).
        connect_timeout_s: Most seconds to wait for a connection (``endpoint.connect_timeout_s``).
        max_concurrency: Most streams open at once; more wait their turn in this client.
    """

    def __init__(
        self,
        server: ServerAddress,
        *,
        headers: dict[str, str],
        timeout_s: float,
        connect_timeout_s: float,
        max_concurrency: int,
    ) -> None:
        self.server = server
        self._headers = dict(headers)
        self._timeout_s = timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._max_concurrency = max_concurrency
        self._loop: EventLoopThread | None = None
        self._session: aiohttp.ClientSession | None = None
        self._slots: asyncio.Semaphore | None = None
        self._waiting: set[asyncio.Task[Any]] = set()
        self._running: set[asyncio.Task[Any]] = set()

    # -- the loop --------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the loop's thread and open the session (imports aiohttp)."""
        if self._loop is not None:
            return
        self._loop = EventLoopThread(name="llem-endpoint")
        try:
            self.call(self._open())
        except BaseException:
            self._stop_loop()
            raise

    async def _open(self) -> None:
        import aiohttp

        connector = aiohttp.TCPConnector(
            limit=self._max_concurrency + _SPARE_CONNECTIONS, keepalive_timeout=60
        )
        # No total limit: a long stream is fine while bytes keep coming (sock_read); no limit
        # on the wait for a pooled connection either (requests queue in the pool).
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self._connect_timeout_s, sock_read=self._timeout_s
        )
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=timeout, headers=self._headers, trust_env=False
        )
        self._slots = asyncio.Semaphore(self._max_concurrency)

    def call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run ``coroutine`` on the loop and wait for its result (never from the loop)."""
        return self._submit(coroutine).result()

    def spawn(self, make: Callable[[], Awaitable[T]]) -> Future[T]:
        """Run ``make()`` on the loop once one of the ``max_concurrency`` slots is free."""
        return self._submit(self._in_slot(make))

    def _submit(self, coroutine: Coroutine[Any, Any, T]) -> Future[T]:
        if self._loop is None:
            coroutine.close()
            raise BackendInferenceError(f"{NAME}: the client is not started (load() first)")
        return self._loop.submit(coroutine)

    async def _in_slot(self, make: Callable[[], Awaitable[T]]) -> T:
        task = asyncio.current_task()
        assert task is not None
        assert self._slots is not None
        self._waiting.add(task)
        try:
            async with self._slots:
                self._waiting.discard(task)
                self._running.add(task)
                return await make()
        finally:
            self._waiting.discard(task)
            self._running.discard(task)

    def close(self) -> None:
        """Drop the requests still waiting for a slot, let the running ones finish, close the
        session and stop the loop."""
        if self._loop is None:
            return
        try:
            self.call(self._shutdown())
        finally:
            self._stop_loop()

    async def _shutdown(self) -> None:
        waiting = list(self._waiting)
        for task in waiting:
            task.cancel()
        pending = [*waiting, *self._running]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
        self._session = None

    def _stop_loop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None:
            loop.stop(timeout_s=_JOIN_TIMEOUT_S)

    # -- requests --------------------------------------------------------------------------------

    async def fetch_json(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        missing_ok: bool = False,
    ) -> Any:
        """One JSON request; None when ``missing_ok`` and the server has no such endpoint.

        Raises:
            BackendError: the connection failed, timed out, or the server answered an error
                (mapped by status; see :func:`~.errors.status_error`).
        """
        async with self._exchange(method, path, body, stream=False) as response:
            raw = await response.read()
            status = response.status
        if missing_ok and status in (404, 405, 501):
            return None
        if status >= 400:
            raise status_error(status, error_message(raw), url=self.server.join(path))
        try:
            return json.loads(raw)
        except ValueError as e:
            if missing_ok:
                return None
            raise BackendInferenceError(
                f"{NAME}: {self.server.join(path)} sent invalid JSON"
            ) from e

    async def stream(self, path: str, body: dict[str, Any], on_event: EventHandler) -> None:
        """POST ``body`` and hand each server-sent event's data to ``on_event`` with its arrival
        time, until ``on_event`` returns True or the stream ends.

        Raises:
            BackendError: as :meth:`fetch_json`, and for a stream cut by the connection.
        """
        clock = time.perf_counter
        async with self._exchange("POST", path, body, stream=True) as response:
            if response.status >= 400:
                message = error_message(await response.read())
                raise status_error(response.status, message, url=self.server.join(path))
            decoder = SseDecoder()
            async for data in response.content.iter_any():
                for event in decoder.feed(data):
                    # Each event's clock is read before it is parsed: events that came in one
                    # read are a few microseconds apart, in the order they were sent.
                    if on_event(event, clock()):
                        await _drain(response)
                        return
            for event in decoder.flush():
                if on_event(event, clock()):
                    return

    @asynccontextmanager
    async def _exchange(
        self, method: str, path: str, body: dict[str, Any] | None, *, stream: bool
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """One request with its response head read; transport failures become BackendErrors."""
        import aiohttp

        session = self._session
        if session is None:
            raise BackendInferenceError(f"{NAME}: the client is closed")
        headers = {"Accept": "text/event-stream"} if stream else None
        data = json.dumps(body).encode() if body is not None else None
        if data is not None:
            headers = {**(headers or {}), "Content-Type": "application/json"}
        try:
            async with session.request(
                method, self.server.join(path), data=data, headers=headers
            ) as response:
                yield response
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, UnicodeDecodeError) as e:
            raise self._failure(path, e) from e

    def _failure(self, path: str, error: BaseException) -> BackendError:
        import aiohttp

        url = self.server.url
        if isinstance(error, aiohttp.ConnectionTimeoutError):
            return BackendTimeoutError(
                f"{NAME}: no connection to {url} within {self._connect_timeout_s:g} s "
                "(endpoint.connect_timeout_s)"
            )
        if isinstance(error, aiohttp.ClientConnectorError):
            return connection_error(url, error.os_error)
        if isinstance(error, (asyncio.TimeoutError, TimeoutError)):
            return BackendTimeoutError(
                f"{NAME}: {self.server.join(path)} sent nothing for {self._timeout_s:g} s "
                "(endpoint.timeout_s)"
            )
        if isinstance(error, ConnectionRefusedError):
            return connection_error(url, error)
        return BackendInferenceError(f"{NAME}: {self.server.join(path)} failed: {error!r}")


async def _drain(response: aiohttp.ClientResponse) -> None:
    """Read what is left of a finished stream (its last chunk), keeping the connection."""
    import aiohttp

    if response.content.at_eof():
        return
    try:
        await asyncio.wait_for(response.content.read(), _DRAIN_S)
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
        # Not an error of the completion, which has ended: the connection is closed instead.
        logger.debug("endpoint: a stream did not end after its last event: %r", e)

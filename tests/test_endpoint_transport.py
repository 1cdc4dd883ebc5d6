"""Tests of the endpoint backend's transport (aiohttp, server-sent events) against a loopback
server that streams at a fixed pace and misbehaves on demand (``tests/fakes/paced_server.py``)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from pytest_llem.backends.base import GenerateParams, Request
from pytest_llem.backends.endpoint import EndpointBackend
from pytest_llem.backends.endpoint.transport import ServerAddress, SseDecoder
from pytest_llem.config.models import CaseConfig
from pytest_llem.exceptions import BackendConfigError, BackendInferenceError, BackendTimeoutError
from tests.fakes.paced_server import TOKEN_ID, TOKEN_TEXT, PacedServer

FOUR = GenerateParams(max_new_tokens=4, min_new_tokens=4)


@pytest.fixture
def paced() -> Iterator[PacedServer]:
    server = PacedServer(interval_s=0.002).start()
    yield server
    server.stop()


@pytest.fixture
def connect(paced: PacedServer) -> Iterator[Any]:
    made: list[EndpointBackend] = []

    def make(**endpoint: Any) -> EndpointBackend:
        case = CaseConfig(backend="endpoint", endpoint={"url": paced.url, **endpoint})
        backend = EndpointBackend(case)
        made.append(backend)
        backend.load()
        return backend

    yield make
    for backend in made:
        backend.close()


def _requests(count: int) -> list[Request]:
    return [Request(index=i, prompt=f"prompt number {i}") for i in range(count)]


# -- server-sent events -------------------------------------------------------------------------

EVENTS = [{"text": "é", "n": 1}, {"text": "ü", "n": 2}]
WIRE = (
    ": a comment\r\n"
    + "".join(f"data: {json.dumps(e, ensure_ascii=False)}\r\n\r\n" for e in EVENTS)
    + "event: other\ndata: line one\ndata:line two\n\n"
    + "data: [DONE]\n\n"
).encode()


def test_events_split_anywhere_across_reads_decode_the_same():
    expected = [json.dumps(e, ensure_ascii=False) for e in EVENTS] + ["line one\nline two"]
    expected.append("[DONE]")
    for cut in range(1, len(WIRE)):
        for second in (cut, min(cut + 1, len(WIRE)), min(cut + 7, len(WIRE))):
            decoder = SseDecoder()
            events = decoder.feed(WIRE[:cut]) + decoder.feed(WIRE[cut:second])
            events += decoder.feed(WIRE[second:]) + decoder.flush()
            assert events == expected, (cut, second)


def test_an_unterminated_last_event_is_kept_at_the_end():
    decoder = SseDecoder()
    assert decoder.feed(b"data: 1\n\ndata: 2") == ["1"]
    assert decoder.flush() == ["2"]
    assert decoder.flush() == []


def test_the_server_address_drops_a_trailing_v1():
    assert ServerAddress.parse("http://h:1/v1/").join("/tokenize") == "http://h:1/tokenize"
    assert ServerAddress.parse("http://h:1/p").join("/v1/models") == "http://h:1/p/v1/models"
    with pytest.raises(BackendConfigError):
        ServerAddress.parse("ftp://h:1")


# -- against the paced server -------------------------------------------------------------------


def test_events_cut_across_reads_and_characters_give_whole_tokens(connect, paced):
    paced.split_events = True  # three pieces per event, one per step; CRLF line ends
    backend = connect()
    seen: list[tuple[int, int, float]] = []
    generations = backend.generate(_requests(3), params=FOUR, on_token=lambda *a: seen.append(a))
    for generation in generations:
        assert generation.output_token_ids == [TOKEN_ID] * 4
        assert generation.text == TOKEN_TEXT * 4
        assert generation.input_tokens == 3
        times = generation.token_times
        assert generation.issued_at < times[0] < times[1] < times[2] < times[3]
    assert sorted((i, t) for i, t, _ in seen) == sorted(
        (i, TOKEN_ID) for i in range(3) for _ in "1234"
    )


def test_a_connection_dropped_mid_stream_is_an_error_naming_the_url(connect, paced):
    backend = connect()
    paced.cut_after = 2
    with pytest.raises(BackendInferenceError) as raised:
        backend.generate(_requests(2), params=FOUR)
    assert f"{paced.url}/v1/completions" in str(raised.value)


def test_a_server_silent_past_the_timeout_is_a_timeout(connect, paced):
    backend = connect(timeout_s=0.2)
    paced.stall_s = 1.0
    with pytest.raises(
        BackendTimeoutError, match=r"sent nothing for 0\.2 s \(endpoint\.timeout_s\)"
    ):
        backend.generate(_requests(1), params=FOUR)


def test_streams_open_at_once_stay_within_max_concurrency(connect, paced):
    backend = connect(max_concurrency=3)
    # Long enough streams (40 ms) that the first three overlap on a busy machine too.
    params = GenerateParams(max_new_tokens=20, min_new_tokens=20)
    generations = backend.generate(_requests(10), params=params)
    assert [g.request_index for g in generations] == list(range(10))
    assert paced.most_open == 3


@pytest.mark.parametrize("late_end", [False, True])
def test_connections_are_kept_alive_between_requests(connect, paced, late_end, monkeypatch):
    from pytest_llem.backends.endpoint import transport

    monkeypatch.setattr(transport, "_DRAIN_S", 10.0)  # not the point here: a stalled machine
    paced.late_end = late_end  # the body's end comes a step after [DONE]: read it too
    backend = connect(max_concurrency=2)
    before = paced.connections
    backend.generate(_requests(8), params=FOUR)
    assert paced.connections - before <= 2  # eight streams over the pooled connections


def test_submit_before_load_and_after_close_is_an_error(paced):
    backend = EndpointBackend(CaseConfig(backend="endpoint", endpoint={"url": paced.url}))
    with pytest.raises(BackendInferenceError, match="before load"):
        backend.submit(_requests(1)[0], params=FOUR)
    backend.load()
    (generation,) = backend.generate(_requests(1), params=FOUR)
    assert generation.output_tokens == 4
    backend.close()
    with pytest.raises(BackendInferenceError, match="before load"):
        backend.generate(_requests(1), params=FOUR)


def test_close_lets_running_requests_finish_and_drops_waiting_ones(connect, paced):
    from concurrent.futures import CancelledError

    backend = connect(max_concurrency=1)
    # 0.6 s: the first request still runs when close() comes, on a busy machine too.
    params = GenerateParams(max_new_tokens=300, min_new_tokens=300)
    before = paced.completions
    futures = [backend.submit(request, params=params) for request in _requests(3)]
    deadline = time.monotonic() + 10
    while paced.completions == before and time.monotonic() < deadline:
        time.sleep(0.005)  # until the first request is on the server
    backend.close()
    assert futures[0].result(timeout=10).output_tokens == 300
    for future in futures[1:]:
        with pytest.raises(CancelledError):
            future.result(timeout=10)

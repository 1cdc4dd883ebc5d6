"""Tests of the endpoint backend against a real HTTP server on 127.0.0.1 (``tests/fakes``) that
serves the built-in tiny model through the transformers backend."""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_llem.backends.base import GenerateParams, Request, SchedulingBackend
from pytest_llem.backends.endpoint import COUNTING_LABELS, EndpointBackend
from pytest_llem.backends.endpoint.stream import StreamedCompletion as _Stream
from pytest_llem.backends.endpoint.stream import parse_event as _json_event
from pytest_llem.backends.endpoint.stream import spread_times as _spread
from pytest_llem.config.models import CaseConfig
from pytest_llem.exceptions import (
    BackendConfigError,
    BackendInferenceError,
    BackendInitializationError,
    BackendNotAvailableError,
    BackendTimeoutError,
    RetryableError,
)
from pytest_llem.options import build_options

pytest.importorskip("torch")
pytest.importorskip("transformers")

from tests.fakes.openai_server import FakeOpenAIServer

PROMPTS = ["Hi", "What is the capital of France?", "Explain why the sky is blue."]
FIXED = GenerateParams(max_new_tokens=8, min_new_tokens=8)


@pytest.fixture(scope="module")
def server(tiny_model: Path) -> Iterator[FakeOpenAIServer]:
    fake = FakeOpenAIServer(tiny_model).start()
    yield fake
    fake.stop()


@pytest.fixture
def fake(server: FakeOpenAIServer) -> Iterator[FakeOpenAIServer]:
    server.reset()
    yield server
    server.reset()


@pytest.fixture
def connect(fake: FakeOpenAIServer) -> Iterator[Any]:
    """Make and load an endpoint backend for the fake server (closed afterwards)."""
    made: list[EndpointBackend] = []

    def make(load: bool = True, **endpoint: Any) -> EndpointBackend:
        case = CaseConfig(backend="endpoint", endpoint={"url": fake.url, **endpoint})
        backend = EndpointBackend(case)
        made.append(backend)
        if load:
            backend.load()
        return backend

    yield make
    for backend in made:
        backend.close()


def _requests(texts: list[str]) -> list[Request]:
    return [Request(index=i, prompt=text) for i, text in enumerate(texts)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- generation ---------------------------------------------------------------------------------


def test_generate_streams_the_servers_token_ids_with_fixed_lengths(connect, fake):
    backend = connect()
    assert isinstance(backend, SchedulingBackend)
    assert backend.capabilities.scheduling
    counts = backend.count_tokens(PROMPTS)
    before = time.perf_counter()
    generations = backend.generate(_requests(PROMPTS), params=FIXED)
    after = time.perf_counter()
    for generation, text, count in zip(generations, PROMPTS, counts, strict=True):
        expected, prompt_tokens = fake.generate(text, FIXED, None)
        assert generation.output_token_ids == expected  # greedy: the same ids as the engine
        assert generation.output_tokens == 8
        assert generation.input_tokens == prompt_tokens == count
        times = generation.token_times
        assert len(times) == 8
        assert times == sorted(times)
        assert before <= generation.issued_at <= times[0] <= times[-1] <= after
        assert generation.text == fake.decode(expected)
    info = backend.load()
    assert info.name == "endpoint"
    assert info.version == "fake-openai-server 1.0"
    assert info.extra["token_counting"] == COUNTING_LABELS["ids"]
    assert info.extra["fixed_lengths"].startswith("min_tokens and ignore_eos are sent")
    payload = fake.payloads[-1]
    assert payload["stream"] is True
    assert payload["stream_options"] == {"include_usage": True}
    assert (payload["min_tokens"], payload["ignore_eos"], payload["max_tokens"]) == (8, True, 8)
    assert payload["temperature"] == 0.0


def test_tokens_of_one_chunk_share_its_arrival_time(connect, fake):
    backend = connect()
    fake.tokens_per_chunk = 3
    (generation,) = backend.generate(_requests(["Hi"]), params=FIXED)
    times = generation.token_times
    assert len(times) == 8
    assert times[0] == times[1] == times[2] < times[3] == times[4] == times[5] < times[6]
    assert times[6] == times[7]


def test_on_token_reports_each_token_as_it_arrives(connect):
    backend = connect()
    seen: list[tuple[int, int, float]] = []
    (generation,) = backend.generate(
        [Request(index=5, prompt="Hi")], params=FIXED, on_token=lambda *a: seen.append(a)
    )
    assert [(i, t) for i, t, _ in seen] == [(5, t) for t in generation.output_token_ids]
    assert [at for _, _, at in seen] == generation.token_times


def test_usage_counts_tokens_when_the_server_sends_no_ids(connect, fake):
    fake.send_token_ids = False
    backend = connect()
    assert backend.load().extra["token_counting"] == COUNTING_LABELS["usage"]
    fake.tokens_per_chunk = 2
    (generation,) = backend.generate(_requests(["Hi"]), params=FIXED)
    assert generation.output_token_ids == [-1] * 8
    assert generation.input_tokens == backend.count_tokens(["Hi"])[0]
    times = generation.token_times
    assert times == sorted(times)
    assert len(set(times)) <= 4  # four chunks (at most: one may carry only special tokens)


def test_chunk_counting_is_labelled_when_neither_ids_nor_usage_come_back(connect, fake):
    fake.send_token_ids = False
    fake.send_usage = False
    backend = connect()
    info = backend.load()
    assert info.extra["token_counting"] == COUNTING_LABELS["chunks"]
    assert "counted from stream chunks, not ids" in info.extra["token_counting"]
    assert info.extra["usage_in_stream"] == "false"
    (generation,) = backend.generate(_requests(["Hi"]), params=FIXED)
    assert 1 <= generation.output_tokens <= 8
    assert set(generation.output_token_ids) == {-1}
    assert len(generation.token_times) == generation.output_tokens
    # The prompt length comes from the tokenizer, as the server gave no usage.
    assert generation.input_tokens == backend.count_tokens(["Hi"])[0]


def test_a_response_without_ids_falls_back_and_says_so(connect, fake):
    backend = connect()
    fake.send_token_ids = False
    (generation,) = backend.generate(_requests(["Hi"]), params=FIXED)
    assert generation.output_tokens == 8
    info = backend.load()
    assert info.extra["token_counting_fallback"] == COUNTING_LABELS["usage"]


def test_token_id_prompts_are_sent_as_ids_and_truncated(connect, fake):
    backend = connect()
    ids = tuple(range(10, 30))
    params = GenerateParams(max_new_tokens=4, min_new_tokens=4, max_input_tokens=6)
    (generation,) = backend.generate(
        [Request(index=0, prompt="<ids>", token_ids=ids)], params=params
    )
    assert fake.payloads[-1]["prompt"] == list(ids[:6])
    assert generation.input_tokens == 6
    long_text = "word " * 50
    (count,) = backend.count_tokens([long_text])
    assert count > 6
    (generation,) = backend.generate([Request(index=0, prompt=long_text)], params=params)
    assert fake.payloads[-1]["prompt"] == fake.tokenize(long_text)[:6]
    assert generation.input_tokens == 6


def test_sampling_settings_reach_the_server(connect, fake):
    backend = connect()
    case = CaseConfig(sampling="creative", seed=7)
    params = GenerateParams(max_new_tokens=4, sampling=case.sampling, seed=7)
    backend.generate([Request(index=2, prompt="Hi")], params=params)
    payload = fake.payloads[-1]
    assert (payload["temperature"], payload["top_p"], payload["top_k"]) == (0.9, 0.95, 50)
    assert payload["seed"] == 9
    assert "min_tokens" not in payload
    assert "ignore_eos" not in payload


def test_submit_starts_each_request_on_its_own_and_returns_a_future(connect, fake):
    backend = connect(max_concurrency=2)
    futures = [backend.submit(request, params=FIXED) for request in _requests([*PROMPTS, "More"])]
    generations = [future.result(timeout=60) for future in futures]
    assert [g.request_index for g in generations] == [0, 1, 2, 3]
    assert all(g.output_tokens == 8 for g in generations)
    assert fake.completions >= 4


def test_the_server_scenario_submits_to_the_endpoint(connect):
    from pytest_llem.harness.scenarios import build_workload

    backend = connect()
    config = CaseConfig(
        backend="endpoint",
        scenario="server",
        max_new_tokens=4,
        min_new_tokens=4,
        traffic={"rate": 50.0, "num_requests": 4},
    )
    workload = build_workload(
        "server",
        backend=backend,
        requests=_requests([*PROMPTS, "More"]),
        params=GenerateParams.from_case(config),
        config=config,
    )
    assert any("engine's own scheduler" in note for note in workload.notes)
    run = workload(lambda _name: None)
    assert [g.output_tokens for g in run.generations] == [4, 4, 4, 4]


def test_a_server_window_is_attributed_from_the_chunk_arrivals(connect):
    from pytest_llem.harness.runner import run_case
    from tests.fakes.fake_meter import FakeMeter

    backend = connect()
    config = CaseConfig(
        backend="endpoint", scenario="server", max_new_tokens=4, min_new_tokens=4, warmup=0,
        repeat=1, traffic={"rate": 50.0, "num_requests": 4},
    )  # fmt: skip
    meter = FakeMeter("steady", time.perf_counter, power_w={"gpu": 100.0})
    measured = run_case(backend=backend, meters=[meter], config=config, prompts=PROMPTS)
    (rep,) = measured.repetitions
    assert rep.attribution is not None
    assert rep.attribution.timeline == "client"  # only what a client sees
    assert len(rep.per_request) == 4 * rep.rounds
    assert rep.energy_j is not None
    assert rep.unattributed_energy_j is not None
    books = sum(r.energy_j or 0.0 for r in rep.per_request) + rep.unattributed_energy_j
    assert books == pytest.approx(rep.energy_j, rel=1e-9)


# -- servers without the extensions -------------------------------------------------------------


def test_a_strict_server_gets_requests_without_the_extensions(connect, fake):
    fake.accepted_extensions = frozenset()
    backend = connect()
    info = backend.load()
    assert info.extra["token_counting"] == COUNTING_LABELS["usage"]
    assert "rejected min_tokens/ignore_eos" in info.extra["fixed_lengths"]
    (generation,) = backend.generate(_requests(["Hi"]), params=FIXED)
    payload = fake.payloads[-1]
    assert not {"min_tokens", "ignore_eos", "return_token_ids"} & set(payload)
    assert 1 <= generation.output_tokens <= 8


def test_shorter_outputs_than_asked_are_counted_as_returned(connect, fake, caplog):
    fake.ignore_extensions = True
    backend = connect()
    fake.output_cap = 5
    with caplog.at_level(logging.WARNING, logger="pytest_llem"):
        (generation,) = backend.generate(_requests(["Hi"]), params=FIXED)
    assert generation.output_tokens <= 5
    assert len(generation.token_times) == generation.output_tokens
    assert "counted as returned" in caplog.text


def test_a_token_source_the_server_cannot_provide_is_a_config_error(connect, fake):
    fake.send_token_ids = False
    with pytest.raises(BackendConfigError) as raised:
        connect(token_source="return_token_ids")
    assert raised.value.param == "endpoint.token_source"


# -- tokens -------------------------------------------------------------------------------------


def test_counts_by_tokenize_match_the_local_tokenizer(connect, fake):
    remote = connect()
    assert remote.load().extra["tokenizer"] == "server /tokenize"
    remote_counts = remote.count_tokens(PROMPTS)
    fake.tokenize_enabled = False
    local = connect()
    assert local.load().extra["tokenizer"] == "local tokenizer"
    assert local.count_tokens(PROMPTS) == remote_counts
    assert local.count_tokens(PROMPTS) == [len(fake.tokenize(text)) for text in PROMPTS]
    vocabulary = local.vocabulary()
    assert vocabulary.size == 1024
    assert vocabulary.special_ids


def test_no_tokenizer_anywhere_is_a_clear_config_error(fake, tiny_model):
    fake.tokenize_enabled = False
    fake.list_root = False
    fake.served_model = "acme/unknown-model"
    case = CaseConfig(backend="endpoint", model="acme/unknown-model", endpoint={"url": fake.url})
    backend = EndpointBackend(case)
    try:
        backend.load()
        with pytest.raises(BackendConfigError, match="cannot tokenize") as raised:
            backend.count_tokens(["Hi"])
        assert raised.value.param == "model"
    finally:
        backend.close()
        fake.served_model = "llem-tiny"


# -- errors -------------------------------------------------------------------------------------


def test_no_url_skips_with_how_to_start_a_server():
    with pytest.raises(BackendNotAvailableError, match="--llem-endpoint"):
        EndpointBackend(CaseConfig(backend="endpoint")).load()


def test_connection_refused_names_the_url():
    url = f"http://127.0.0.1:{_free_port()}"
    backend = EndpointBackend(CaseConfig(backend="endpoint", endpoint={"url": url}))
    with pytest.raises(BackendInitializationError, match="connection refused") as raised:
        backend.load()
    assert url in str(raised.value)


def test_a_model_the_server_does_not_serve(fake):
    case = CaseConfig(backend="endpoint", model="other", endpoint={"url": fake.url})
    with pytest.raises(BackendConfigError, match="'llem-tiny'") as raised:
        EndpointBackend(case).load()
    assert raised.value.param == "endpoint.served_model"


def test_the_api_key_comes_from_the_environment_and_is_not_recorded(
    fake, monkeypatch: pytest.MonkeyPatch
):
    fake.api_key = "sekrit-123"
    try:
        case = CaseConfig(
            backend="endpoint", endpoint={"url": fake.url, "api_key_env": "LLEM_TEST_KEY"}
        )
        monkeypatch.delenv("LLEM_TEST_KEY", raising=False)
        with pytest.raises(BackendConfigError, match="HTTP 401") as raised:
            EndpointBackend(case).load()
        assert raised.value.param == "endpoint.api_key_env"
        monkeypatch.setenv("LLEM_TEST_KEY", "sekrit-123")
        backend = EndpointBackend(case)
        info = backend.load()
        backend.close()
        assert info.extra["api_key"] == "from $LLEM_TEST_KEY"
        assert "sekrit" not in json.dumps(vars(info), default=str)
        assert "sekrit" not in json.dumps(case.model_dump(mode="json"))
    finally:
        fake.api_key = None


@pytest.mark.parametrize(
    ("status", "message", "error", "param"),
    [
        (400, "max_tokens is too large", BackendConfigError, "request"),
        (422, "prompt: field required", BackendConfigError, "request"),
        (500, "engine crashed", BackendInferenceError, None),
        (500, "CUDA out of memory. Tried to allocate 2.00 GiB", RetryableError, None),
        (503, "the engine is overloaded", RetryableError, None),
    ],
)
def test_http_errors_map_to_the_hierarchy_with_the_servers_message(
    connect, fake, status, message, error, param
):
    backend = connect()
    fake.fail_next = (status, message)
    with pytest.raises(error, match=f"HTTP {status}") as raised:
        backend.generate(_requests(["Hi"]), params=FIXED)
    assert message in str(raised.value)
    if param is not None:
        assert raised.value.param == param


def test_logprobs_entries_give_ids_or_a_count():
    stream = _Stream()
    chunk = {"text": "ab", "logprobs": {"tokens": ["token_id:5", "token_id:7"]}}
    stream.add({"choices": [chunk]}, 1.0)
    stream.add({"choices": [{"text": "c", "logprobs": {"tokens": ["token_id:9"]}}]}, 2.0)
    assert stream.available() == ["logprob_ids", "chunks"]
    assert stream.tokens("logprob_ids") == ([5, 7, 9], [1.0, 1.0, 2.0])
    plain = _Stream()
    plain.add({"choices": [{"text": "ab", "logprobs": {"tokens": ["a", "b"]}}]}, 3.0)
    assert plain.available() == ["logprobs", "chunks"]
    assert plain.tokens("logprobs") == ([-1, -1], [3.0, 3.0])


def test_usage_counts_spread_over_the_chunks_first_to_first_last_to_last():
    assert _spread(5, [1.0, 2.0, 3.0], None) == [1.0, 1.0, 2.0, 3.0, 3.0]
    assert _spread(2, [1.0, 2.0, 3.0], None) == [1.0, 3.0]
    assert _spread(1, [1.0, 2.0], None) == [2.0]
    assert _spread(3, [], 4.0) == [4.0, 4.0, 4.0]


def test_an_error_event_inside_the_stream_is_an_error():
    with pytest.raises(RetryableError):
        _json_event(json.dumps({"error": {"message": "out of memory", "code": 500}}), "u")
    with pytest.raises(BackendInferenceError, match="invalid JSON"):
        _json_event("{not json", "u")


def test_a_stalled_server_times_out(connect, fake):
    backend = connect(timeout_s=0.3)
    fake.stall_s = 1.5
    with pytest.raises(BackendTimeoutError, match=r"endpoint\.timeout_s"):
        backend.generate(_requests(["Hi"]), params=FIXED)


# -- options ------------------------------------------------------------------------------------


def _layers(cli: dict[str, Any], ini: dict[str, Any] | None = None) -> tuple[dict, dict]:
    options = build_options(cli=cli, ini=ini or {}, invocation_dir=Path.cwd())
    return options.cli_layer, options.ini_layer


def test_the_endpoint_option_selects_the_endpoint_backend():
    cli, _ = _layers({"endpoint": "http://127.0.0.1:8000/v1/"})
    assert cli == {"backend": "endpoint", "endpoint": {"url": "http://127.0.0.1:8000/v1"}}
    cli, _ = _layers({"endpoint": "http://127.0.0.1:8000", "backend": "transformers"})
    assert cli["backend"] == "transformers"
    cli, ini = _layers({}, {"endpoint": "http://127.0.0.1:8000"})
    assert "backend" not in cli
    assert ini["backend"] == "endpoint"
    cli, _ = _layers({"endpoint": "http://127.0.0.1:8000", "backend": "transformers,endpoint"})
    assert "backend" not in cli  # a sweep over engines stays a sweep


def test_a_bad_endpoint_url_is_a_configuration_error():
    from pytest_llem.exceptions import ConfigurationError

    with pytest.raises(ConfigurationError, match="--llem-endpoint"):
        build_options(cli={"endpoint": "ftp://x"}, ini={}, invocation_dir=Path.cwd())
    with pytest.raises(ConfigurationError, match="credentials"):
        build_options(cli={"endpoint": "http://me:pw@host:1"}, ini={}, invocation_dir=Path.cwd())


# -- through pytest -----------------------------------------------------------------------------

RUN = """
import pytest

@pytest.mark.llem(max_new_tokens=4, min_new_tokens=4, num_prompts=4, batch_size=2)
def test_tiny(llem):
    llem.run()
"""


@pytest.mark.slow
def test_a_run_against_the_endpoint_records_backend_endpoint(
    pytester: pytest.Pytester, fake, tiny_model
):
    pytester.makepyfile(RUN)
    quick = ["--llem-warmup=0", "--llem-repeat=1", "--llem-meter=none", "-p", "no:cacheprovider"]
    pytester.runpytest(*quick).assert_outcomes(passed=1)
    record_path = pytester.path / "reports" / "llem-report.json"
    (local,) = json.loads(record_path.read_text())["cases"]
    pytester.runpytest(*quick, f"--llem-endpoint={fake.url}").assert_outcomes(passed=1)
    (case,) = json.loads(record_path.read_text())["cases"]
    assert case["outcome"] == "passed"
    assert case["backend"] == "endpoint"
    assert case["params"]["endpoint"]["url"] == fake.url
    assert case["backend_info"]["extra"]["token_counting"] == COUNTING_LABELS["ids"]
    assert [rep["output_tokens"] for rep in case["repetitions"]] == [16]
    assert set(case["metrics"]) == set(local["metrics"])

"""The backend contract: every backend this environment can run behaves the same way.

Each backend of ``tests/contract_backends.py`` (transformers always, TensorRT-LLM's fake, vLLM
where it is installed, the endpoint backend against the test server) is loaded once on llem-tiny
and checked for what the harness relies on: one Generation per request in order, token counts
from ids, fixed output lengths honoured, token times one per token, non-decreasing and inside
the call, errors inside the ``LlemError`` hierarchy, a loaded model reused across calls, and a
clean shutdown after which the backend loads again.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_llem.backends.base import (
    Backend,
    GenerateParams,
    Generation,
    Request,
    SchedulingBackend,
)
from pytest_llem.exceptions import LlemError
from tests.contract_backends import CONTRACT_BACKENDS, KNOWN_GAPS, ContractEnv

__all__: list[str] = []

PROMPTS = [
    "Hi",
    "What is the capital of France?",
    "Explain, in a few careful sentences, why the sky looks blue at noon and red at dusk.",
]
FIXED = GenerateParams(max_new_tokens=8, min_new_tokens=8)


def _teardown(backend: Backend | None, env: ContractEnv) -> None:
    try:
        if backend is not None:
            backend.close()
    finally:
        for cleanup in reversed(env.cleanups):
            cleanup()


@pytest.fixture(scope="module", params=list(CONTRACT_BACKENDS))
def contract(request: pytest.FixtureRequest, tiny_model: Path) -> Iterator[Backend]:
    """One loaded backend per entry of the registry, shared by this module's tests."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        env = ContractEnv(tiny_model, monkeypatch)
        backend: Backend | None = None
        try:
            backend = CONTRACT_BACKENDS[request.param](env)
            backend.load()
            yield backend
        finally:
            _teardown(backend, env)


@pytest.fixture
def fresh(contract: Backend, request: pytest.FixtureRequest, tiny_model: Path) -> Iterator[Backend]:
    """A second, unloaded backend of the same kind."""
    name = request.node.callspec.params["contract"]
    with pytest.MonkeyPatch.context() as monkeypatch:
        env = ContractEnv(tiny_model, monkeypatch)
        backend: Backend | None = None
        try:
            backend = CONTRACT_BACKENDS[name](env)
            yield backend
        finally:
            _teardown(backend, env)


def _known_gap(request: pytest.FixtureRequest, check: str) -> None:
    reason = KNOWN_GAPS.get((request.node.callspec.params["contract"], check))
    if reason is not None:
        request.applymarker(pytest.mark.xfail(reason=reason, strict=True))


def _requests(first_index: int = 0) -> list[Request]:
    return [Request(index=first_index + i, prompt=p) for i, p in enumerate(PROMPTS)]


def _timed(
    backend: Backend, requests: list[Request], params: GenerateParams
) -> tuple[list[Generation], float, float]:
    before = time.perf_counter()
    out = backend.generate(requests, params=params)
    return out, before, time.perf_counter()


def test_one_generation_per_request_in_order(contract: Backend) -> None:
    out = contract.generate(_requests(first_index=7), params=FIXED)
    assert [g.request_index for g in out] == [7, 8, 9]
    assert contract.generate([], params=FIXED) == []


def test_counts_come_from_ids_and_fixed_lengths_hold(contract: Backend) -> None:
    counted = contract.count_tokens(PROMPTS)  # the harness counts prompts before it runs them
    out = contract.generate(_requests(), params=FIXED)
    assert [g.input_tokens for g in out] == counted
    for g in out:
        assert g.output_tokens == len(g.output_token_ids) == FIXED.max_new_tokens
        assert all(isinstance(token, int) for token in g.output_token_ids)


def test_per_request_output_lengths_hold(contract: Backend) -> None:
    lengths = [3, 7, 5]
    requests = [
        Request(index=i, prompt=p, output_tokens=n)
        for i, (p, n) in enumerate(zip(PROMPTS, lengths, strict=True))
    ]
    calls: list[int] = []
    out = contract.generate(
        requests, params=GenerateParams(max_new_tokens=4), on_token=lambda i, t, at: calls.append(i)
    )
    assert [g.output_tokens for g in out] == lengths
    assert [len(g.token_times) for g in out] == lengths
    assert [calls.count(i) for i in range(3)] == lengths  # no token reported past a row's end


def test_unfixed_lengths_stay_within_the_maximum(contract: Backend) -> None:
    out = contract.generate(_requests(), params=GenerateParams(max_new_tokens=6))
    for g in out:
        assert 1 <= g.output_tokens <= 6
        assert len(g.token_times) == g.output_tokens


def test_token_times_are_monotone_and_inside_the_call(contract: Backend) -> None:
    out, before, after = _timed(contract, _requests(), FIXED)
    for g in out:
        assert len(g.token_times) == g.output_tokens
        assert g.token_times == sorted(g.token_times)
        assert before <= g.issued_at <= g.token_times[0]
        assert g.token_times[-1] <= after


def test_on_token_reports_every_token_with_its_time(contract: Backend) -> None:
    calls: list[tuple[int, int, float]] = []
    out = contract.generate(
        _requests(first_index=3),
        params=FIXED,
        on_token=lambda index, token, at: calls.append((index, token, at)),
    )
    for g in out:
        mine = [(token, at) for index, token, at in calls if index == g.request_index]
        assert mine == list(zip(g.output_token_ids, g.token_times, strict=True))


def test_prompts_are_truncated_to_max_input_tokens(contract: Backend) -> None:
    long = " ".join(["word"] * 100)
    assert contract.count_tokens([long])[0] > 12  # counted first, as the harness does
    (g,) = contract.generate(
        [Request(0, long)], params=GenerateParams(max_new_tokens=2, max_input_tokens=12)
    )
    assert g.input_tokens == 12


def test_a_bad_request_is_an_llem_error_and_the_backend_goes_on(
    contract: Backend, request: pytest.FixtureRequest
) -> None:
    _known_gap(request, "bad-request")
    outside = contract.vocabulary().size + 5
    with pytest.raises(LlemError):
        contract.generate([Request(0, "bad ids", token_ids=(5, outside))], params=FIXED)
    (g,) = contract.generate([Request(1, "fine")], params=FIXED)
    assert g.output_tokens == FIXED.max_new_tokens


def test_token_id_prompts_are_fed_as_given(contract: Backend) -> None:
    vocabulary = contract.vocabulary()
    ids = tuple(t for t in range(10, 40) if t not in vocabulary.special_ids)[:9]
    (g,) = contract.generate([Request(0, "ids", token_ids=ids)], params=FIXED)
    assert g.input_tokens == len(ids)
    assert g.output_tokens == FIXED.max_new_tokens


def test_submit_goes_to_the_engines_scheduler(contract: Backend) -> None:
    if not (contract.capabilities.scheduling and isinstance(contract, SchedulingBackend)):
        pytest.skip(f"{contract.name} has no scheduler of its own (no submit)")
    futures = [contract.submit(r, params=FIXED) for r in _requests(first_index=20)]
    results = [future.result(timeout=120) for future in futures]
    assert [g.request_index for g in results] == [20, 21, 22]
    assert [g.output_tokens for g in results] == [FIXED.max_new_tokens] * 3
    for g in results:
        assert g.token_times == sorted(g.token_times)
        assert g.issued_at <= g.token_times[0]


def test_the_loaded_model_is_reused(contract: Backend) -> None:
    info = contract.load()
    assert contract.load() == info
    assert contract.generate(_requests(), params=FIXED)
    assert contract.load() == info


def test_close_is_idempotent_and_load_works_again(contract: Backend) -> None:
    contract.close()
    contract.close()
    with pytest.raises(LlemError):
        contract.generate(_requests(), params=FIXED)
    info = contract.load()  # the module's later tests use it loaded again
    assert info.name == contract.name
    assert [g.output_tokens for g in contract.generate(_requests(), params=FIXED)] == [8, 8, 8]


def test_use_before_load_is_an_llem_error(fresh: Backend) -> None:
    with pytest.raises(LlemError):
        fresh.generate(_requests(), params=FIXED)
    fresh.close()  # closing a backend that never loaded is fine

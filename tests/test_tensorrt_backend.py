"""Tests of the TensorRT-LLM backend's adapter logic against a fake ``tensorrt_llm``.

TensorRT-LLM cannot be installed here (see /work/shared/ENVIRONMENT.md), so every test drives the
backend through ``tests/fakes/fake_tensorrt_llm.py``: a package with the documented API's shape,
an in-flight batching scheduler that takes real time per step and llem-tiny's real tokenizer.
What these tests cannot show is that the real engine behaves like the fake.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_llem.backends.base import Backend, GenerateParams, Request, SchedulingBackend
from pytest_llem.backends.tensorrt import ENGINE_CACHE_SUBDIR, QUANT_ALGOS, TensorRTBackend
from pytest_llem.config.models import CaseConfig, SamplingConfig
from pytest_llem.exceptions import (
    BackendConfigError,
    BackendInferenceError,
    BackendNotAvailableError,
    ModelLoadError,
    RetryableError,
)
from pytest_llem.harness.case import is_skip_error as _is_missing_hardware_or_engine
from tests.fakes.fake_tensorrt_llm import FakeTensorRT, install

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

__all__: list[str] = []

PROMPTS = [
    "Hi",
    "What is the capital of France?",
    "Explain, in a few careful sentences, why the sky looks blue at noon and red at dusk.",
    "Write a haiku about rain on a tin roof.",
]
EOS = 2  # llem-tiny's </s>


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeTensorRT:
    return install(monkeypatch)


def _case(tiny_model: Path, **overrides: Any) -> CaseConfig:
    return CaseConfig(**{"backend": "tensorrt", "model": str(tiny_model), **overrides})


@pytest.fixture
def backend(fake: FakeTensorRT, tiny_model: Path) -> Iterator[TensorRTBackend]:
    loaded = TensorRTBackend(_case(tiny_model))
    loaded.load()
    yield loaded
    loaded.close()


def _requests(prompts: list[str] = PROMPTS, first_index: int = 0) -> list[Request]:
    return [Request(index=first_index + i, prompt=p) for i, p in enumerate(prompts)]


def _spy_sampling(fake: FakeTensorRT, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Record what every generate_async call of the current LLM receives."""
    seen: list[Any] = []
    llm = fake.llm
    original = llm.generate_async

    def spy(inputs: Any, sampling_params: Any = None, **kwargs: Any) -> Any:
        seen.append((inputs, sampling_params, kwargs))
        return original(inputs, sampling_params, **kwargs)

    monkeypatch.setattr(llm, "generate_async", spy)
    return seen


# -- protocol and loading ---------------------------------------------------------------------


def test_satisfies_the_scheduling_protocol(backend: TensorRTBackend) -> None:
    assert isinstance(backend, Backend)
    assert isinstance(backend, SchedulingBackend)
    assert backend.name == "tensorrt"
    assert backend.capabilities.scheduling
    assert backend.capabilities.streaming
    assert backend.capabilities.devices == ("cuda",)


def test_load_reports_info(backend: TensorRTBackend, tiny_model: Path) -> None:
    info = backend.load()
    assert backend.load() is info  # a second call does not start a second engine
    assert (info.name, info.version, info.device) == ("tensorrt", "1.2.0+fake", "cuda")
    assert info.dtype == "float32"  # 'auto' is the checkpoint's own dtype
    assert info.model_path == str(tiny_model.resolve())
    # Read from the safetensors headers: the same counts transformers reports for llem-tiny.
    layer = 4 * 128 * 128 + 3 * 128 * 256 + 2 * 128
    assert info.parameters == 1024 * 128 + 2 * layer + 128 + 1024 * 128
    assert info.non_embedding_parameters == info.parameters - 1024 * 128
    assert info.extra["tensorrt_backend"] == "pytorch"
    assert info.extra["max_batch_size"] == "engine default"
    assert info.load_seconds is not None


def test_pytorch_runtime_gets_every_setting(
    fake: FakeTensorRT, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.gpus = 8
    case = _case(
        tiny_model,
        dtype="bfloat16",
        tensorrt={
            "max_batch_size": 16,
            "max_num_tokens": 4096,
            "max_seq_len": 1024,
            "tensor_parallel_size": 2,
            "pipeline_parallel_size": 2,
            "kv_cache_free_gpu_memory_fraction": 0.5,
        },
    )
    loaded = TensorRTBackend(case)
    info = loaded.load()
    try:
        llm = fake.llm
        assert type(llm) is fake.modules["tensorrt_llm"].LLM
        assert llm.model == str(tiny_model)
        kv = llm.kwargs.pop("kv_cache_config")
        assert isinstance(kv, fake.modules["tensorrt_llm.llmapi"].KvCacheConfig)
        assert kv.free_gpu_memory_fraction == 0.5
        assert llm.kwargs == {
            "backend": "pytorch",
            "dtype": "bfloat16",
            "tensor_parallel_size": 2,
            "pipeline_parallel_size": 2,
            "max_batch_size": 16,
            "max_num_tokens": 4096,
            "max_seq_len": 1024,
            "trust_remote_code": False,
        }
        assert info.dtype == "bfloat16"
        assert info.extra["tensor_parallel_size"] == "2"
        assert info.extra["kv_cache_free_gpu_memory_fraction"] == "0.5"
    finally:
        loaded.close()


def test_unset_limits_keep_the_engine_defaults(
    backend: TensorRTBackend, fake: FakeTensorRT
) -> None:
    assert set(fake.llm.kwargs) == {
        "backend",
        "dtype",
        "tensor_parallel_size",
        "pipeline_parallel_size",
        "trust_remote_code",
    }
    assert fake.llm.kwargs["dtype"] == "auto"


@pytest.mark.parametrize(("quantization", "algo"), sorted(QUANT_ALGOS.items()))
def test_trt_runtime_maps_quantization_to_quant_algo(
    fake: FakeTensorRT, tiny_model: Path, quantization: str, algo: str
) -> None:
    loaded = TensorRTBackend(
        _case(tiny_model, tensorrt={"backend": "trt", "quantization": quantization})
    )
    loaded.load()
    try:
        llm = fake.llm
        assert type(llm) is fake.modules["tensorrt_llm._tensorrt_engine"].LLM
        assert "backend" not in llm.kwargs
        quant = llm.kwargs["quant_config"]
        assert quant.quant_algo is fake.modules["tensorrt_llm.llmapi"].QuantAlgo[algo]
    finally:
        loaded.close()


def test_quantization_and_engine_cache_need_the_trt_runtime(tiny_model: Path) -> None:
    with pytest.raises(ValueError, match=r"needs tensorrt\.backend=trt"):
        _case(tiny_model, tensorrt={"quantization": "fp8"})
    with pytest.raises(ValueError, match="engine_cache_dir keeps built TensorRT engines"):
        _case(tiny_model, tensorrt={"engine_cache_dir": "/tmp/engines"})
    with pytest.raises(ValueError, match="runs only on NVIDIA GPUs"):
        _case(tiny_model, device="cpu")


def test_engine_cache_dir_is_built_once_and_reused(
    fake: FakeTensorRT, tiny_model: Path, tmp_path: Path
) -> None:
    messages: list[str] = []
    case = _case(tiny_model, tensorrt={"backend": "trt", "engine_cache_dir": str(tmp_path)})
    first = TensorRTBackend(case, progress=messages.append)
    first.load()
    cache = first._llm.kwargs["enable_build_cache"]
    assert Path(cache.cache_root) == tmp_path.resolve() / ENGINE_CACHE_SUBDIR
    assert fake.llm.engine_source == "built"
    first.close()
    second = TensorRTBackend(case)
    second.load()
    try:
        assert fake.llm.engine_source == "cached"
        assert len(list(tmp_path.glob(f"{ENGINE_CACHE_SUBDIR}/engine-*/content"))) == 1
    finally:
        second.close()
    assert any(f"engines are cached in {tmp_path}" in m for m in messages)


def test_trt_runtime_without_a_cache_says_it_builds(fake: FakeTensorRT, tiny_model: Path) -> None:
    messages: list[str] = []
    loaded = TensorRTBackend(
        _case(tiny_model, tensorrt={"backend": "trt"}), progress=messages.append
    )
    loaded.load()
    loaded.close()
    assert "enable_build_cache" not in fake.llm.kwargs
    assert any("compiles a TensorRT engine" in m for m in messages)


# -- sampling and lengths ---------------------------------------------------------------------


def test_greedy_is_top_k_1_and_fixed_lengths_ignore_eos(
    backend: TensorRTBackend, fake: FakeTensorRT, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _spy_sampling(fake, monkeypatch)
    backend.generate(_requests()[:1], params=GenerateParams(max_new_tokens=6, min_new_tokens=6))
    (_, sampling, kwargs) = seen[0]
    assert kwargs == {"streaming": True}
    assert (sampling.max_tokens, sampling.min_tokens, sampling.ignore_eos) == (6, 6, True)
    assert (sampling.top_k, sampling.top_p, sampling.temperature) == (1, None, None)
    assert sampling.seed is None
    assert sampling.end_id == EOS  # left unset by the backend, filled by the engine


def test_sampling_settings_and_seed_are_passed(
    backend: TensorRTBackend, fake: FakeTensorRT, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _spy_sampling(fake, monkeypatch)
    for preset, top_k in (("creative", 50), ("standard", None)):
        params = GenerateParams(
            max_new_tokens=5, min_new_tokens=2, sampling=SamplingConfig(preset=preset), seed=9
        )
        backend.generate(_requests()[:1], params=params)
        sampling = seen[-1][1]
        assert sampling.top_k == top_k  # 0 ("no cut-off") becomes None
        assert (sampling.max_tokens, sampling.min_tokens, sampling.ignore_eos) == (5, 2, False)
        assert sampling.seed == 9
    creative = seen[0][1]
    assert (creative.temperature, creative.top_p) == (0.9, 0.95)


def test_fixed_output_lengths_hold_against_a_model_that_likes_eos(
    backend: TensorRTBackend, fake: FakeTensorRT
) -> None:
    fake.eos_probability = 0.4
    fixed = backend.generate(
        _requests(), params=GenerateParams(max_new_tokens=12, min_new_tokens=12)
    )
    assert [g.output_tokens for g in fixed] == [12] * 4
    free = backend.generate(_requests(), params=GenerateParams(max_new_tokens=12))
    lengths = [g.output_tokens for g in free]
    assert min(lengths) < 12, "some requests stop at their end token"
    for g in free:
        # The end token counts once, at its end (docs/metrics.md), returned by the engine or not.
        assert EOS not in g.output_token_ids[:-1]
        assert g.output_tokens == 12 or g.output_token_ids[-1] == EOS
        assert len(g.token_times) == g.output_tokens


def test_greedy_repeats_and_sampling_follows_the_seed(backend: TensorRTBackend) -> None:
    greedy = GenerateParams(max_new_tokens=8, min_new_tokens=8)
    first = [g.output_token_ids for g in backend.generate(_requests(), params=greedy)]
    assert first == [g.output_token_ids for g in backend.generate(_requests(), params=greedy)]

    def sampled(seed: int) -> list[list[int]]:
        params = GenerateParams(
            max_new_tokens=8,
            min_new_tokens=8,
            sampling=SamplingConfig(preset="standard"),
            seed=seed,
        )
        return [g.output_token_ids for g in backend.generate(_requests(), params=params)]

    assert sampled(3) == sampled(3)
    assert sampled(3) != sampled(4)


# -- token ids, counts and timing -------------------------------------------------------------


def test_counts_come_from_ids_and_match_count_tokens(
    backend: TensorRTBackend, fake: FakeTensorRT, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _spy_sampling(fake, monkeypatch)
    out = backend.generate(_requests(), params=GenerateParams(max_new_tokens=4, min_new_tokens=4))
    assert [g.input_tokens for g in out] == backend.count_tokens(PROMPTS)
    hf = backend._tokenizer
    for (inputs, _, _), prompt in zip(seen, PROMPTS, strict=True):
        assert inputs == hf(prompt)["input_ids"]  # the engine is given the ids, BOS included
    for g in out:
        assert g.output_tokens == len(g.output_token_ids) == 4
        assert isinstance(g.text, str)


def test_token_id_prompts_pass_through_and_are_truncated_on_the_left(
    backend: TensorRTBackend, fake: FakeTensorRT, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _spy_sampling(fake, monkeypatch)
    ids = tuple(range(10, 30))
    out = backend.generate(
        [Request(0, "ids", token_ids=ids), Request(1, " ".join(["word"] * 50))],
        params=GenerateParams(max_new_tokens=2, max_input_tokens=8),
    )
    assert seen[0][0] == list(ids[-8:])  # TensorRT-LLM loads tokenizers with truncation_side=left
    assert [g.input_tokens for g in out] == [8, 8]


@pytest.mark.parametrize(
    ("token_ids", "match"), [((), "empty token_ids"), ((5, 1024), "outside the vocabulary")]
)
def test_bad_token_id_prompts_are_refused(
    backend: TensorRTBackend, token_ids: tuple[int, ...], match: str
) -> None:
    with pytest.raises(BackendInferenceError, match=match):
        backend.generate([Request(0, "bad", token_ids=token_ids)], params=GenerateParams(2))


def test_token_times_are_per_step_monotone_and_inside_the_call(backend: TensorRTBackend) -> None:
    before = time.perf_counter()
    out = backend.generate(
        _requests(first_index=10), params=GenerateParams(max_new_tokens=10, min_new_tokens=10)
    )
    after = time.perf_counter()
    assert [g.request_index for g in out] == [10, 11, 12, 13]
    for g in out:
        assert len(g.token_times) == g.output_tokens == 10
        assert before <= g.issued_at < g.token_times[0]
        # One token per engine step, each stamped when its step's response arrived.
        assert all(b > a for a, b in zip(g.token_times, g.token_times[1:], strict=False))
        assert g.token_times[-1] <= after


def test_on_token_sees_every_token_in_order(backend: TensorRTBackend) -> None:
    calls: list[tuple[int, int, float]] = []
    out = backend.generate(
        _requests(first_index=5),
        params=GenerateParams(max_new_tokens=6, min_new_tokens=6),
        on_token=lambda index, token, t: calls.append((index, token, t)),
    )
    for g in out:
        mine = [(token, t) for index, token, t in calls if index == g.request_index]
        assert mine == list(zip(g.output_token_ids, g.token_times, strict=True))
    assert len(calls) == 4 * 6


def test_empty_request_list(backend: TensorRTBackend) -> None:
    assert backend.generate([], params=GenerateParams(max_new_tokens=4)) == []


# -- the engine's own scheduler ---------------------------------------------------------------


def test_submit_returns_at_once_and_the_engine_batches_what_arrives(
    fake: FakeTensorRT, tiny_model: Path
) -> None:
    fake.step_s = 0.02
    loaded = TensorRTBackend(_case(tiny_model, tensorrt={"max_batch_size": 2}))
    loaded.load()
    try:
        params = GenerateParams(max_new_tokens=5, min_new_tokens=5)
        futures = [loaded.submit(r, params=params) for r in _requests()]
        assert not any(f.done() for f in futures)  # submit does not wait for completions
        results = [f.result(timeout=10) for f in futures]
        assert [g.request_index for g in results] == [0, 1, 2, 3]
        assert all(g.output_tokens == 5 for g in results)
        assert fake.llm.executor.peak_running == 2  # the engine's max_batch_size held
        # The first two ran together: their tokens came in the same steps.
        assert results[0].token_times[-1] < results[3].token_times[0]
    finally:
        loaded.close()


def test_engine_refusals_are_inference_errors(fake: FakeTensorRT, tiny_model: Path) -> None:
    loaded = TensorRTBackend(_case(tiny_model, tensorrt={"max_num_tokens": 4}))
    loaded.load()
    try:
        with pytest.raises(BackendInferenceError, match="max_num_tokens"):
            loaded.generate(_requests()[2:3], params=GenerateParams(max_new_tokens=2))
        future = loaded.submit(_requests()[2], params=GenerateParams(max_new_tokens=2))
        with pytest.raises(BackendInferenceError, match="request 2 failed: ValueError"):
            future.result(timeout=10)
    finally:
        loaded.close()
    trt = TensorRTBackend(_case(tiny_model, tensorrt={"backend": "trt", "max_seq_len": 16}))
    trt.load()
    try:
        with pytest.raises(BackendInferenceError, match="max_seq_len"):
            trt.generate(_requests()[:1], params=GenerateParams(max_new_tokens=20))
    finally:
        trt.close()


# -- errors, shutdown and reload --------------------------------------------------------------


def test_not_installed_skips_with_the_install_hint(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)
    with pytest.raises(BackendNotAvailableError) as info:
        TensorRTBackend(_case(tiny_model)).load()
    assert "pip install tensorrt-llm --extra-index-url https://pypi.nvidia.com" in str(info.value)
    assert "NVIDIA GPU" in info.value.install_hint
    assert _is_missing_hardware_or_engine(info.value)


def test_no_gpu_or_too_few_gpus_skip(fake: FakeTensorRT, tiny_model: Path) -> None:
    fake.gpus = 0
    with pytest.raises(BackendConfigError, match="sees no CUDA device") as none:
        TensorRTBackend(_case(tiny_model)).load()
    assert none.value.param == "device"
    assert _is_missing_hardware_or_engine(none.value)
    fake.gpus = 1
    with pytest.raises(BackendConfigError, match="needs 4 GPUs, but 1 are visible") as few:
        TensorRTBackend(
            _case(tiny_model, tensorrt={"tensor_parallel_size": 2, "pipeline_parallel_size": 2})
        ).load()
    assert _is_missing_hardware_or_engine(few.value)
    assert fake.engines == []  # refused before starting an engine


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("[TensorRT-LLM][ERROR] CUDA runtime error in cudaMalloc: out of memory"),
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    ],
)
def test_out_of_memory_at_load_is_retryable(
    fake: FakeTensorRT, tiny_model: Path, error: Exception
) -> None:
    fake.fail_on_load = error
    with pytest.raises(RetryableError, match="out of GPU memory while loading"):
        TensorRTBackend(_case(tiny_model)).load()


def test_other_load_failures_are_model_load_errors(
    fake: FakeTensorRT, tiny_model: Path, tmp_path: Path
) -> None:
    fake.fail_on_load = RuntimeError("unsupported architecture")
    with pytest.raises(ModelLoadError, match="unsupported architecture"):
        TensorRTBackend(_case(tiny_model)).load()
    with pytest.raises(ModelLoadError, match="not a folder"):
        TensorRTBackend(_case(tiny_model, model=str(tmp_path / "missing"))).load()
    with pytest.raises(ModelLoadError, match="could not load model 'org/not-local'"):
        TensorRTBackend(_case(tiny_model, model="org/not-local")).load()  # the fake has no hub


def test_out_of_memory_while_generating_is_retryable_and_the_engine_goes_on(
    backend: TensorRTBackend, fake: FakeTensorRT
) -> None:
    fake.fail_next_step = "CUDA_ERROR_OUT_OF_MEMORY while allocating KV cache blocks"
    with pytest.raises(RetryableError, match="out of GPU memory during request"):
        backend.generate(_requests(), params=GenerateParams(max_new_tokens=4))
    fake.llm.executor.wait_idle()  # the other requests of that call are aborted first
    fake.fail_next_step = "an illegal memory access was encountered"
    with pytest.raises(BackendInferenceError, match="RequestError: an illegal memory access"):
        backend.generate(_requests(), params=GenerateParams(max_new_tokens=4))
    fake.llm.executor.wait_idle()
    out = backend.generate(_requests(), params=GenerateParams(max_new_tokens=4, min_new_tokens=4))
    assert [g.output_tokens for g in out] == [4] * 4


def test_close_shuts_down_is_idempotent_and_reload_works(
    fake: FakeTensorRT, tiny_model: Path
) -> None:
    loaded = TensorRTBackend(_case(tiny_model))
    loaded.load()
    first = fake.llm
    loaded.close()
    loaded.close()
    assert first.shutdown_calls == 1
    with pytest.raises(BackendInferenceError, match="before load"):
        loaded.generate(_requests(), params=GenerateParams(max_new_tokens=2))
    with pytest.raises(BackendInferenceError, match="before load"):
        loaded.count_tokens(PROMPTS)
    loaded.load()
    assert fake.llm is not first
    assert loaded.generate(_requests(), params=GenerateParams(max_new_tokens=2))[0].output_tokens
    loaded.close()


def test_close_aborts_requests_still_running(fake: FakeTensorRT, tiny_model: Path) -> None:
    fake.step_s = 0.01
    loaded = TensorRTBackend(_case(tiny_model))
    loaded.load()
    future = loaded.submit(_requests()[0], params=GenerateParams(max_new_tokens=10_000))
    time.sleep(0.05)
    started = time.perf_counter()
    loaded.close()
    assert time.perf_counter() - started < 5
    assert future.cancelled()
    assert fake.llm.shutdown_calls == 1


def test_memory_and_synchronize(backend: TensorRTBackend) -> None:
    backend.synchronize()
    backend.reset_peak_memory()
    usage = backend.peak_memory()
    assert usage.kind == "unavailable"
    assert usage.peak_mb is None
    assert usage.note is not None
    assert "KV cache" in usage.note


def test_vocabulary_is_the_tokenizer_and_checkpoint_overlap(backend: TensorRTBackend) -> None:
    vocabulary = backend.vocabulary()
    assert vocabulary.size == 1024
    assert {0, 1, 2} <= vocabulary.special_ids


# -- through pytest ---------------------------------------------------------------------------

CONFTEST = """
import pytest

from tests.fakes.fake_tensorrt_llm import install


def pytest_configure(config):
    patch = pytest.MonkeyPatch()
    install(patch, step_s=0.001, prefill_s=0.001)
    config.add_cleanup(patch.undo)
"""

TEST = """
import pytest

@pytest.mark.llem(batch_size=4, max_new_tokens=6, min_new_tokens=6, num_prompts=8)
def test_tiny(llem):
    llem.run()

@pytest.mark.llem(scenario="server", max_new_tokens=4, min_new_tokens=4, num_prompts=6,
                  traffic={"rate": 200.0})
def test_server(llem):
    llem.run()
"""

QUICK = ["--llem-warmup=0", "--llem-meter=none", "--llem-repeat=2", "-p", "no:cacheprovider"]


@pytest.mark.slow
def test_pytest_run_records_tensorrt_with_the_transformers_metric_names(
    pytester: pytest.Pytester, tiny_model: Path
) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(TEST)
    result = pytester.runpytest(*QUICK, "--llem-backend=tensorrt")
    result.assert_outcomes(passed=2)
    record = json.loads((pytester.path / "reports" / "llem-report.json").read_text())
    offline, server = record["cases"]
    assert offline["backend"] == server["backend"] == "tensorrt"
    assert [rep["output_tokens"] for rep in offline["repetitions"]] == [48, 48]
    assert any("engine's own scheduler" in note for note in server["notes"])

    (pytester.path / "reports" / "llem-report.json").unlink()
    result = pytester.runpytest(*QUICK, "--llem-backend=transformers", "-k", "test_tiny")
    result.assert_outcomes(passed=1, deselected=1)
    (reference,) = json.loads((pytester.path / "reports" / "llem-report.json").read_text())["cases"]
    assert reference["backend"] == "transformers"
    assert set(offline["metrics"]) == set(reference["metrics"])
    assert offline["metrics"]["flops_estimate"]["median"] == pytest.approx(
        reference["metrics"]["flops_estimate"]["median"]
    )

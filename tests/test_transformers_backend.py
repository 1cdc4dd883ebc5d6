"""Tests of the transformers backend on CPU with the built-in tiny model (no download, no GPU).

``llem_cache`` and ``tiny_model`` come from ``tests/conftest.py``: one session-wide cache folder
holding one build of llem-tiny.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_llem.backends import transformers as backend_module
from pytest_llem.backends.base import Backend, GenerateParams, Request
from pytest_llem.backends.steps import RecordsSteps, StepTimeline
from pytest_llem.backends.transformers import TransformersBackend
from pytest_llem.config.models import CaseConfig, SamplingConfig
from pytest_llem.data.tiny_model import TINY_MODEL_NAME
from pytest_llem.exceptions import (
    BackendConfigError,
    BackendInferenceError,
    BackendNotAvailableError,
    ModelLoadError,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

__all__: list[str] = []

PROMPTS = [
    "Hi",
    "What is the capital of France?",
    "Explain, in a few careful sentences, why the sky looks blue at noon and red at dusk.",
    "Write a haiku about rain on a tin roof.",
]
EOS = 2  # llem-tiny's </s>


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    # Several OpenMP threads on a busy 2-core machine spin against each other and make these
    # tiny matrix products 100x slower; the tests check behaviour, not speed.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def backend(tiny_model: Path) -> Iterator[TransformersBackend]:
    loaded = TransformersBackend(CaseConfig(model=str(tiny_model), device="cpu"))
    loaded.load()
    yield loaded
    loaded.close()


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def eos_biased_folder(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """llem-tiny with a generation config that makes </s> likely, so requests end early."""
    folder = tmp_path_factory.mktemp("eos-biased") / "model"
    shutil.copytree(tiny_model, folder)
    path = folder / "generation_config.json"
    settings = json.loads(path.read_text())
    settings["sequence_bias"] = [[[EOS], 4.0]]
    path.write_text(json.dumps(settings))
    return folder


def _requests(prompts: list[str] = PROMPTS, first_index: int = 0) -> list[Request]:
    return [Request(index=first_index + i, prompt=p) for i, p in enumerate(prompts)]


def test_satisfies_the_protocol(backend: TransformersBackend) -> None:
    assert isinstance(backend, Backend)
    assert backend.name == "transformers"
    assert backend.capabilities.streaming
    assert backend.capabilities.batching
    assert backend.capabilities.devices == ("cpu", "cuda")


def test_load_reports_info(backend: TransformersBackend, tiny_model: Path) -> None:
    info = backend.load()
    assert backend.load() is info  # a second call does not reload
    assert (info.name, info.device, info.dtype) == ("transformers", "cpu", "float32")
    assert info.version == transformers.__version__
    assert info.model_path == str(tiny_model.resolve())
    # Embedding 1024x128; per layer q,k,v,o 4x128x128 + MLP 3x128x256 + two norms 2x128;
    # final norm 128; untied lm_head 1024x128.
    layer = 4 * 128 * 128 + 3 * 128 * 256 + 2 * 128
    assert info.parameters == 1024 * 128 + 2 * layer + 128 + 1024 * 128
    assert info.non_embedding_parameters == info.parameters - 1024 * 128
    assert info.load_seconds is not None
    assert info.load_seconds > 0


def test_builtin_name_uses_the_cache(
    tiny_model: Path, llem_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(llem_cache))  # where tiny_model was built
    messages: list[str] = []
    named = TransformersBackend(CaseConfig(model=TINY_MODEL_NAME), progress=messages.append)
    try:
        info = named.load()
    finally:
        named.close()
    assert info.model == TINY_MODEL_NAME
    assert info.model_path is not None
    assert info.model_path == str(tiny_model)
    assert not [m for m in messages if m.startswith("building")], "already built: no rebuild"
    assert messages == [f"loading {TINY_MODEL_NAME} on cpu (float32)"]


def test_batch_is_left_padded_and_counts_exclude_padding(
    backend: TransformersBackend, tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, Any] = {}
    original = backend._model.generate

    def spy(**kwargs: Any) -> Any:
        seen.update(kwargs)
        return original(**kwargs)

    monkeypatch.setattr(backend._model, "generate", spy)
    params = GenerateParams(max_new_tokens=4, min_new_tokens=4)
    out = backend.generate(_requests(), params=params)

    expected = [len(tokenizer(p)["input_ids"]) for p in PROMPTS]
    assert len(set(expected)) == len(PROMPTS), "prompts must differ in length"
    assert [g.input_tokens for g in out] == expected
    mask = seen["attention_mask"]
    width = mask.shape[1]
    assert width == max(expected)
    for row, n in enumerate(expected):
        assert mask[row].tolist() == [0] * (width - n) + [1] * n  # padding on the left
        assert seen["input_ids"][row, : width - n].eq(tokenizer.pad_token_id).all()


def test_fixed_output_length_and_token_times(backend: TransformersBackend) -> None:
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
    # One decoding step serves the whole batch, so the rows share their step times.
    assert len({tuple(g.token_times) for g in out}) == 1


def test_engine_steps_are_reported_prefill_first(backend: TransformersBackend) -> None:
    assert isinstance(backend, RecordsSteps)
    timeline = StepTimeline()
    backend.record_steps(timeline)
    try:
        params = GenerateParams(max_new_tokens=5)
        out = backend.generate(_requests(first_index=20), params=params, on_token=None)
    finally:
        backend.record_steps(None)
    (steps,) = timeline.rounds
    longest = max(g.output_tokens for g in out)
    assert len(steps) == longest  # one step per generated position, the prefill first
    prefill = {w.request_index: w for w in steps[0].work}
    assert {i: w.prefill_tokens for i, w in prefill.items()} == {
        g.request_index: g.input_tokens for g in out
    }
    assert all(w.decode_tokens == 0 for w in steps[0].work)
    assert steps[0].start == out[0].issued_at
    assert steps[0].end == out[0].token_times[0]
    for g in out:  # each further token of a row is one decode token in one step
        decoded = sum(
            w.decode_tokens for s in steps[1:] for w in s.work if w.request_index == g.request_index
        )
        assert decoded == g.output_tokens - 1
    assert all(a.end == b.start for a, b in itertools.pairwise(steps))


def test_on_token_sees_every_token_in_order(backend: TransformersBackend) -> None:
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


def test_prompts_are_truncated(backend: TransformersBackend) -> None:
    long_prompt = " ".join(["word"] * 200)
    out = backend.generate(
        _requests([long_prompt, "Hi"]),
        params=GenerateParams(max_new_tokens=2, max_input_tokens=7),
    )
    assert out[0].input_tokens == 7
    assert out[1].input_tokens < 7


def test_greedy_is_deterministic(backend: TransformersBackend) -> None:
    params = GenerateParams(max_new_tokens=8, min_new_tokens=8)
    first = [g.output_token_ids for g in backend.generate(_requests(), params=params)]
    second = [g.output_token_ids for g in backend.generate(_requests(), params=params)]
    assert first == second


def test_sampling_is_reproducible_with_a_seed(backend: TransformersBackend) -> None:
    def run(seed: int) -> list[list[int]]:
        params = GenerateParams(
            max_new_tokens=12,
            min_new_tokens=12,
            sampling=SamplingConfig(preset="standard"),
            seed=seed,
        )
        return [g.output_token_ids for g in backend.generate(_requests(), params=params)]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_output_stops_at_the_first_eos(eos_biased_folder: Path) -> None:
    biased = TransformersBackend(CaseConfig(model=str(eos_biased_folder)))
    biased.load()
    try:
        # Greedy: EOS wins as soon as min_new_tokens stops suppressing it.
        greedy = biased.generate(
            _requests(), params=GenerateParams(max_new_tokens=10, min_new_tokens=3)
        )
        for g in greedy:
            assert g.output_tokens == 4
            assert g.output_token_ids[-1] == EOS
            assert len(g.token_times) == 4
        # Sampled: rows end at different steps; nothing after a row's EOS is reported.
        lengths: set[int] = set()
        for seed in range(5):
            params = GenerateParams(
                max_new_tokens=12, sampling=SamplingConfig(preset="standard"), seed=seed
            )
            for g in biased.generate(_requests(), params=params):
                ids = g.output_token_ids
                assert len(g.token_times) == len(ids)
                assert EOS not in ids[:-1]
                assert ids[-1] == EOS or len(ids) == 12
                assert 0 not in ids  # no padding
                lengths.add(len(ids))
        assert 12 in lengths
        assert min(lengths) < 12
        assert len(lengths) >= 3
    finally:
        biased.close()


def test_streamer_skips_the_prompt_and_finished_rows() -> None:
    calls: list[tuple[int, int]] = []
    clock = backend_module._TokenClock(
        [3, 4], stop_ids=frozenset({EOS}), on_token=lambda i, tok, t: calls.append((i, tok))
    )
    streamer = backend_module._make_streamer(clock)
    assert isinstance(streamer, transformers.generation.streamers.BaseStreamer)
    streamer.put(torch.tensor([[1, 40, 41], [0, 1, 42]]))  # the prompt
    streamer.put(torch.tensor([50, EOS]))
    streamer.put(torch.tensor([51, 0]))  # row 1 is padding now
    streamer.put(torch.tensor([EOS, 0]))
    streamer.end()
    assert clock.token_ids == [[50, 51, EOS], [EOS]]
    assert [len(t) for t in clock.token_times] == [3, 1]
    assert calls == [(3, 50), (4, EOS), (3, 51), (3, EOS)]
    with pytest.raises(BackendInferenceError, match="3 tokens for a batch of 2"):
        clock.step([1, 2, 3])


def test_empty_request_list(backend: TransformersBackend) -> None:
    assert backend.generate([], params=GenerateParams(max_new_tokens=4)) == []


def test_peak_memory_process_rss(backend: TransformersBackend) -> None:
    backend.reset_peak_memory()
    backend.generate(_requests(), params=GenerateParams(max_new_tokens=4))
    usage = backend.peak_memory()
    assert usage.kind == "process_rss"
    assert usage.peak_mb is not None
    assert usage.peak_mb > 10  # torch alone holds more than this


@pytest.mark.skipif(
    not os.access("/proc/self/clear_refs", os.W_OK), reason="needs a resettable peak RSS (Linux)"
)
def test_peak_memory_reset_forgets_an_earlier_peak(backend: TransformersBackend) -> None:
    backend.reset_peak_memory()
    block = b"\x01" * (128 * 1024 * 1024)  # every page written, so resident
    with_block = backend.peak_memory()
    del block
    backend.reset_peak_memory()
    after_reset = backend.peak_memory()
    assert with_block.peak_mb is not None
    assert after_reset.peak_mb is not None
    assert with_block.note is None
    assert after_reset.note is None
    assert with_block.peak_mb - after_reset.peak_mb > 64


def test_peak_memory_falls_back_to_lifetime_peak(
    backend: TransformersBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(backend_module, "_CLEAR_REFS", tmp_path / "missing" / "clear_refs")
    backend.reset_peak_memory()
    usage = backend.peak_memory()
    assert usage.kind == "process_rss"
    assert usage.note == "process lifetime peak"
    assert usage.peak_mb is not None
    assert usage.peak_mb > 10


def test_synchronize_on_cpu_is_a_no_op(backend: TransformersBackend) -> None:
    backend.synchronize()


def test_missing_model_path(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ModelLoadError, match=r"not a folder \(no such path\)") as info:
        TransformersBackend(CaseConfig(model=missing)).load()
    assert missing in str(info.value)


def test_unknown_hub_id_offline_is_a_load_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=r"'llem-test/definitely-not-cached'.*local Hugging"):
        TransformersBackend(CaseConfig(model="llem-test/definitely-not-cached")).load()


def test_folder_without_a_model(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ModelLoadError, match="does not hold a loadable transformers model"):
        TransformersBackend(CaseConfig(model=str(tmp_path))).load()


def test_folder_without_weights(tiny_model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "no-weights"
    shutil.copytree(tiny_model, folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"cannot load the model of model '.*no-weights'"):
        TransformersBackend(CaseConfig(model=str(folder))).load()


def test_file_instead_of_folder(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0")
    with pytest.raises(ModelLoadError, match="is a file"):
        TransformersBackend(CaseConfig(model=str(path))).load()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda(tiny_model: Path) -> None:
    with pytest.raises(BackendConfigError, match="device"):
        TransformersBackend(CaseConfig(model=str(tiny_model), device="cuda")).load()


def test_missing_engine(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(BackendNotAvailableError, match=r"pytest-llem\[transformers\]"):
        TransformersBackend(CaseConfig(model=str(tiny_model))).load()


def test_generate_before_load(tiny_model: Path) -> None:
    with pytest.raises(BackendInferenceError, match="before load"):
        TransformersBackend(CaseConfig(model=str(tiny_model))).generate(
            _requests(), params=GenerateParams(max_new_tokens=2)
        )


def test_close_releases_the_model(tiny_model: Path) -> None:
    closing = TransformersBackend(CaseConfig(model=str(tiny_model)))
    closing.load()
    closing.close()
    assert closing._model is None
    with pytest.raises(BackendInferenceError):
        closing.generate(_requests(), params=GenerateParams(max_new_tokens=2))
    closing.load()  # loadable again after close
    assert closing.generate(_requests(), params=GenerateParams(max_new_tokens=2))[0].output_tokens
    closing.close()


def test_prefill_check_reports_both_prefill_energies(
    backend: TransformersBackend, tiny_model: Path
) -> None:
    from pytest_llem.harness.runner import run_case
    from tests.fakes.fake_meter import FakeMeter

    meter = FakeMeter("steady", time.perf_counter, power_w={"cpu": 20.0})
    case = CaseConfig(
        model=str(tiny_model), device="cpu", batch_size=2, max_new_tokens=8, min_new_tokens=8,
        warmup=0, repeat=1, prefill_check=True,
    )  # fmt: skip
    measured = run_case(backend=backend, meters=[meter], config=case, prompts=PROMPTS)
    (rep,) = measured.repetitions
    assert rep.attribution is not None
    assert rep.attribution.timeline == "engine"
    subtraction = rep.values["subtraction_prefill_energy_j"]
    attributed = rep.values["prefill_energy_j"]
    assert subtraction is not None
    assert subtraction > 0
    assert attributed is not None
    assert attributed > 0
    diff = rep.values["prefill_attribution_diff"]
    assert diff == pytest.approx((attributed - subtraction) / subtraction)

"""The TensorRT-LLM backend against a fake that behaves like TensorRT-LLM 1.x (issue 14): its
build cache's pruning, ``SamplingParams``' greedy rule and validation, and the end token."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pytest_llem.backends.base import GenerateParams, Request
from pytest_llem.backends.tensorrt import ENGINE_CACHE_SUBDIR, TensorRTBackend
from pytest_llem.config.models import CaseConfig, SamplingConfig
from pytest_llem.exceptions import BackendConfigError
from tests.fakes import fake_tensorrt_llm

# 2. TensorRT-LLM's build cache prunes its root --------------------------------------------------


def _engine_record(folder: Path, stamp: str) -> None:
    (folder / "content").mkdir(parents=True)
    (folder / "metadata.json").write_text(
        json.dumps({"version": 0, "datetime": stamp, "kind": "Engine"})
    )


def _trt_case(tiny_model: Path, cache_dir: Path, **tensorrt: object) -> CaseConfig:
    settings = {"backend": "trt", "engine_cache_dir": str(cache_dir), **tensorrt}
    return CaseConfig(backend="tensorrt", model=str(tiny_model), tensorrt=settings)


def test_fake_build_cache_prunes_like_the_real_one(
    monkeypatch: pytest.MonkeyPatch, tiny_model: Path, tmp_path: Path
) -> None:
    pytest.importorskip("transformers")
    fake = fake_tensorrt_llm.install(monkeypatch)
    root = tmp_path / "cache"
    (root / "folder").mkdir(parents=True)
    (root / "notes.txt").write_text("mine")
    for day in range(1, 12):
        _engine_record(root / f"engine-old{day:02d}", f"2025-01-{day:02d}T00:00:00")
    engine_llm = fake.modules["tensorrt_llm._tensorrt_engine"].LLM
    llmapi = fake.modules["tensorrt_llm.llmapi"]
    llm = engine_llm(str(tiny_model), enable_build_cache=llmapi.BuildCacheConfig(cache_root=root))
    llm.shutdown()
    left = sorted(entry.name for entry in root.iterdir())
    assert "notes.txt" not in left
    assert "folder" not in left
    assert len(left) == 10  # the newest 9 old records and the new one
    assert "engine-old01" not in left
    assert "engine-old02" not in left


def test_engine_cache_dir_leaves_unrelated_files_untouched(
    monkeypatch: pytest.MonkeyPatch, tiny_model: Path, tmp_path: Path
) -> None:
    pytest.importorskip("transformers")
    fake_tensorrt_llm.install(monkeypatch)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "weights.bin").write_bytes(b"precious")
    (tmp_path / "notes.txt").write_text("mine")
    backend = TensorRTBackend(_trt_case(tiny_model, tmp_path))
    info = backend.load()
    backend.close()
    assert (tmp_path / "data" / "weights.bin").read_bytes() == b"precious"
    assert (tmp_path / "notes.txt").read_text() == "mine"
    cache = tmp_path / ENGINE_CACHE_SUBDIR
    assert info.extra["engine_cache_dir"] == str(cache.resolve())
    assert len(list(cache.glob("engine-*/content"))) == 1


def test_an_engine_folder_holding_other_entries_is_refused(
    monkeypatch: pytest.MonkeyPatch, tiny_model: Path, tmp_path: Path
) -> None:
    pytest.importorskip("transformers")
    fake_tensorrt_llm.install(monkeypatch)
    (tmp_path / ENGINE_CACHE_SUBDIR).mkdir()
    (tmp_path / ENGINE_CACHE_SUBDIR / "notes.txt").write_text("mine")
    backend = TensorRTBackend(_trt_case(tiny_model, tmp_path))
    with pytest.raises(BackendConfigError, match=r"tensorrt\.engine_cache_dir: .*notes\.txt"):
        backend.load()
    assert (tmp_path / ENGINE_CACHE_SUBDIR / "notes.txt").read_text() == "mine"


# 7. TensorRT-LLM's SamplingParams: greedy from three knobs, ranges validated -------------------


def test_fake_sampling_params_decide_greedy_and_validate_as_the_real_ones() -> None:
    sampling = fake_tensorrt_llm.SamplingParams
    assert sampling()._greedy_decoding
    assert sampling(top_k=1, temperature=0.8)._greedy_decoding
    assert sampling(temperature=0.0, top_p=0.9)._greedy_decoding
    assert not sampling(temperature=0.8)._greedy_decoding
    assert not sampling(temperature=0.8, top_p=1.0, top_k=None)._greedy_decoding
    for bad in ({"top_p": 1.5}, {"top_k": -1}, {"temperature": -0.5}):
        with pytest.raises(ValueError, match="must"):
            sampling(**bad)  # type: ignore[arg-type]


def test_sampling_the_engine_refuses_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, tiny_model: Path
) -> None:
    pytest.importorskip("transformers")
    fake_tensorrt_llm.install(monkeypatch)
    backend = TensorRTBackend(CaseConfig(backend="tensorrt", model=str(tiny_model)))
    backend.load()
    try:
        # Past the case's own validation (as a plugin hook or an older config might send it).
        bad = SamplingConfig.model_construct(do_sample=True, temperature=-1.0, top_p=1.0, top_k=0)
        with pytest.raises(BackendConfigError, match="temperature"):
            backend.generate(
                [Request(index=0, prompt="Hi")],
                params=GenerateParams(max_new_tokens=4, sampling=bad),
            )
        sampled = backend._sampling_params(
            GenerateParams(max_new_tokens=4, sampling=SamplingConfig(preset="standard"))
        )
        greedy = backend._sampling_params(GenerateParams(max_new_tokens=4))
        assert not sampled._greedy_decoding
        assert greedy._greedy_decoding
    finally:
        backend.close()


@pytest.mark.parametrize("eos_in_token_ids", [False, True])
def test_an_end_token_is_counted_once_whether_the_engine_returns_it_or_not(
    monkeypatch: pytest.MonkeyPatch, tiny_model: Path, eos_in_token_ids: bool
) -> None:
    pytest.importorskip("transformers")
    fake = fake_tensorrt_llm.install(
        monkeypatch, eos_probability=0.4, eos_in_token_ids=eos_in_token_ids
    )
    backend = TensorRTBackend(CaseConfig(backend="tensorrt", model=str(tiny_model)))
    backend.load()
    seen: list[int] = []
    try:
        end_id = backend._tokenizer.eos_token_id
        generations = backend.generate(
            [Request(index=i, prompt=p) for i, p in enumerate(["Hi", "Rain", "Blue sky", "Go"])],
            params=GenerateParams(max_new_tokens=12),
            on_token=lambda index, token, when: seen.append(token),
        )
    finally:
        backend.close()
    assert fake.eos_in_token_ids is eos_in_token_ids
    stopped = [g for g in generations if g.output_tokens < 12]
    assert stopped, "some requests stop at their end token"
    for g in stopped:
        assert g.output_token_ids[-1] == end_id
        assert end_id not in g.output_token_ids[:-1]
    assert all(len(g.token_times) == g.output_tokens for g in generations)
    assert len(seen) == sum(g.output_tokens for g in generations)

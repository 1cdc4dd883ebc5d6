"""Tests of the built-in ``llem-tiny`` recipe: cache location, build, reload, determinism, repair."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from pytest_llem.data import tiny_model
from pytest_llem.data.tiny_model import (
    TINY_MODEL_NAME,
    build_tiny_model,
    cache_root,
    ensure_tiny_model,
    tiny_model_path,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

__all__: list[str] = []


def _hashes(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "xdg-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    return home


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """One ensure_tiny_model() build in a fresh cache, with the progress lines it reported."""
    home = tmp_path_factory.mktemp("xdg-cache")
    messages: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(home))
        folder = ensure_tiny_model(progress=messages.append)
    return folder, messages


def test_cache_root_follows_xdg(cache_home: Path) -> None:
    assert cache_root() == cache_home / "pytest-llem"
    assert tiny_model_path().parent == cache_home / "pytest-llem" / "models"
    assert tiny_model_path().name.startswith(f"{TINY_MODEL_NAME}-v")


def test_cache_root_defaults_to_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_root() == tmp_path / ".cache" / "pytest-llem"


def test_ensure_builds_and_reports(built: tuple[Path, list[str]]) -> None:
    folder, messages = built
    assert folder.name == tiny_model_path().name
    assert messages[0] == f"building {TINY_MODEL_NAME} in {folder}"
    assert messages[-1].startswith(f"{TINY_MODEL_NAME} ready")
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")], "staging left over"
    manifest = json.loads((folder / "llem-manifest.json").read_text())
    assert set(manifest["files"]) == names - {"llem-manifest.json"}


def test_folder_loads_with_auto_classes(built: tuple[Path, list[str]]) -> None:
    folder, _ = built
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert tokenizer.padding_side == "left"
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == (
        "<pad>",
        "<s>",
        "</s>",
    )
    assert 900 <= len(tokenizer) <= 1100
    ids = tokenizer("Why is the sky blue?")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Why is the sky blue?"
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (2, 128, 2)
    assert config.hidden_size // config.num_attention_heads == 64
    assert config.max_position_embeddings == 2048
    assert config.vocab_size == len(tokenizer)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    assert model.get_input_embeddings().weight.std().item() > 0  # random, not zeros


def test_second_call_reuses_the_folder(
    built: tuple[Path, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, _ = built
    monkeypatch.setenv("XDG_CACHE_HOME", str(folder.parents[2]))
    before = _hashes(folder)
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    messages: list[str] = []
    assert ensure_tiny_model(progress=messages.append) == folder
    assert messages == []
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime
    assert _hashes(folder) == before


def test_builds_are_identical(built: tuple[Path, list[str]], tmp_path: Path) -> None:
    folder, _ = built
    build_tiny_model(tmp_path / "again")
    assert _hashes(tmp_path / "again") == _hashes(folder)


def test_build_ignores_the_users_default_dtype(
    built: tuple[Path, list[str]], tmp_path: Path
) -> None:
    folder, _ = built
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        build_tiny_model(tmp_path / "m")
        assert torch.get_default_dtype() == torch.float64
    finally:
        torch.set_default_dtype(previous)
    assert _hashes(tmp_path / "m") == _hashes(folder)


def test_build_leaves_the_users_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    build_tiny_model(tmp_path / "m")
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("damage", ["corrupt", "delete", "manifest"])
def test_damaged_copy_is_rebuilt(cache_home: Path, damage: str) -> None:
    folder = ensure_tiny_model()
    good = _hashes(folder)
    weights = folder / "model.safetensors"
    if damage == "corrupt":
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "delete":
        weights.unlink()
    else:
        (folder / "llem-manifest.json").write_text("{not json")
    messages: list[str] = []
    assert ensure_tiny_model(progress=messages.append) == folder
    assert messages[0].startswith(f"building {TINY_MODEL_NAME}")
    assert _hashes(folder) == good
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]


def test_losing_the_install_race_keeps_the_winner(cache_home: Path) -> None:
    winner = ensure_tiny_model()
    marker = (winner / "model.safetensors").stat().st_ino
    staging = winner.parent / ".late-build"
    build_tiny_model(staging)
    tiny_model._install(staging, winner)
    assert (winner / "model.safetensors").stat().st_ino == marker
    assert tiny_model._is_intact(winner)


class _Spy:
    """Counts calls and passes them on."""

    def __init__(self, function: Any) -> None:
        self.function = function
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.function(*args, **kwargs)


@pytest.fixture
def spies(monkeypatch: pytest.MonkeyPatch) -> tuple[_Spy, _Spy]:
    """Spies on hashing and building; returns (hash spy, build spy)."""
    hashing = _Spy(tiny_model._sha256)
    building = _Spy(tiny_model.build_tiny_model)
    monkeypatch.setattr(tiny_model, "_sha256", hashing)
    monkeypatch.setattr(tiny_model, "build_tiny_model", building)
    return hashing, building


def test_a_cached_copy_is_hashed_once_per_process(
    cache_home: Path, monkeypatch: pytest.MonkeyPatch, spies: tuple[_Spy, _Spy]
) -> None:
    hashing, building = spies
    folder = ensure_tiny_model()
    assert building.calls == 1
    monkeypatch.setattr(tiny_model, "_RACY_NS", 0)  # the copy counts as written long ago
    hashing.calls = 0
    assert ensure_tiny_model() == folder  # first check in a "new process": hashes every file
    files = len(json.loads((folder / "llem-manifest.json").read_text())["files"])
    assert hashing.calls == files
    for _ in range(3):
        assert ensure_tiny_model() == folder
    assert hashing.calls == files, "an unchanged copy was hashed again"
    assert building.calls == 1, "a cached copy was rebuilt"


def test_a_changed_file_is_hashed_again_and_repaired(
    cache_home: Path, monkeypatch: pytest.MonkeyPatch, spies: tuple[_Spy, _Spy]
) -> None:
    hashing, building = spies
    monkeypatch.setattr(tiny_model, "_RACY_NS", 0)
    folder = ensure_tiny_model()
    ensure_tiny_model()  # verified and remembered
    good = _hashes(folder)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, same inode
    weights.write_bytes(bytes(data))
    stamp = weights.stat().st_mtime_ns + 10_000_000
    os.utime(weights, ns=(stamp, stamp))
    hashing.calls = 0
    assert ensure_tiny_model() == folder
    assert hashing.calls > 0
    assert building.calls == 2, "the damaged copy was not rebuilt"
    assert _hashes(folder) == good


def test_a_just_written_copy_is_hashed_on_every_call(
    cache_home: Path, monkeypatch: pytest.MonkeyPatch, spies: tuple[_Spy, _Spy]
) -> None:
    # Within _RACY_NS of a write, an in-place change may not show in the time stamps.
    monkeypatch.setattr(tiny_model, "_RACY_NS", 10**18)  # every write counts as recent
    hashing, building = spies
    folder = ensure_tiny_model()
    hashing.calls = 0
    ensure_tiny_model()
    first = hashing.calls
    ensure_tiny_model()
    assert first > 0
    assert hashing.calls == 2 * first
    assert building.calls == 1
    assert folder.is_dir()

"""Shared fixtures of pytest-llem's own tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

_PRELOADED = pytest.StashKey[bool]()


@pytest.fixture(scope="session", autouse=True)
def llem_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One cache folder for the whole test session, so llem-tiny is built once and the user's
    own cache is never touched."""
    cache = tmp_path_factory.mktemp("xdg-cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("XDG_CACHE_HOME", str(cache))
    yield cache
    patch.undo()


@pytest.fixture(scope="session")
def tiny_model(llem_cache: Path) -> Path:
    """The built-in tiny model's folder, built on first use."""
    from pytest_llem.data.tiny_model import ensure_tiny_model

    return ensure_tiny_model()


@pytest.hookimpl(tryfirst=True)
def pytest_fixture_setup(
    fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest
) -> None:
    """Before the first ``pytester`` fixture, load the engine once: in-process pytester runs drop
    the modules they imported, and torch cannot be imported twice into one process (see
    ``pytest_llem.pytester_preload``)."""
    if fixturedef.argname not in ("pytester", "testdir"):
        return
    config = request.config
    if not config.stash.get(_PRELOADED, False):
        config.stash[_PRELOADED] = True
        from pytest_llem.pytester_preload import preload_engine

        preload_engine()


def _gpu_missing_reason() -> str | None:
    """Why the ``gpu``-marked tests cannot run here, or None when a CUDA GPU is usable."""
    from pytest_llem.meters.inventory import gpu_inventory

    gpus, why = gpu_inventory()
    if not gpus:
        return f"needs an NVIDIA GPU: {why or 'NVML lists none'}"
    try:
        import torch
    except ImportError:
        return "needs torch with CUDA"
    if not torch.cuda.is_available():
        return "needs torch with CUDA (torch.cuda.is_available() is False)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``gpu``-marked tests, with the reason, where no GPU can run them."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    reason = _gpu_missing_reason()
    if reason is None:
        return
    for item in gpu_items:
        item.add_marker(pytest.mark.skip(reason=reason))

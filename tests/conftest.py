"""Shared fixtures of pytest-llem's own tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


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

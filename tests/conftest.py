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
    """The built-in tiny model's folder, built on first use.

    It also runs the model once in this process: pytester's in-process runs drop the modules
    they imported, and torch cannot be imported a second time into one process, so torch and
    transformers must already be loaded here.
    """
    from pytest_llem.backends.base import GenerateParams, Request
    from pytest_llem.backends.transformers import TransformersBackend
    from pytest_llem.config.models import CaseConfig
    from pytest_llem.data.tiny_model import ensure_tiny_model

    folder = ensure_tiny_model()
    backend = TransformersBackend(CaseConfig())
    backend.load()
    for sampling in ("deterministic", "standard"):
        params = GenerateParams.from_case(CaseConfig(sampling=sampling, max_new_tokens=2))
        backend.generate([Request(0, "warm up"), Request(1, "the imports")], params=params)
    backend.close()
    return folder

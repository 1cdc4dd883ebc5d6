"""Keeping in-process pytester runs of llem tests working: load the engine once, up front.

``pytester.runpytest()`` runs pytest inside the current process and, afterwards, drops every
module the inner run imported. torch (and the tokenizers extension) cannot be imported a second
time into one process, so a second inner run that loads a model would crash. ``preload_engine``
therefore builds, loads and runs a throw-away copy of the built-in model once, so the engine's
modules are imported by the outer process and survive the inner runs. CodeCarbon (through pandas
and pyarrow) breaks the same way when imported twice, so its modules are imported once here as
well. Set ``LLEM_PYTESTER_PRELOAD=0`` to turn this off.

The plugin does not call it: pytest-llem's own tests do, from ``tests/conftest.py``, when a test
first asks for ``pytester``; a project that tests llem code in-process can do the same.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import tempfile
from pathlib import Path

__all__ = ["PRELOAD_ENV", "preload_engine"]

logger = logging.getLogger("pytest_llem")

PRELOAD_ENV = "LLEM_PYTESTER_PRELOAD"


def preload_engine() -> bool:
    """Import the transformers backend's whole stack by using it once on a temporary model.

    Returns:
        Whether the engine was loaded (False when torch or transformers is not installed, when
        turned off through ``LLEM_PYTESTER_PRELOAD=0``, or when it failed; failures are logged
        and never raised, since the inner runs will report them properly).
    """
    if os.environ.get(PRELOAD_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    _preload_codecarbon()
    if any(importlib.util.find_spec(name) is None for name in ("torch", "transformers")):
        return False
    from pytest_llem.backends.base import GenerateParams, Request
    from pytest_llem.backends.transformers import TransformersBackend
    from pytest_llem.config.models import CaseConfig
    from pytest_llem.data.tiny_model import build_tiny_model

    try:
        with tempfile.TemporaryDirectory(prefix="llem-preload-") as folder:
            model = Path(folder) / "model"
            build_tiny_model(model)
            backend = TransformersBackend(CaseConfig(model=str(model), device="cpu"))
            backend.load()
            try:
                for sampling in ("deterministic", "standard"):
                    case = CaseConfig(model=str(model), sampling=sampling, max_new_tokens=2)
                    backend.generate(
                        [Request(0, "warm"), Request(1, "up")],
                        params=GenerateParams.from_case(case),
                    )
            finally:
                backend.close()
    except Exception:
        logger.warning("pytest-llem could not preload its engine for pytester", exc_info=True)
        return False
    return True


def _preload_codecarbon() -> None:
    """Import CodeCarbon's tracker and the pandas parts it uses, where installed."""
    if importlib.util.find_spec("codecarbon") is None:
        return
    try:
        importlib.import_module("codecarbon")
        importlib.import_module("codecarbon.input")
        importlib.import_module("codecarbon.core.units")
    except Exception:
        logger.warning("pytest-llem could not preload codecarbon for pytester", exc_info=True)

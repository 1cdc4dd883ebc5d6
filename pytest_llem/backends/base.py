"""The Backend protocol: what every inference engine adapter provides.

A backend loads a model, generates completions for a batch of requests and reports, for each
request, the output token ids and the time each token became available. It never measures
energy and never computes metrics: the harness does both from what the backend reports.
``Request`` and ``Vocabulary`` live in :mod:`pytest_llem.data.requests` (the workloads build
requests without importing a backend) and are re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol, runtime_checkable

from pytest_llem.config.models import CaseConfig, SamplingConfig
from pytest_llem.data.requests import Request, Vocabulary

__all__ = [
    "Backend",
    "BackendCapabilities",
    "BackendInfo",
    "GenerateParams",
    "Generation",
    "MemoryUsage",
    "Request",
    "SchedulingBackend",
    "TokenCallback",
    "Vocabulary",
    "load_key",
]

#: Called as ``on_token(request_index, token_id, perf_counter_time)`` for each output token.
TokenCallback = Callable[[int, int, float], None]


@dataclass(frozen=True)
class GenerateParams:
    """Runtime settings shared by every request of one ``generate`` call."""

    max_new_tokens: int
    min_new_tokens: int | None = None
    max_input_tokens: int | None = None
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    seed: int = 0
    cache_implementation: str = "auto"

    @classmethod
    def from_case(cls, config: CaseConfig) -> GenerateParams:
        """The generation settings of a case."""
        return cls(
            max_new_tokens=config.max_new_tokens,
            min_new_tokens=config.min_new_tokens,
            max_input_tokens=config.max_input_tokens,
            sampling=config.sampling,
            seed=config.seed,
            cache_implementation=config.transformers.cache_implementation,
        )

    def for_request(self, request: Request) -> GenerateParams:
        """These settings for one request: a request with its own ``output_tokens`` generates
        exactly that many (``min_new_tokens == max_new_tokens``, end of sequence ignored)."""
        if request.output_tokens is None:
            return self
        return replace(
            self, max_new_tokens=request.output_tokens, min_new_tokens=request.output_tokens
        )

    def for_batch(self, requests: Sequence[Request]) -> tuple[GenerateParams, list[int] | None]:
        """Settings for a static batch, where every row runs as many steps as the longest.

        Returns:
            These settings and None when no request has its own ``output_tokens``; else
            settings that generate the longest request's length for every row (end of
            sequence ignored) and each row's own length, at which the engine cuts the row.
        """
        if all(request.output_tokens is None for request in requests):
            return self, None
        limits = [request.output_tokens or self.max_new_tokens for request in requests]
        longest = max(limits)
        return replace(self, max_new_tokens=longest, min_new_tokens=longest), limits


@dataclass
class Generation:
    """What a backend returns for one request.

    Times are ``time.perf_counter()`` seconds. ``token_times[i]`` is when output token ``i``
    became available to the caller; tokens delivered together in one chunk share a time.
    """

    request_index: int
    input_tokens: int
    output_token_ids: list[int]
    token_times: list[float]
    issued_at: float
    text: str | None = None

    @property
    def output_tokens(self) -> int:
        """Number of generated token ids (prompt and padding excluded)."""
        return len(self.output_token_ids)


@dataclass(frozen=True)
class BackendCapabilities:
    """What an engine can do; the harness and (later) sweeps consult it."""

    streaming: bool
    batching: bool
    devices: tuple[str, ...]
    dtypes: tuple[str, ...]
    #: The engine schedules requests itself (continuous batching) and offers ``submit``.
    scheduling: bool = False


@dataclass(frozen=True)
class BackendInfo:
    """Facts about a loaded backend, written into the run record."""

    name: str
    version: str | None
    device: str
    dtype: str
    model: str
    model_path: str | None = None
    parameters: int | None = None
    non_embedding_parameters: int | None = None
    load_seconds: float | None = None
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class MemoryUsage:
    """Peak memory over a window, with what was measured.

    ``device_used``: GPU memory an engine's processes hold (NVML), for engines whose model lives
    in processes of their own, where this process's allocator sees none of it.
    """

    peak_mb: float | None
    kind: Literal["cuda_allocated", "process_rss", "device_used", "unavailable"]
    note: str | None = None


@runtime_checkable
class Backend(Protocol):
    """Protocol of an inference engine adapter (one implementation per module)."""

    name: str
    capabilities: BackendCapabilities

    def load(self) -> BackendInfo:
        """Load the model; raises ModelLoadError or BackendNotAvailableError."""
        ...

    def generate(
        self,
        requests: Sequence[Request],
        *,
        params: GenerateParams,
        on_token: TokenCallback | None = None,
    ) -> list[Generation]:
        """Complete ``requests`` as one batch; one Generation per request, in order."""
        ...

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Prompt tokens of each text as ``generate`` would count them, before truncation.

        Counted by the model's own tokenizer, special tokens it adds (such as BOS) included.
        Only valid after :meth:`load`.
        """
        ...

    def vocabulary(self) -> Vocabulary:
        """The ids the loaded model accepts; only valid after :meth:`load`."""
        ...

    def synchronize(self) -> None:
        """Block until queued device work has finished (a window edge)."""
        ...

    def reset_peak_memory(self) -> None:
        """Start a new peak-memory interval."""
        ...

    def peak_memory(self) -> MemoryUsage:
        """Peak memory since the last reset."""
        ...

    def close(self) -> None:
        """Release the model and device memory."""
        ...


def load_key(config: CaseConfig) -> tuple[tuple[str, object], ...]:
    """The part of a case's config that decides which loaded model it can reuse."""
    from pytest_llem.config.models import load_fields

    dumped = config.model_dump()
    key: list[tuple[str, object]] = []
    for path in load_fields():
        node: object = dumped
        for part in path.split("."):
            node = node[part] if isinstance(node, dict) else None
        key.append((path, node))
    return tuple(key)


@runtime_checkable
class SchedulingBackend(Backend, Protocol):
    """Protocol of an engine that schedules requests itself (vLLM, TensorRT-LLM, a server).

    The server scenario hands it each request at its arrival with ``submit`` instead of
    forming batches, so the engine's own scheduler decides what runs together. The offline and
    single-stream scenarios still use ``generate``. A backend declares this with
    ``capabilities.scheduling = True``.
    """

    def submit(
        self,
        request: Request,
        *,
        params: GenerateParams,
        on_token: TokenCallback | None = None,
    ) -> Future[Generation]:
        """Start ``request`` now and return at once; the future completes with its Generation
        (token times as they streamed back)."""
        ...

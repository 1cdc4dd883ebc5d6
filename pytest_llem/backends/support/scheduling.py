"""A base for engines that schedule requests themselves (vLLM, TensorRT-LLM, a server).

Such an engine takes each request as it comes and returns a future; ``generate`` is then the
same for all of them: start every request at once so the engine's scheduler batches them,
gather the futures in order, and, when one fails or the wait is interrupted (a case timeout,
Ctrl-C), abandon the rest so they do not keep the engine busy behind the next window.
:func:`gather` is that last step alone, for a backend that starts its requests another way.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import TypeVar

from pytest_llem.backends.base import GenerateParams, Generation, TokenCallback
from pytest_llem.backends.support.adapter import EngineAdapter
from pytest_llem.backends.support.failures import require_loaded
from pytest_llem.data.requests import Request

__all__ = ["EngineScheduledBackend", "cancel_futures", "gather"]

_T = TypeVar("_T")


def cancel_futures(futures: Sequence[Future[_T]]) -> None:
    """Cancel each future (those already running or done are left as they are)."""
    for future in futures:
        future.cancel()


def gather(
    futures: Sequence[Future[_T]],
    *,
    abandon: Callable[[Sequence[Future[_T]]], None] = cancel_futures,
) -> list[_T]:
    """The results of ``futures``, in order.

    Args:
        futures: Work already started.
        abandon: Called with the futures not yet done when a result raises or the wait is
            interrupted; it stops their work (the default cancels them).

    Returns:
        One result per future.

    Raises:
        BaseException: The first failure, in order, after the rest were abandoned.
    """
    try:
        return [future.result() for future in futures]
    except BaseException:
        abandon([future for future in futures if not future.done()])
        raise


class EngineScheduledBackend(EngineAdapter, ABC):
    """Base of a backend whose engine schedules requests itself.

    A subclass sets ``name`` and implements :meth:`_loaded` and :meth:`_start`; it gets
    ``generate`` and ``submit`` of :class:`~pytest_llem.backends.base.SchedulingBackend`.
    It overrides :meth:`_abandon` when cancelling a future does not stop its request.
    """

    def generate(
        self,
        requests: Sequence[Request],
        *,
        params: GenerateParams,
        on_token: TokenCallback | None = None,
    ) -> list[Generation]:
        """Start every request at once and wait for all of them.

        Args:
            requests: The prompts: texts, or token ids (``Request.token_ids``); both are
                truncated to ``params.max_input_tokens``.
            params: Output lengths, input truncation, sampling and seed.
            on_token: Called as ``on_token(request.index, token_id, time)`` for every output
                token when it reaches this process (on the engine's own thread).

        Returns:
            One Generation per request, in order.

        Raises:
            BackendInferenceError: the backend is not loaded, a prompt is invalid, or the
                engine refused or failed a request.
            RetryableError: memory ran out.
        """
        self._require_loaded("generate")
        if not requests:
            return []
        futures = self._start(requests, params=params, on_token=on_token)
        return gather(futures, abandon=self._abandon)

    def submit(
        self,
        request: Request,
        *,
        params: GenerateParams,
        on_token: TokenCallback | None = None,
    ) -> Future[Generation]:
        """Hand ``request`` to the engine's scheduler now; the future completes with its
        Generation, so it joins whatever the engine is running (continuous batching).

        Raises:
            BackendInferenceError: the backend is not loaded (or, for some engines, the prompt
                is invalid; otherwise that comes back through the future).
        """
        self._require_loaded("submit")
        (future,) = self._start([request], params=params, on_token=on_token)
        return future

    def _require_loaded(self, what: str) -> None:
        require_loaded(True if self._loaded() else None, backend=self.name, what=what)

    @abstractmethod
    def _loaded(self) -> bool:
        """Whether the engine is running and takes requests."""

    @abstractmethod
    def _start(
        self,
        requests: Sequence[Request],
        *,
        params: GenerateParams,
        on_token: TokenCallback | None,
    ) -> list[Future[Generation]]:
        """Start ``requests`` (at least one) and return one future per request, in order."""

    def _abandon(self, futures: Sequence[Future[Generation]]) -> None:
        """Stop the requests of ``futures`` after another one failed."""
        cancel_futures(futures)

"""The thread that owns a vLLM engine, and the streams of the requests it runs.

vLLM's ``LLMEngine`` is not thread-safe, so one thread (:class:`EngineLoop`) makes every call
into it: jobs posted from other threads run between engine steps, and each step's output deltas
go to the :class:`EngineStream` of their request, stamped with the time the step returned. The
engine's start-up and shutdown helpers live here too, since they deal with the same objects.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib
import itertools
import logging
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

from pytest_llem.backends.base import Generation, TokenCallback
from pytest_llem.backends.steps import StepTimeline, StepWork
from pytest_llem.backends.support import engine_failure, first_line, load_errors
from pytest_llem.exceptions import (
    BackendInferenceError,
    LlemError,
)

__all__ = [
    "EngineLoop",
    "EngineStream",
    "cleanup_distributed",
    "engine_resource_warnings_quiet",
    "fail_future",
    "shutdown_engine",
    "start_engine",
]

logger = logging.getLogger("pytest_llem")

_NAME = "vllm"
_T = TypeVar("_T")


@dataclasses.dataclass
class EngineStream:
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
        """Take the tokens (and text) one engine step produced, all stamped ``now``."""
        for token in token_ids:
            self.token_ids.append(int(token))
            self.token_times.append(now)
            if self.on_token is not None:
                self.on_token(self.request_index, int(token), now)
        self.text.append(text)

    def finish(self) -> None:
        """Complete the future: with the Generation, or an error when a fixed output length
        was not met."""
        if self.expected_tokens is not None and len(self.token_ids) != self.expected_tokens:
            fail_future(
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


class EngineLoop:
    """Owns one vLLM engine: every call into it runs on this loop's one thread.

    Posted jobs run between engine steps; while requests are in flight the thread calls
    ``step()`` and dispatches each returned delta to its :class:`EngineStream`. It sleeps on a
    condition variable when there is nothing to do, so an idle engine costs no CPU here.
    """

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self._cond = threading.Condition()
        self._jobs: list[Callable[[], None]] = []
        self._active: dict[str, EngineStream] = {}
        self._closing = False
        self._failure: LlemError | None = None
        self._ids = itertools.count()
        #: Where each step is reported (set from any thread; read on the engine thread).
        self.timeline: StepTimeline | None = None
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

    def add(self, stream: EngineStream, prompt: dict[str, Any], sampling_params: Any) -> None:
        """On the engine thread: add one request to the engine and follow its stream."""
        if self._failure is not None:
            fail_future(stream.future, self._failure)
            return
        request_id = f"llem-{next(self._ids)}"
        try:
            self._engine.add_request(request_id, prompt, sampling_params)
        except Exception as e:
            fail_future(stream.future, engine_failure(e, backend=_NAME, what="adding a request"))
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
            started = time.perf_counter()
            outputs = self._engine.step()
        except Exception as e:
            self._failure = engine_failure(e, backend=_NAME, what="an engine step")
            self._drop(list(self._active), self._failure, abort=False)
            return
        now = time.perf_counter()
        timeline = self.timeline
        if timeline is not None:
            timeline.add(started, now, self._step_work(outputs))
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

    def _step_work(self, outputs: Sequence[Any]) -> list[StepWork]:
        """Each request's work in one step, from the step's outputs (before they are received).

        A request's first tokens come with its prefill: its prompt (less the tokens vLLM found
        in its prefix cache) counts in this step, even where chunked prefill spread it over
        earlier steps that returned nothing for it; every further token is a decode token.
        """
        work = []
        for output in outputs:
            stream = self._active.get(output.request_id)
            completions = output.outputs or []
            if stream is None or not completions:
                continue
            new = len(completions[0].token_ids)
            if stream.token_ids:
                work.append(StepWork(stream.request_index, 0, new))
                continue
            cached = getattr(output, "num_cached_tokens", None)
            prompt = stream.input_tokens - (cached if isinstance(cached, int) else 0)
            work.append(StepWork(stream.request_index, max(prompt, 0), max(new - 1, 0)))
        return work

    def _drop(self, request_ids: list[str], error: BaseException, *, abort: bool = True) -> None:
        streams = [self._active.pop(rid) for rid in request_ids if rid in self._active]
        if abort and request_ids:
            try:
                self._engine.abort_request(request_ids)
            except Exception:
                logger.debug("aborting vLLM requests failed", exc_info=True)
        for stream in streams:
            fail_future(stream.future, error)


@contextlib.contextmanager
def engine_resource_warnings_quiet() -> Iterator[None]:
    """Keep vLLM's own unclosed-resource warnings (zmq contexts of its start-up handshake) out
    of the user's tests, where ``-W error`` would turn them into failures; garbage is collected
    inside, so they are emitted here and not at some later, unrelated moment."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            yield
        finally:
            gc.collect()


def start_engine(vllm: Any, source: str, kwargs: dict[str, Any], *, model: str) -> Any:
    """Start ``vllm.LLM(source, **kwargs)``, its own resource warnings kept quiet.

    Raises:
        RetryableError: memory ran out while starting (device, host or KV cache).
        ModelLoadError: the engine failed to start for any other reason.
    """

    def describe(error: Exception) -> str:
        hint = ""
        if "engine core initialization failed" in str(error).lower():
            hint = " (the engine process's own error is in its log output above)"
        return (
            f"{_NAME}: cannot start the engine for {model!r}: "
            f"{type(error).__name__}: {first_line(error)}{hint}"
        )

    with (
        load_errors(backend=_NAME, model=model, describe=describe),
        engine_resource_warnings_quiet(),
    ):
        llm = vllm.LLM(source, **kwargs)
    return llm


def shutdown_engine(llm: Any) -> None:
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


def cleanup_distributed() -> None:
    """vLLM's own teardown of the process groups an in-process engine created."""
    try:
        parallel_state = importlib.import_module("vllm.distributed.parallel_state")
        cleanup = getattr(parallel_state, "cleanup_dist_env_and_memory", None)
        if callable(cleanup):
            cleanup()
    except Exception:
        logger.warning("vLLM's distributed cleanup failed", exc_info=True)


def fail_future(future: Future[Any], error: BaseException) -> None:
    """Complete ``future`` with ``error`` unless it is already done."""
    if not future.done():
        future.set_exception(error)

"""A deterministic fake Backend and the fake clock it shares with the fake meters.

The backend behaves like a real engine on a scripted timeline: each ``generate`` call takes
``prefill_s`` to its first token, then ``step_s`` per further token, delivered in chunks of
``chunk`` tokens that share one timestamp, and advances the shared clock by that much. Every
call is recorded in an event log the tests assert on. A prompt's tokens are its words (or its
``token_ids`` when the request carries them), counted the same way by ``count_tokens``.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Mapping, Sequence

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
from pytest_llem.backends.steps import StepTimeline, StepWork
from pytest_llem.exceptions import BackendInferenceError

__all__ = ["FakeBackend", "FakeClock", "SchedulingFakeBackend", "WallClock"]


class FakeClock:
    """A clock that only moves when told to; call it like ``time.perf_counter``."""

    def __init__(self, start: float = 1024.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``."""
        if seconds < 0:
            raise ValueError("time does not go backwards")
        self.now += seconds


class WallClock(FakeClock):
    """The real clock (``time.perf_counter``), for a :class:`FakeBackend` whose pace the test
    sets: ``advance`` waits until the scripted time has passed, so what the backend reports
    matches the wall clock the runner and the meters see (never faster; later on a loaded
    machine, as a real engine would be)."""

    def __init__(self) -> None:
        super().__init__(time.perf_counter())

    def __call__(self) -> float:
        return time.perf_counter()

    def advance(self, seconds: float) -> None:
        """Wait ``seconds`` of wall-clock time."""
        if seconds < 0:
            raise ValueError("time does not go backwards")
        until = time.perf_counter() + seconds
        while (left := until - time.perf_counter()) > 0:
            time.sleep(left)


class FakeBackend:
    """A Backend whose token times follow a script on a :class:`FakeClock`.

    Args:
        clock: The shared clock; ``generate`` and ``synchronize`` advance it.
        events: Shared event log (``generate:4``, ``synchronize``, ...).
        prefill_s: Time from a batch's issue to its first output token.
        step_s: Time between consecutive output tokens of a request.
        chunk: Tokens delivered together (same timestamp) at the end of each chunk.
        lengths: Output tokens per request index; ``max_new_tokens`` for the others.
        sync_s: Time ``synchronize`` takes (queued device work finishing).
        peak_mb: What ``peak_memory`` reports.
        fail_on_call: Raise BackendInferenceError on this (1-based) ``generate`` call.
        vocab_size: Size of the fake vocabulary; ids 0, 1 and 2 are its special tokens.
    """

    name = "fake"
    capabilities = BackendCapabilities(
        streaming=True, batching=True, devices=("cpu",), dtypes=("float32",)
    )

    def __init__(
        self,
        clock: FakeClock,
        events: list[str] | None = None,
        *,
        prefill_s: float = 0.125,
        step_s: float = 0.03125,
        chunk: int = 1,
        lengths: Mapping[int, int] | None = None,
        sync_s: float = 0.0,
        peak_mb: float | None = 512.0,
        fail_on_call: int | None = None,
        vocab_size: int = 32000,
    ) -> None:
        self.clock = clock
        self.events = events if events is not None else []
        self.prefill_s = prefill_s
        self.step_s = step_s
        self.chunk = chunk
        self.lengths = dict(lengths or {})
        self.sync_s = sync_s
        self.peak_mb = peak_mb
        self.fail_on_call = fail_on_call
        self.vocab_size = vocab_size
        self.batches: list[list[int]] = []
        self.count_calls: list[int] = []  # number of texts of each count_tokens call
        self.loaded = False
        self.timeline: StepTimeline | None = None

    def record_steps(self, timeline: StepTimeline | None) -> None:
        """Report each scripted step (the prefill, then one per further token) to ``timeline``."""
        self.timeline = timeline

    def _report_steps(self, issued: float, out: Sequence[Generation]) -> None:
        """One prefill step producing every row's first token, then one decode step per further
        token (the rows still generating)."""
        if self.timeline is None or not out:
            return
        prefill_end = issued + self.prefill_s
        self.timeline.add(
            issued, prefill_end, [StepWork(g.request_index, g.input_tokens, 0) for g in out]
        )
        longest = max(g.output_tokens for g in out)
        for i in range(1, longest):
            start = prefill_end + (i - 1) * self.step_s
            work = [StepWork(g.request_index, 0, 1) for g in out if g.output_tokens > i]
            self.timeline.add(start, start + self.step_s, work)

    def load(self) -> BackendInfo:
        self.loaded = True
        return BackendInfo(
            name=self.name, version="0", device="cpu", dtype="float32", model="fake",
            parameters=2000, non_embedding_parameters=1000,
        )  # fmt: skip

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        self._check_loaded("count_tokens")
        self.count_calls.append(len(texts))
        return [len(text.split()) for text in texts]

    def vocabulary(self) -> Vocabulary:
        self._check_loaded("vocabulary")
        return Vocabulary(size=self.vocab_size, special_ids=frozenset({0, 1, 2}))

    def _check_loaded(self, what: str) -> None:
        if not self.loaded:
            raise BackendInferenceError(f"fake: {what}() called before load()")

    def _token_times(self, issued: float, n: int) -> list[float]:
        """Token i is produced at issued + prefill + i*step and delivered with its chunk."""
        times = []
        for i in range(n):
            last_of_chunk = min((i // self.chunk + 1) * self.chunk - 1, n - 1)
            times.append(issued + self.prefill_s + last_of_chunk * self.step_s)
        return times

    def generate(
        self,
        requests: Sequence[Request],
        *,
        params: GenerateParams,
        on_token: TokenCallback | None = None,
    ) -> list[Generation]:
        self.events.append(f"generate:{len(requests)}")
        self.batches.append([r.index for r in requests])
        if self.fail_on_call == len(self.batches):
            raise BackendInferenceError("scripted failure")
        issued = self.clock()
        out: list[Generation] = []
        for r in requests:
            n = self.lengths.get(r.index, params.for_request(r).max_new_tokens)
            prompt = len(r.token_ids) if r.token_ids is not None else len(r.prompt.split())
            out.append(
                Generation(
                    request_index=r.index,
                    input_tokens=min(prompt, params.max_input_tokens or prompt),
                    output_token_ids=[(r.index * 1000 + i) % self.vocab_size for i in range(n)],
                    token_times=self._token_times(issued, n),
                    issued_at=issued,
                )
            )
        events = sorted(
            (t, g.request_index, tok)
            for g in out
            for t, tok in zip(g.token_times, g.output_token_ids, strict=True)
        )
        end = max((e[0] for e in events), default=issued)
        self._report_steps(issued, out)
        self.clock.advance(end - issued)
        if on_token is not None:
            for t, index, tok in events:
                on_token(index, tok, t)
        return out

    def synchronize(self) -> None:
        self.events.append("synchronize")
        self.clock.advance(self.sync_s)

    def reset_peak_memory(self) -> None:
        self.events.append("reset_peak_memory")

    def peak_memory(self) -> MemoryUsage:
        self.events.append("peak_memory")
        if self.peak_mb is None:
            return MemoryUsage(peak_mb=None, kind="unavailable", note="fake: no memory figure")
        return MemoryUsage(peak_mb=self.peak_mb, kind="process_rss")

    def close(self) -> None:
        self.loaded = False


class SchedulingFakeBackend(FakeBackend):
    """A fake engine with its own scheduler, on the real clock: every submitted request runs at
    once on its own thread, ``prefill_s`` to its first token and ``step_s`` per further token,
    so requests overlap as they would under continuous batching."""

    capabilities = BackendCapabilities(
        streaming=True,
        batching=True,
        devices=("cpu",),
        dtypes=("float32",),
        scheduling=True,
    )

    def __init__(self, *, prefill_s: float = 0.05, step_s: float = 0.01) -> None:
        import concurrent.futures

        super().__init__(FakeClock(), prefill_s=prefill_s, step_s=step_s)
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=64)
        self.submitted: list[int] = []
        self.running = 0
        self.peak_running = 0

    def submit(
        self,
        request: Request,
        *,
        params: GenerateParams,
        on_token: TokenCallback | None = None,
    ) -> concurrent.futures.Future[Generation]:
        import threading
        import time

        lock = getattr(self, "_lock", None) or threading.Lock()
        self._lock = lock
        self.submitted.append(request.index)
        issued = time.perf_counter()
        params = params.for_request(request)

        def work() -> Generation:
            with lock:
                self.running += 1
                self.peak_running = max(self.peak_running, self.running)
            try:
                times = []
                time.sleep(self.prefill_s)
                for i in range(params.max_new_tokens):
                    if i:
                        time.sleep(self.step_s)
                    times.append(time.perf_counter())
                return Generation(
                    request_index=request.index,
                    input_tokens=len(request.prompt.split()),
                    output_token_ids=[7] * params.max_new_tokens,
                    token_times=times,
                    issued_at=issued,
                )
            finally:
                with lock:
                    self.running -= 1

        return self.pool.submit(work)

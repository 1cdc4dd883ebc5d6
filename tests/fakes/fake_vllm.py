"""A fake of vLLM's V1 ``LLMEngine`` step loop, for the vLLM backend's engine-thread logic.

It keeps the real engine's contract as the backend uses it: ``add_request`` queues a request,
``step()`` runs one scheduler iteration over every unfinished request and returns one
``RequestOutput``-like object per request that produced tokens (deltas, as with
``RequestOutputKind.DELTA``), ``finished`` on the last one; ``step()`` on an engine with nothing
to do blocks, as the multiprocess engine's ``get_output()`` does. Tests of the real engine are in
``tests/test_vllm_backend.py``.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["FakeCompletion", "FakeEngine", "FakeOutput", "FakeSamplingParams"]


@dataclass(frozen=True)
class FakeSamplingParams:
    """The fields of ``vllm.SamplingParams`` the fake reads."""

    max_tokens: int
    min_tokens: int = 0
    ignore_eos: bool = False
    eos_after: int | None = None  # the fake model emits end-of-sequence after this many tokens


@dataclass
class FakeCompletion:
    """``vllm.CompletionOutput`` with delta token ids and text."""

    token_ids: list[int]
    text: str


@dataclass
class FakeOutput:
    """``vllm.RequestOutput``."""

    request_id: str
    outputs: list[FakeCompletion]
    finished: bool


@dataclass
class _Running:
    prompt: list[int]
    params: FakeSamplingParams
    generated: int = 0


EOS = 2


@dataclass
class FakeEngine:
    """Each step gives every running request one token: ``100 + prompt length + position``.

    ``step_s`` is how long a step takes; ``fail_with`` makes the next step raise it;
    ``lose_requests`` makes the engine forget its requests (a broken engine).
    """

    step_s: float = 0.001
    fail_with: BaseException | None = None
    lose_requests: bool = False
    steps: int = 0
    added: list[str] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    threads: set[str] = field(default_factory=set)
    _running: dict[str, _Running] = field(default_factory=dict)

    def add_request(self, request_id: str, prompt: dict[str, Any], params: Any) -> str:
        self.threads.add(threading.current_thread().name)
        ids = list(prompt["prompt_token_ids"])
        if not ids:
            raise ValueError("The decoder prompt cannot be empty")
        self._running[request_id] = _Running(ids, params)
        self.added.append(request_id)
        return request_id

    def has_unfinished_requests(self) -> bool:
        if self.lose_requests:
            self._running.clear()
        return bool(self._running)

    def abort_request(self, request_ids: list[str], internal: bool = False) -> None:
        for request_id in request_ids:
            if self._running.pop(request_id, None) is not None:
                self.aborted.append(request_id)

    def step(self) -> list[FakeOutput]:
        self.threads.add(threading.current_thread().name)
        if self.fail_with is not None:
            error, self.fail_with = self.fail_with, None
            raise error
        while not self._running:  # the multiprocess engine blocks on its output queue
            time.sleep(0.01)
        time.sleep(self.step_s)
        self.steps += 1
        outputs = []
        for request_id, request in list(self._running.items()):
            params = request.params
            token = 100 + len(request.prompt) + request.generated
            request.generated += 1
            eos = params.eos_after is not None and request.generated >= params.eos_after
            if eos and not params.ignore_eos and request.generated >= params.min_tokens:
                token = EOS
            finished = request.generated >= params.max_tokens or token == EOS
            outputs.append(
                FakeOutput(request_id, [FakeCompletion([token], f"<{token}>")], finished)
            )
            if finished:
                del self._running[request_id]
        return outputs

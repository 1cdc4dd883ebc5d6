"""An asyncio event loop on a thread of its own, for engines whose client API is asynchronous.

A backend's ``generate`` and ``submit`` are called from the harness's thread and return
:class:`concurrent.futures.Future` objects; the engine's streams (TensorRT-LLM's
``generate_async``, an HTTP client's responses) are read as coroutines on this loop, so a
token's time is taken the moment its chunk reaches this process.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["EventLoopThread"]

logger = logging.getLogger("pytest_llem")

_T = TypeVar("_T")


class EventLoopThread:
    """An asyncio event loop running on a daemon thread.

    Args:
        name: The thread's name (shown in thread dumps and by ``faulthandler``).
    """

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coroutine: Coroutine[Any, Any, _T]) -> concurrent.futures.Future[_T]:
        """Schedule ``coroutine`` on the loop; the future completes with its result, and
        cancelling the future cancels the coroutine's task."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def cancel_all(self, timeout_s: float = 10.0) -> None:
        """Cancel every task still running on the loop and wait up to ``timeout_s`` for them."""
        if self.loop.is_closed():
            return
        try:
            self.submit(_cancel_other_tasks(timeout_s / 2)).result(timeout=timeout_s)
        except (concurrent.futures.TimeoutError, RuntimeError):
            logger.warning("tasks did not stop within %.0f s", timeout_s, exc_info=True)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the loop, wait for its thread and close the loop; a second call does nothing."""
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=timeout_s)
        if not self._thread.is_alive():
            self.loop.close()


async def _cancel_other_tasks(timeout_s: float) -> None:
    current = asyncio.current_task()
    tasks = [task for task in asyncio.all_tasks() if task is not current]
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=timeout_s)

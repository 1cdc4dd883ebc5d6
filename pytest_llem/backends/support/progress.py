"""Progress lines of slow backend steps (building a model, starting an engine).

They go to the ``pytest_llem`` logger and to the callback the session gives a backend, which
shows them in the terminal the way pytest users expect.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

__all__ = ["ProgressCallback", "report"]

logger = logging.getLogger("pytest_llem")

#: Called with one short line of text per step.
ProgressCallback = Callable[[str], None]


def report(progress: ProgressCallback | None, message: str) -> None:
    """Log ``message`` and hand it to ``progress`` when there is one."""
    logger.info(message)
    if progress is not None:
        progress(message)

"""An xdist scheduler that keeps each model-load group on one worker.

xdist's own ``loadgroup`` scheduling reads the group from a ``@group`` suffix that workers add to
node ids, which pytest 9.2 no longer lets them change. So each worker writes the group of every
llem case (node id -> group) to a file the controller named (see ``xdist_scheduling``), and this
scheduler reads it: the cases of one load configuration form one unit of work, and other tests
are spread one by one. Imported only by xdist's own hooks, so only when pytest-xdist is installed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from xdist.scheduler import LoadGroupScheduling

__all__ = ["ModelGroupScheduling"]

logger = logging.getLogger("pytest_llem")


class ModelGroupScheduling(LoadGroupScheduling):  # type: ignore[misc]
    """``loadgroup`` scheduling with the groups read from the workers' file."""

    def __init__(self, config: pytest.Config, log: Any, groups_file: Path) -> None:
        super().__init__(config, log)
        self._groups_file = groups_file
        self._groups: dict[str, str] | None = None

    def _group_of(self, nodeid: str) -> str | None:
        if self._groups is None:
            try:
                self._groups = json.loads(self._groups_file.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                logger.warning("llem: no model-load groups from the workers; scheduling per test")
                self._groups = {}
        return self._groups.get(nodeid)

    def _split_scope(self, nodeid: str) -> str:
        group = self._group_of(nodeid)
        return group if group is not None else str(super()._split_scope(nodeid))

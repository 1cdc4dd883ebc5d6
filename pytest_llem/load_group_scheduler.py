"""An xdist scheduler that keeps each model-load group on one worker.

xdist's own ``loadgroup`` scheduling reads the group from a ``@group`` suffix that workers add to
node ids, which pytest 9.2 no longer lets them change. So each worker writes the group of every
llem case (node id -> group) to a file the controller named (see ``xdist_scheduling``), and this
scheduler reads it: the cases of one load configuration form one unit of work, and other tests
are spread one by one. Imported only by xdist's own hooks, so only when pytest-xdist is installed.

A worker that dies (a CUDA fault, the kernel's out-of-memory killer) takes only the case it was
running: xdist's scope scheduling would hand that case, with the rest of its unit, to every
replacement worker until the restarts run out; here the crashed case is marked done, and only
the rest of its unit goes back in the queue (its model is loaded again wherever it lands).
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

    def load_group(self, nodeid: str) -> str | None:
        """The model-load group of an llem case (None: not an llem case, or no groups)."""
        return self._group_of(nodeid)

    def remove_node(self, node: Any) -> str | None:
        """Drop a finished or crashed worker; give the rest of a crashed worker's work, but not
        the case it died on, to the other workers.

        Returns:
            The node id of the case the worker was running when it crashed, or None.
        """
        workload: dict[str, dict[str, bool]] = self.assigned_work.pop(node)
        # The worker runs its cases in the order it was sent them: the first one not done is
        # the one it died on.
        crashed = next(
            (nodeid for unit in workload.values() for nodeid, done in unit.items() if not done),
            None,
        )
        if crashed is None:
            return None
        for scope, unit in workload.items():
            if crashed in unit:
                unit[crashed] = True  # never handed out again: xdist reports it as crashed
            if not all(unit.values()):
                self.workqueue[scope] = unit
        for other in self.assigned_work:
            self._reschedule(other)
        return crashed

"""Reports rendered from a run record (terminal table now; HTML and CSV later)."""

from __future__ import annotations

from pytest_llem.report.terminal import summary_lines

__all__ = ["summary_lines"]

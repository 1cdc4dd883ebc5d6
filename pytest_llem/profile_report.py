"""What the terminal says about the run's workload profile: the header line (which profile and
why) and, before a standard or full run, the estimate of how long it will take."""

from __future__ import annotations

from typing import Any

import pytest

from pytest_llem.collection import resolve_for, sweep_case_of
from pytest_llem.exceptions import LlemError
from pytest_llem.options import LlemOptions
from pytest_llem.session import LlemSession

__all__ = ["estimate_line", "header_lines", "write_estimate"]

#: Profiles whose run is long enough to announce its estimated duration.
_ANNOUNCED = ("standard", "full")
_BASELINE_S = 5.0


def header_lines(options: LlemOptions) -> list[str]:
    """The header line: ``llem profile: standard (auto: a CUDA GPU is present (/dev/nvidia0))``."""
    profile = options.profile
    return [f"llem profile: {profile.name} ({profile.reason})"]


def estimate_line(items: list[pytest.Item], session: LlemSession) -> str | None:
    """The estimated duration of the llem cases among ``items``, or None when there are none.

    Each case's estimate is :func:`pytest_llem.data.estimate.case_seconds`; each distinct model
    load adds its load time, and the idle baseline its few seconds.
    """
    from pytest_llem.backends.base import load_key
    from pytest_llem.data.estimate import H100_8B, case_seconds

    total, cases, loads = 0.0, 0, set()
    for item in items:
        if "llem" not in getattr(item, "fixturenames", ()) or item.get_closest_marker("skip"):
            continue
        try:
            config = resolve_for(item, session, {}, sweep_case_of(item))
        except LlemError:
            continue  # reported as the test's own error when it runs
        total += case_seconds(config)
        loads.add(repr(load_key(config)))
        cases += 1
    if not cases:
        return None
    total += len(loads) * H100_8B.load_s + _BASELINE_S
    return (
        f"llem profile {session.options.profile.name}: {cases} cases, estimated "
        f"{_duration(total)} for {H100_8B.name} (an estimate: other models, engines and GPUs "
        "differ; docs/profiles.md)"
    )


def write_estimate(config: pytest.Config, items: list[pytest.Item], session: LlemSession) -> None:
    """Print the estimate before a standard or full run starts (not on an xdist worker)."""
    if session.options.profile.name not in _ANNOUNCED or hasattr(config, "workerinput"):
        return
    reporter: Any = config.pluginmanager.get_plugin("terminalreporter")
    line = estimate_line(items, session)
    if reporter is not None and line is not None:
        reporter.write_line(line)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"

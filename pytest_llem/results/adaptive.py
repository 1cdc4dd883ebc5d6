"""Adaptive repetitions (``repeat="auto"``): the plan, its looks, and what a case records.

A case with ``repeat="auto"`` measures windows until its figures are good enough, looking at
them only at the windows of a fixed schedule (:func:`look_schedule`: the first look after
:data:`FIRST_LOOK` windows, then each about :data:`LOOK_GROWTH` times the last, and always at
the maximum). Every look uses the same Bonferroni-corrected confidence level
(:attr:`AdaptivePlan.confidence`: 1 - 0.05 / the number of planned looks), so the chance that
any look of an A/A comparison calls a regression stays at most the nominal 5% however many
looks are taken; the gate's final verdict uses that same level. The rules each look applies
are in :mod:`pytest_llem.results.adaptive_rule`. This module imports only Pydantic, so the run
record's models can hold :class:`AdaptiveRecord`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "AUTO",
    "DEFAULT_MAX_REPEAT",
    "DEFAULT_TARGET_CI",
    "FIRST_LOOK",
    "LOOK_GROWTH",
    "NOMINAL_ALPHA",
    "STOP_REASONS",
    "AdaptivePlan",
    "AdaptiveRecord",
    "StopReason",
    "look_schedule",
]

#: The value of ``repeat`` (and ``--llem-repeat``) that asks for adaptive repetitions.
AUTO = "auto"
#: ``--llem-max-repeat``'s default: the most windows an adaptive case measures.
DEFAULT_MAX_REPEAT = 30
#: ``--llem-target-ci``'s default: the relative half-width of the interval to reach, 5%.
DEFAULT_TARGET_CI = 0.05
#: Windows measured before the first look: fewer give no interval (METRICS.md, n < 3).
FIRST_LOOK = 3
#: Each look comes after about this many times the windows of the one before.
LOOK_GROWTH = 1.5
#: The false-alarm rate the looks together are held to (that of one 95% interval).
NOMINAL_ALPHA = 0.05

#: Why an adaptive case stopped: its gated verdicts were decided, its intervals reached the
#: target, or it reached ``--llem-max-repeat`` or ``--llem-max-case-s``.
StopReason = Literal["decided", "target_ci", "max_repeat", "max_case_s"]
STOP_REASONS: tuple[StopReason, ...] = ("decided", "target_ci", "max_repeat", "max_case_s")


def look_schedule(max_repeat: int, first: int = FIRST_LOOK) -> tuple[int, ...]:
    """The window counts after which an adaptive case looks at its figures.

    Growing geometrically keeps the looks few (7 for 30 windows: 3, 5, 8, 12, 18, 27, 30), so
    the Bonferroni correction over them costs little width, while a clear case still stops
    after 3 windows.

    Args:
        max_repeat: The most windows (the last look).
        first: Windows before the first look.

    Returns:
        Increasing window counts ending at ``max_repeat``.
    """
    if max_repeat <= first:
        return (max_repeat,)
    looks = [first]
    while True:
        following = max(looks[-1] + 1, math.ceil(looks[-1] * LOOK_GROWTH))
        if following >= max_repeat:
            break
        looks.append(following)
    looks.append(max_repeat)
    return tuple(looks)


@dataclass(frozen=True)
class AdaptivePlan:
    """The limits of adaptive repetitions (``--llem-max-repeat``, ``--llem-max-case-s``,
    ``--llem-target-ci``).

    Attributes:
        max_repeat: The most windows a case measures (at least :data:`FIRST_LOOK`).
        max_case_s: The most seconds a case's warmup and windows may take before it stops
            adding windows (None: no limit); at least :data:`FIRST_LOOK` windows always run.
        target_ci: Without a gate, the relative half-width every reported metric's interval
            must reach (0.05 is 5%).
    """

    max_repeat: int = DEFAULT_MAX_REPEAT
    max_case_s: float | None = None
    target_ci: float = DEFAULT_TARGET_CI

    @property
    def looks(self) -> tuple[int, ...]:
        """The window counts of the looks (:func:`look_schedule`)."""
        return look_schedule(self.max_repeat)

    @property
    def confidence(self) -> float:
        """The level of every look's interval: 1 - 0.05 / the number of planned looks."""
        return 1.0 - NOMINAL_ALPHA / len(self.looks)


class AdaptiveRecord(BaseModel):
    """How an adaptive case (``repeat="auto"``) chose its number of windows."""

    model_config = ConfigDict(extra="forbid")

    windows: int = Field(description="Measured windows.")
    stop_reason: StopReason = Field(
        description="decided (every gated verdict was decided), target_ci (every reported "
        "metric's interval reached the target), max_repeat or max_case_s (a limit was reached)."
    )
    rule: Literal["gate", "target_ci"] = Field(
        description="What the looks waited for: the gate's verdicts (a baseline case and "
        "--llem-fail-on) or the target interval width."
    )
    looks: list[int] = Field(
        default_factory=list, description="The window counts at which the case looked."
    )
    planned_looks: int = Field(description="Looks in the schedule up to max_repeat.")
    confidence: float = Field(
        description="Level of every look's interval and of the gate's final verdict "
        "(Bonferroni over the planned looks: 1 - 0.05 / planned_looks)."
    )
    max_repeat: int
    max_case_s: float | None = None
    target_ci: float | None = Field(
        default=None, description="Relative half-width asked for (rule target_ci only)."
    )
    elapsed_s: float | None = Field(default=None, description="Seconds of warmup and windows, s.")
    pending: list[str] = Field(
        default_factory=list,
        description="What was still undecided, or wider than the target, when it stopped.",
    )

    @property
    def summary(self) -> str:
        """``7 windows, decided`` or ``30 windows, max_repeat (ttft_ms.p50 ±7.1%)``."""
        plural = "" if self.windows == 1 else "s"
        pending = f" ({'; '.join(self.pending)})" if self.pending else ""
        return f"{self.windows} window{plural}, {self.stop_reason}{pending}"

"""When an adaptive case (``repeat="auto"``) stops adding windows.

:class:`AdaptiveStop` is asked after every window. At the windows of the plan's look schedule
it applies the gate rule (a baseline case and ``--llem-fail-on`` rules: stop once every gated
verdict is decided) or, without a gate, the width rule (stop once every reported metric's
interval is narrower than ``--llem-target-ci``), both from
:mod:`pytest_llem.results.adaptive_rule` at the plan's corrected level; between looks it stops
only at ``--llem-max-repeat`` or when the next window would overrun ``--llem-max-case-s``. The
runner (:mod:`pytest_llem.harness.runner`) owns the windows; this module only decides.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from pytest_llem.harness.window import Clock
from pytest_llem.results.adaptive import FIRST_LOOK, AdaptivePlan, AdaptiveRecord, StopReason
from pytest_llem.results.adaptive_rule import Look, gate_look, width_look
from pytest_llem.results.gate import GateRule
from pytest_llem.results.models import CaseRecord, RepetitionRecord

__all__ = ["AdaptiveStop"]


@dataclass
class AdaptiveStop:
    """Decides, window by window, when an adaptive case has measured enough.

    Args:
        plan: The limits and the look schedule.
        clock: The case's wall clock (the runner's).
        baseline: The baseline's record of this case, when the run is gated (None: no gate,
            or the baseline lacks the case).
        rules: The ``--llem-fail-on`` rules (empty: no gate).
        gate_estimated: Whether estimated energy gates.
    """

    plan: AdaptivePlan
    clock: Clock
    baseline: CaseRecord | None = None
    rules: Sequence[GateRule] = ()
    gate_estimated: bool = False
    _started: float | None = field(default=None, init=False)
    _looks: list[int] = field(default_factory=list, init=False)
    _last: Look | None = field(default=None, init=False)
    _rule: Literal["gate", "target_ci"] = field(default="target_ci", init=False)

    def start(self) -> None:
        """Start the case's time budget (before the warmup)."""
        self._started = self.clock()

    @property
    def elapsed_s(self) -> float:
        """Seconds since :meth:`start`."""
        return 0.0 if self._started is None else self.clock() - self._started

    def after(self, repetitions: Sequence[RepetitionRecord], window_s: float) -> StopReason | None:
        """Whether to stop after the windows so far, and why.

        Args:
            repetitions: The windows measured so far.
            window_s: How long the last one took: the next is expected to take as long.

        Returns:
            The stop reason, or None to measure another window.
        """
        count = len(repetitions)
        if count in self.plan.looks:
            look = self._look(repetitions)
            self._looks.append(count)
            if look.done:
                return "decided" if self._rule == "gate" else "target_ci"
        if count >= self.plan.max_repeat:
            return "max_repeat"
        budget = self.plan.max_case_s
        if budget is not None and count >= FIRST_LOOK and self.elapsed_s + window_s > budget:
            # the comparison looks once more at these windows: still within the planned looks,
            # since the schedule's last look (max_repeat) is never reached
            self._look(repetitions)
            self._looks.append(count)
            return "max_case_s"
        return None

    def _look(self, repetitions: Sequence[RepetitionRecord]) -> Look:
        confidence = self.plan.confidence
        look: Look | None = None
        if self.baseline is not None and self.rules:
            look = gate_look(
                self.baseline,
                repetitions,
                self.rules,
                confidence=confidence,
                gate_estimated=self.gate_estimated,
            )
        if look is not None and look.judged:
            self._rule = "gate"
        else:  # no gate, or nothing it could judge: the intervals' width decides
            self._rule = "target_ci"
            look = width_look(repetitions, target=self.plan.target_ci, confidence=confidence)
        self._last = look
        return look

    def record(self, windows: int, reason: StopReason) -> AdaptiveRecord:
        """What the record keeps of the case's adaptive repetitions."""
        return AdaptiveRecord(
            windows=windows,
            stop_reason=reason,
            rule=self._rule,
            looks=list(self._looks),
            planned_looks=len(self.plan.looks),
            confidence=self.plan.confidence,
            max_repeat=self.plan.max_repeat,
            max_case_s=self.plan.max_case_s,
            target_ci=self.plan.target_ci if self._rule != "gate" else None,
            elapsed_s=self.elapsed_s,
            pending=list(self._last.pending) if self._last is not None else [],
        )

"""Prefill energy by subtraction, next to the attributed one (the ``prefill_check`` parameter).

optimum-benchmark measures prefill energy as the energy of a generate with one new token per
request. With ``prefill_check=True`` the runner does the same once the measured windows are done: per
repetition the requests run again, each generating one token, in a window of their own
(lengthened by rounds like any other), and the repetition gets ``subtraction_prefill_energy_j`` (per round)
and ``prefill_attribution_diff``, the attributed prefill energy's relative difference from it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from pytest_llem.backends.base import Backend, GenerateParams, Request
from pytest_llem.config.models import CaseConfig
from pytest_llem.harness.metrics import combine_energy
from pytest_llem.harness.scenarios import Workload, build_workload
from pytest_llem.harness.window import Clock, WindowPolicy
from pytest_llem.meters.base import EnergyMeter
from pytest_llem.results.models import RepetitionRecord

__all__ = ["PREFILL_CHECK_METRICS", "PrefillCheck"]

#: The figures a repetition gets from the check.
PREFILL_CHECK_METRICS: tuple[str, ...] = (
    "subtraction_prefill_energy_j",
    "prefill_attribution_diff",
)


@dataclasses.dataclass
class PrefillCheck:
    """The one-token workload of a case and the meters it is measured with."""

    backend: Backend
    meters: Sequence[EnergyMeter]
    workload: Workload
    clock: Clock
    policy: WindowPolicy
    assignment: Mapping[str, str] | None

    @classmethod
    def for_case(
        cls,
        *,
        backend: Backend,
        meters: Sequence[EnergyMeter],
        config: CaseConfig,
        requests: Sequence[Request],
        scenario: str,
        clock: Clock,
        policy: WindowPolicy,
        assignment: Mapping[str, str] | None,
    ) -> PrefillCheck:
        """The check of a case: its requests, each generating exactly one token."""
        one = dataclasses.replace(
            GenerateParams.from_case(config), max_new_tokens=1, min_new_tokens=1
        )
        workload = build_workload(
            scenario,
            backend=backend,
            requests=[dataclasses.replace(r, output_tokens=None) for r in requests],
            params=one,
            config=config,
            clock=clock,
        )
        return cls(backend, meters, workload, clock, policy, assignment)

    def measure(self, repetitions: Sequence[RepetitionRecord]) -> None:
        """Measure one one-token window per repetition; add its figures to the repetition's
        values."""
        from pytest_llem.harness.runner import measure_extended_window

        for repetition in repetitions:
            window = measure_extended_window(
                self.backend, self.meters, self.workload, self.clock, 1, self.policy
            )
            total = combine_energy(window.readings, self.assignment).total_j
            subtraction = None if total is None else total / window.rounds
            attributed = repetition.values.get("prefill_energy_j")
            diff = None
            if subtraction and attributed is not None:
                diff = (attributed - subtraction) / subtraction
            repetition.values["subtraction_prefill_energy_j"] = subtraction
            repetition.values["prefill_attribution_diff"] = diff

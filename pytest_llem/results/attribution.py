"""Records of the energy attributed inside one window: per request and per phase.

The harness (:mod:`pytest_llem.harness.attribution`) fills these; a repetition carries one
:class:`RequestEnergyRecord` per measured request in ``per_request`` and an
:class:`AttributionRecord` with the fit of step energy on step tokens. By construction the
requests' ``energy_j`` plus ``unattributed_energy_j`` equal the window's ``energy_j`` (and the
same per round), and each request's ``prefill_energy_j + decode_energy_j`` is its ``energy_j``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["AttributionRecord", "CoefficientRecord", "RequestEnergyRecord"]


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RequestEnergyRecord(_Record):
    """One measured request: its tokens, latencies and attributed energy (J, None: no energy
    was measured for the window)."""

    index: int
    round: int = Field(default=0, description="The round of the workload inside the window.")
    input_tokens: int
    output_tokens: int
    ttft_ms: float | None = None
    e2e_ms: float | None = None
    energy_j: float | None = None
    prefill_energy_j: float | None = None
    decode_energy_j: float | None = None


class CoefficientRecord(_Record):
    """A fitted energy per token (J/token) with its 95% interval (None: not identifiable)."""

    value: float | None = None
    ci95_low: float | None = None
    ci95_high: float | None = None


class AttributionRecord(_Record):
    """How one window's energy was attributed: the fit, the timeline and power it used.

    ``energy_per_prefill_token_j`` / ``energy_per_decode_token_j``: least-squares fit, without
    intercept, of each step's dynamic energy on its prefill and decode tokens; ``fit_r2`` its
    coefficient of determination over ``fit_steps`` steps. ``weights`` says which per-token
    weights split the steps' dynamic energy (``fit``, or ``per_token`` when the fit was unusable,
    ``fit_note`` says why). ``round_energy_j`` and ``round_unattributed_energy_j`` give the books
    of each round.
    """

    timeline: Literal["engine", "client"] = Field(
        description="engine: the backend reported its steps; client: chunk arrivals only."
    )
    power: str = Field(description="How power was resolved at step level.")
    energy_per_prefill_token_j: CoefficientRecord = Field(default_factory=CoefficientRecord)
    energy_per_decode_token_j: CoefficientRecord = Field(default_factory=CoefficientRecord)
    fit_r2: float | None = None
    fit_steps: int = 0
    weights: Literal["fit", "per_token"] = "fit"
    fit_note: str | None = None
    idle_power_w: float | None = Field(
        default=None, description="Idle power shared by time among the requests in flight."
    )
    round_energy_j: list[float] = Field(default_factory=list)
    round_unattributed_energy_j: list[float] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)

"""The server scenario's arrivals (``traffic.*``) and the service-level bounds (``slo.*``)
that goodput and energy per good request are counted against."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pytest_llem.config.fields import StrictModel, field_meta

__all__ = ["SloConfig", "TrafficConfig"]


class TrafficConfig(StrictModel):
    """Arrivals of the ``server`` scenario (``traffic.*``): an open loop on a seeded schedule."""

    arrival: Literal["poisson", "constant", "gamma"] = Field(
        default="poisson",
        description="Inter-arrival distribution: poisson (exponential gaps), constant, gamma.",
        json_schema_extra=field_meta(short="arrival"),
    )
    rate: float = Field(
        default=4.0,
        gt=0.0,
        le=100_000.0,
        description="Target arrival rate in requests per second.",
        json_schema_extra=field_meta(sweep=[1.0, 4.0, 16.0], short="rate"),
    )
    burstiness: float = Field(
        default=1.0,
        gt=0.0,
        le=1000.0,
        description="Gamma shape of the inter-arrival gaps (1 is Poisson; below 1 is burstier).",
        json_schema_extra=field_meta(sweep=[0.5, 1.0, 2.0], short="burst"),
    )
    num_requests: int | None = Field(
        default=None,
        ge=1,
        le=10_000_000,
        description="Requests per repetition (default: num_prompts, unless duration_s is set).",
        json_schema_extra=field_meta(sweep=[16, 64, 256], short="reqs"),
    )
    duration_s: float | None = Field(
        default=None,
        gt=0.0,
        le=86_400.0,
        description="Arrivals are scheduled over this many seconds instead of a request count.",
        json_schema_extra=field_meta(sweep=[10.0, 60.0], short="dur"),
    )
    max_concurrency: int | None = Field(
        default=None,
        ge=1,
        le=1_000_000,
        description="Most requests in flight at once (arrived and not finished); none: no limit.",
        json_schema_extra=field_meta(sweep=[1, 8, 64], short="conc"),
    )
    seed: int = Field(
        default=0,
        ge=0,
        le=2**32 - 1,
        description="Seed of the arrival schedule.",
        json_schema_extra=field_meta(sweep=[0, 1, 2], short="tseed"),
    )
    steady_state: bool = Field(
        default=False,
        description="Also report the steady state alone: from the issue of the request at "
        "ramp_up_fraction of the schedule to the issue of the last request.",
        json_schema_extra=field_meta(short="steady"),
    )
    ramp_up_fraction: float = Field(
        default=0.1,
        ge=0.0,
        lt=1.0,
        description="Share of the scheduled requests that make up the ramp-up.",
        json_schema_extra=field_meta(sweep=[0.0, 0.1, 0.25], short="ramp"),
    )


class SloConfig(StrictModel):
    """Service-level bounds (``slo.*``); a request is good when it meets every bound set."""

    ttft_ms: float | None = Field(
        default=None,
        gt=0.0,
        description="Most time to first token, in ms.",
        json_schema_extra=field_meta(sweep=[200.0, 1000.0, 5000.0], short="slo_ttft"),
    )
    tpot_ms: float | None = Field(
        default=None,
        gt=0.0,
        description="Most time per output token after the first, in ms.",
        json_schema_extra=field_meta(sweep=[20.0, 50.0, 200.0], short="slo_tpot"),
    )
    e2e_ms: float | None = Field(
        default=None,
        gt=0.0,
        description="Most end-to-end latency, in ms.",
        json_schema_extra=field_meta(sweep=[1000.0, 10000.0, 60000.0], short="slo_e2e"),
    )

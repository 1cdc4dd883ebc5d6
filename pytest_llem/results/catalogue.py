"""The metric catalogue: every figure a run record can hold, defined once.

Each :class:`Metric` gives a name, its unit, which way is better, its kind, whether it needs the
idle baseline, whether a gate or budget may name it, where its source comes from and what it
means. The harness takes units and sources from here, the gate its names and directions, the
reports their units, ``llem schema`` the list, and ``docs/metrics.md`` its tables
(``llem metrics --doc docs/metrics.md``). Families (per domain, per latency statistic, the
``steady_state.`` figures) are generated from one entry each, so every concrete name resolves to
an entry. This module imports nothing of the harness, backends or meters.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Literal

__all__ = [
    "CATALOGUE",
    "DOMAINS",
    "LATENCY_METRICS",
    "LATENCY_STATISTICS",
    "SECTIONS",
    "SLO_BOUNDS",
    "STEADY_PREFIX",
    "Metric",
    "domain_energy_metric",
    "lookup",
    "metric",
    "metrics_in",
    "unit_of",
]

Domain = Literal["gpu", "cpu", "dram"]
#: Energy domains, in canonical order (the meters' ``DOMAINS``, repeated here so results and
#: reports need not import the meters).
DOMAINS: tuple[Domain, ...] = ("gpu", "cpu", "dram")
#: Per-request latencies; each is summarised per window with :data:`LATENCY_STATISTICS`.
LATENCY_METRICS: tuple[str, ...] = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")
#: Suffixes of the per-window latency statistics (``ttft_ms.p99``).
LATENCY_STATISTICS: tuple[str, ...] = ("mean", "p50", "p90", "p95", "p99", "max")
#: Latency bounds of the service-level objective (``slo.ttft_ms`` ...).
SLO_BOUNDS: tuple[str, ...] = ("ttft_ms", "tpot_ms", "e2e_ms")
#: Prefix of the figures of the steady state alone (server scenario).
STEADY_PREFIX = "steady_state."

Better = Literal["lower", "higher", "neither"]
Kind = Literal[
    "count",
    "time",
    "energy",
    "power",
    "efficiency",
    "emissions",
    "check",
    "thermal",
    "throughput",
    "latency",
    "service",
    "load",
    "compute",
    "memory",
]
#: Where a metric's ``source`` comes from: fixed (``measured``, ``estimated``), the meters of
#: the covered domains (``meters``: measured only when all were), or one domain's meter;
#: ``attributed``: the meters' energy split per request (estimated when a meter is).
SourceRule = Literal["measured", "estimated", "meters", "gpu", "cpu", "dram", "attributed"]

#: Sections of docs/metrics.md that hold a generated table, in the page's order.
SECTIONS: tuple[str, ...] = (
    "counting",
    "window",
    "energy",
    "baseline",
    "attribution",
    "emissions",
    "check",
    "throughput",
    "latency",
    "service",
    "load",
    "steady",
    "compute",
)


@dataclass(frozen=True)
class Metric:
    """One metric a record can hold.

    ``name`` is the concrete name (``ttft_ms.p99``); ``family`` the entry it was generated from
    (``ttft_ms``), equal to ``name`` for a plain metric. ``missing`` is why the figure has no
    value where the harness recorded no reason of its own.
    """

    name: str
    unit: str
    better: Better
    kind: Kind
    section: str
    description: str
    family: str = ""
    needs_baseline: bool = False
    gated: bool = False
    source: SourceRule = "measured"
    missing: str | None = None

    @property
    def follows_meters(self) -> bool:
        """Whether the figure is an energy figure whose source is the meters' (so estimated
        energy never gates by default)."""
        return self.source in ("meters", "attributed", *DOMAINS)


def _entry(
    name: str,
    unit: str,
    better: Better,
    kind: Kind,
    section: str,
    description: str,
    *,
    needs_baseline: bool = False,
    gated: bool = False,
    source: SourceRule = "measured",
    missing: str | None = None,
) -> Metric:
    return Metric(
        name,
        unit,
        better,
        kind,
        section,
        description,
        family=name,
        needs_baseline=needs_baseline,
        gated=gated,
        source=source,
        missing=missing,
    )


def domain_energy_metric(domain: str) -> str:
    """The name of one domain's energy (``gpu_energy_j``)."""
    return f"{domain}_energy_j"


_NO_ENERGY = "no energy domain measured"
_NO_TPOT = "no request produced 2 or more output tokens"
_NO_FIT = (
    "not identifiable from the window's steps (the repetition's attribution.fit_note says why)"
)

_ENTRIES: tuple[Metric, ...] = (
    _entry("requests", "requests", "neither", "count", "counting",
           "prompts sent in one measured window, one completion each"),
    _entry("input_tokens", "tokens", "neither", "count", "counting",
           "prompt tokens by the model's own tokenizer, after truncation to "
           "`max_input_tokens`; padding is not counted"),
    _entry("output_tokens", "tokens", "neither", "count", "counting",
           "generated token ids per request, counted from the ids the backend returns (never "
           "by re-tokenising text); prompt and padding excluded; a request's ids stop at its "
           "first end-of-sequence token, which counts"),
    _entry("duration_s", "s", "neither", "time", "window",
           "the window's wall-clock length (`time.perf_counter`), per round"),
    *(
        _entry(domain_energy_metric(d), "J", "lower", "energy", "energy",
               f"energy of the {d} domain over the window, from the meter that covers it",
               gated=True, source=d)
        for d in DOMAINS
    ),
    _entry("energy_j", "J", "lower", "energy", "energy",
           "the sum over the domains that were actually covered; the record lists them in "
           "`energy_sources`", gated=True, source="meters", missing=_NO_ENERGY),
    _entry("avg_power_w", "W", "lower", "power", "energy", "`energy_j / duration_s`",
           gated=True, source="meters", missing=_NO_ENERGY),
    _entry("energy_per_output_token_j", "J/token", "lower", "efficiency", "energy",
           "`energy_j / output_tokens`", gated=True, source="meters", missing=_NO_ENERGY),
    _entry("energy_per_request_j", "J/request", "lower", "efficiency", "energy",
           "`energy_j / requests`", gated=True, source="meters", missing=_NO_ENERGY),
    _entry("output_tokens_per_j", "tokens/J", "higher", "efficiency", "energy",
           "`output_tokens / energy_j`", source="meters", missing=_NO_ENERGY),
    _entry("idle_power_w", "W", "neither", "power", "baseline",
           "summed idle power of the domains the window covered: per domain, the baseline's "
           "energy over its time", needs_baseline=True, source="meters", missing=_NO_ENERGY),
    _entry("dynamic_energy_j", "J", "lower", "energy", "baseline",
           "`energy_j - idle_power_w * duration_s`, per round; **not clamped**: a negative "
           "value is reported as it is and the repetition is flagged `dynamic_energy_negative`",
           needs_baseline=True, gated=True, source="meters", missing=_NO_ENERGY),
    _entry("dynamic_energy_per_output_token_j", "J/token", "lower", "efficiency", "baseline",
           "`dynamic_energy_j / output_tokens`", needs_baseline=True, gated=True,
           source="meters", missing=_NO_ENERGY),
    _entry("request_energy_j", "J", "lower", "energy", "attribution",
           "energy attributed to one request (`per_request[].energy_j`), its statistic over "
           "the window's requests: its share of the idle power while it was in flight plus "
           "its share of each step's dynamic energy by its tokens (methodology: Energy per "
           "request)", gated=True, source="attributed", missing=_NO_ENERGY),
    _entry("prefill_energy_j", "J", "lower", "energy", "attribution",
           "energy attributed to prefill, summed over the window's requests, per round",
           gated=True, source="attributed", missing=_NO_ENERGY),
    _entry("decode_energy_j", "J", "lower", "energy", "attribution",
           "energy attributed to decode, summed over the window's requests, per round; "
           "`prefill_energy_j + decode_energy_j + unattributed_energy_j = energy_j`",
           gated=True, source="attributed", missing=_NO_ENERGY),
    _entry("unattributed_energy_j", "J", "neither", "energy", "attribution",
           "energy while no request was in flight, per round", source="attributed",
           missing=_NO_ENERGY),
    _entry("energy_per_prefill_token_j", "J/token", "lower", "efficiency", "attribution",
           "fitted dynamic energy per prefill token: least squares, without intercept, of each "
           "step's dynamic energy on its prefill and decode tokens", source="attributed",
           missing=_NO_FIT),
    _entry("energy_per_decode_token_j", "J/token", "lower", "efficiency", "attribution",
           "fitted dynamic energy per decode token (the same fit)", source="attributed",
           missing=_NO_FIT),
    _entry("subtraction_prefill_energy_j", "J", "lower", "energy", "attribution",
           "prefill energy optimum-benchmark's way, with `prefill_check`: the energy of a "
           "window in which the same requests generate one new token each, per round "
           "(includes any time between batches)", source="meters",
           missing="no prefill check (the case parameter `prefill_check`) or no energy"),
    _entry("prefill_attribution_diff", "ratio", "neither", "check", "attribution",
           "`(prefill_energy_j - subtraction_prefill_energy_j) / subtraction_prefill_energy_j`: "
           "how far the attributed prefill energy is from the subtraction method's",
           source="attributed", missing="no prefill check, or either prefill energy is missing"),
    _entry("emissions_kg", "kg CO2eq", "lower", "emissions", "emissions",
           "CodeCarbon's emissions for the window (per round): its own energy for the window "
           "(all the domains CodeCarbon sees, so it can differ from `energy_j` when another "
           "meter supplies a domain) times the grid carbon intensity of `--llem-country` (ISO "
           "code; USA when not given). Present only when the `codecarbon` meter runs; always "
           "`estimated`", source="estimated",
           missing="no meter reports emissions (codecarbon does, as an estimate)"),
    _entry("counter_vs_power_diff", "ratio", "neither", "check", "check",
           "`(counter energy - integrated power samples) / integrated power samples` over one "
           "window, where the same meter has both (NVML on a GPU with an energy counter); "
           "0.01 is 1%",
           missing="no meter has both an energy counter and power samples for the same window"),
    _entry("temperature_start_c", "C", "neither", "thermal", "check",
           "the hottest measured device's temperature when the window opened",
           missing="no meter reports device temperatures"),
    _entry("temperature_end_c", "C", "neither", "thermal", "check",
           "the same when the window closed", missing="no meter reports device temperatures"),
    _entry("output_tokens_per_s", "tokens/s", "higher", "throughput", "throughput",
           "`output_tokens / duration_s` (the headline throughput)", gated=True),
    _entry("total_tokens_per_s", "tokens/s", "higher", "throughput", "throughput",
           "`(input_tokens + output_tokens) / duration_s`"),
    _entry("requests_per_s", "requests/s", "higher", "throughput", "throughput",
           "`requests / duration_s`", gated=True),
    _entry("ttft_ms", "ms", "lower", "latency", "latency",
           "time of the first output token minus arrival", gated=True),
    _entry("e2e_ms", "ms", "lower", "latency", "latency",
           "time of the last output token minus arrival", gated=True),
    _entry("tpot_ms", "ms", "lower", "latency", "latency",
           "`(e2e_ms - ttft_ms) / (output_tokens - 1)`; requests with fewer than 2 output "
           "tokens are left out", gated=True, missing=_NO_TPOT),
    _entry("itl_ms", "ms", "lower", "latency", "latency",
           "every gap between consecutive output tokens of a request, the first token "
           "excluded", gated=True, missing=_NO_TPOT),
    _entry("goodput_rps", "requests/s", "higher", "service", "service",
           "good requests / `duration_s`", gated=True),
    _entry("energy_per_good_request_j", "J/request", "lower", "efficiency", "service",
           "`energy_j` / good requests (energy goodput; none when no request was good)",
           source="meters"),
    _entry("slo_met_fraction", "fraction", "higher", "service", "service",
           "good requests / requests"),
    *(
        _entry(f"slo_{bound}_met_fraction", "fraction", "higher", "service", "service",
               "requests meeting that bound / requests")
        for bound in SLO_BOUNDS
    ),
    _entry("target_rate_rps", "requests/s", "neither", "load", "load", "`traffic.rate`"),
    _entry("achieved_rate_rps", "requests/s", "higher", "load", "load",
           "(requests - 1) / (last issue time - first issue time): the rate at which requests "
           "actually left the queue"),
    _entry("mean_concurrency", "requests", "neither", "load", "load",
           "time-average of requests in flight (arrived and not finished), from the first "
           "arrival to the last finish"),
    _entry("peak_concurrency", "requests", "neither", "load", "load",
           "most requests in flight at any moment"),
    _entry("queue_wait_ms", "ms", "lower", "latency", "load",
           "issue time minus scheduled arrival"),
    _entry("flops_estimate", "FLOP", "neither", "compute", "compute",
           "`2 * non-embedding parameters * (input_tokens + output_tokens)`; an estimate "
           "(source `estimated`) that leaves out attention's own FLOPs. Non-embedding "
           "parameters are all parameters minus the input embedding matrix.",
           source="estimated", missing="non-embedding parameter count unknown"),
    _entry("peak_memory_mb", "MB", "lower", "memory", "compute",
           "peak device memory allocated during the window by the CUDA allocator, or on CPU "
           "the process's peak resident memory during the window; `peak_memory_kind` says "
           "which", gated=True, missing="peak memory unavailable"),
)  # fmt: skip

#: The statistics each per-request family is summarised with per window.
_STATISTICS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(LATENCY_METRICS, LATENCY_STATISTICS),
    "request_energy_j": LATENCY_STATISTICS,
    "queue_wait_ms": ("mean", "p99"),
}
#: Families that also have a ``steady_state.`` figure (server scenario with steady_state).
_STEADY: tuple[str, ...] = (
    "duration_s",
    "requests",
    "output_tokens",
    "energy_j",
    "avg_power_w",
    "energy_per_output_token_j",
    "output_tokens_per_s",
    *LATENCY_METRICS,
)


def _concrete(entry: Metric) -> list[Metric]:
    """The names an entry stands for: itself, or one per statistic of a latency family."""
    stats = _STATISTICS.get(entry.name)
    if stats is None:
        return [entry]
    return [replace(entry, name=f"{entry.name}.{stat}") for stat in stats]


def _steady(metric: Metric) -> Metric:
    return replace(
        metric,
        name=f"{STEADY_PREFIX}{metric.name}",
        section="steady",
        gated=False,
        description=f"`{metric.family}` over the steady span alone",
    )


def _build() -> dict[str, Metric]:
    concrete = [m for entry in _ENTRIES for m in _concrete(entry)]
    steady = [_steady(m) for m in concrete if m.family in _STEADY]
    return {m.name: m for m in (*concrete, *steady)}


#: Every concrete metric name a record can hold, to its definition, in the docs' order.
CATALOGUE: Mapping[str, Metric] = _build()


def lookup(name: str) -> Metric | None:
    """The definition of a concrete metric name, or None for a name no record holds."""
    return CATALOGUE.get(name)


def metric(name: str) -> Metric:
    """The definition of a concrete metric name.

    Raises:
        KeyError: ``name`` is not in the catalogue.
    """
    found = CATALOGUE.get(name)
    if found is None:
        raise KeyError(f"no metric {name!r} in the catalogue")
    return found


def unit_of(name: str, default: str = "") -> str:
    """The unit of a metric (``default`` for a name not in the catalogue)."""
    found = CATALOGUE.get(name)
    return found.unit if found is not None else default


def metrics_in(
    *, section: str | None = None, gated: bool | None = None, names: Iterable[str] | None = None
) -> list[Metric]:
    """The catalogue's metrics, filtered, in catalogue order.

    Args:
        section: Only this docs section.
        gated: Only those a gate may (True) or may not (False) name.
        names: Only these names (in catalogue order, unknown ones ignored).
    """
    wanted = None if names is None else set(names)
    return [
        m
        for m in CATALOGUE.values()
        if (section is None or m.section == section)
        and (gated is None or m.gated == gated)
        and (wanted is None or m.name in wanted)
    ]

"""The HTML report's view of a case's attributed energy: per request against its tokens, and
the prefill/decode split, from the run record alone."""

from __future__ import annotations

from dataclasses import dataclass

from pytest_llem.report import svg_requests
from pytest_llem.report.svg import Svg, format_number
from pytest_llem.results.models import CaseRecord

__all__ = ["AttributionView", "attribution_view"]

#: Requests drawn per case at most (evenly spaced), so a long run keeps a small page.
_MAX_POINTS = 2000


@dataclass(frozen=True)
class AttributionView:
    """The charts and the figures of one case's attribution."""

    scatter: Svg
    split: Svg
    rows: list[tuple[str, str]]


def _median(case: CaseRecord, name: str) -> float | None:
    summary = case.metrics.get(name)
    return summary.median if summary is not None else None


def _points(case: CaseRecord) -> list[svg_requests.RequestPoint]:
    requests = [r for rep in case.repetitions for r in rep.per_request if r.energy_j is not None]
    step = max(1, len(requests) // _MAX_POINTS)
    return [
        svg_requests.RequestPoint(
            r.output_tokens, r.input_tokens, r.prefill_energy_j or 0.0, r.decode_energy_j or 0.0
        )
        for r in requests[::step]
    ]


def _rows(case: CaseRecord) -> list[tuple[str, str]]:
    rows = [
        (label, f"{format_number(_median(case, name))} {unit}")
        for label, name, unit in (
            ("energy per prefill token (fit)", "energy_per_prefill_token_j", "J/token"),
            ("energy per decode token (fit)", "energy_per_decode_token_j", "J/token"),
            ("request energy p50 / p99", "request_energy_j.p50", "J"),
        )
    ]
    rows[-1] = (
        rows[-1][0],
        f"{format_number(_median(case, 'request_energy_j.p50'))} / "
        f"{format_number(_median(case, 'request_energy_j.p99'))} J",
    )
    first = next((rep.attribution for rep in case.repetitions if rep.attribution), None)
    if first is not None:
        rows.append(("timeline", first.timeline))
        rows.append(("fit R\u00b2 (first window)", format_number(first.fit_r2, digits=3)))
        rows.append(("power at step level", first.power))
        if first.fit_note:
            rows.append(("fit", first.fit_note))
    return rows


def attribution_view(case: CaseRecord) -> AttributionView | None:
    """The case's attribution view; None when no window attributed its energy."""
    if not any(rep.per_request for rep in case.repetitions):
        return None
    split = svg_requests.energy_split_bar(
        [
            ("prefill", _median(case, "prefill_energy_j")),
            ("decode", _median(case, "decode_energy_j")),
            ("unattributed", _median(case, "unattributed_energy_j")),
        ],
        title="Energy per round: prefill, decode, no request in flight (medians)",
    )
    scatter = svg_requests.request_energy_scatter(
        _points(case), title="Energy of each request against its output tokens"
    )
    return AttributionView(scatter, split, _rows(case))

"""The searches in the reports: one terminal line per case and the HTML section with the
capacity curves and the frontier, from records built here (the search sections alone)."""

from __future__ import annotations

import html

from pytest_llem.report.html import render_html
from pytest_llem.report.terminal import summary_lines
from pytest_llem.results.models import CaseRecord, RunRecord
from pytest_llem.results.search import (
    CapacityPoint,
    CapacityRecord,
    FrontierPoint,
    SearchPoint,
    SearchRecord,
)
from pytest_llem.results.store import read_run_record
from tests.test_report_html import make_case, make_record


def _point(rate: float, fraction: float, *, saturated: bool = False) -> CapacityPoint:
    return CapacityPoint(
        rate_rps=rate,
        good_fraction=fraction,
        requests=200,
        saturated=saturated,
        passed=fraction >= 0.9 and not saturated,
        energy_per_good_request_j=1.5 / fraction,
        case_id=f"t.py::test_cap@rate={rate:g}",
    )


CAPACITY = CapacityRecord(
    rate_rps=42.4,
    good_fraction=0.985,
    slo={"e2e_ms": 400.0},
    target_good_fraction=0.9,
    rate_range=None,
    tolerance=0.05,
    bracket=(42.4, 44.1),
    stop_reason="tolerance",
    tried=[
        _point(30, 1.0),
        _point(60, 0.28, saturated=True),
        _point(42.4, 0.985),
        _point(44.1, 0.7),
    ],
)


def _search_point(batch: int, energy: float, ttft: float, *, feasible: bool = True) -> SearchPoint:
    return SearchPoint(
        params={"batch_size": batch},
        objective=energy,
        values={"ttft_ms.p99": ttft},
        feasible=feasible,
        broke=[] if feasible else [f"ttft_ms.p99 {ttft:g} > 500"],
    )


SEARCH = SearchRecord(
    objective="energy_per_output_token_j",
    direction="minimize",
    subject_to={"ttft_ms.p99": 500.0},
    space={"batch_size": [1, 2, 4, 8, 16]},
    monotone=["batch_size"],
    grid_size=5,
    best=_search_point(8, 0.11, 420.0),
    evaluated=[
        _search_point(16, 0.09, 810.0, feasible=False),
        _search_point(4, 0.16, 230.0),
        _search_point(8, 0.11, 420.0),
    ],
    frontier_metric="ttft_ms.p99",
    frontier=[
        FrontierPoint(params={"batch_size": 4}, objective=0.16, other=230.0),
        FrontierPoint(params={"batch_size": 8}, objective=0.11, other=420.0),
    ],
    skipped=2,
)


def _record() -> RunRecord:
    cap = make_case(0, test="test_cap", name="test_cap", server=True)
    found = make_case(1, test="test_best", name="test_best")
    cases = [
        cap.model_copy(update={"capacity": CAPACITY}),
        found.model_copy(update={"search": SEARCH}),
        make_case(2, test="test_best", name="test_best@batch_size=8").model_copy(
            update={"part_of": found.id}
        ),
    ]
    return make_record(cases)


def test_terminal_prints_each_answer_in_one_line() -> None:
    lines = summary_lines(_record())
    (capacity,) = [line for line in lines if line.startswith("capacity ")]
    assert capacity.startswith("capacity test_cap: 42.4 requests/s (98% of requests within ")
    assert "e2e_ms<=400 ms, target 90%, 1.52 J/good request; 4 rates tried" in capacity
    assert "bracket 42.4-44.1, stopped: tolerance" in capacity
    (search,) = [line for line in lines if line.startswith("search ")]
    assert search == (
        "search test_best: best batch_size=8: energy_per_output_token_j 0.11 J/token with "
        "ttft_ms.p99 420 (ttft_ms.p99<=500); 3 of 5 points evaluated"
    )


def test_terminal_says_when_the_best_is_within_noise_of_a_bound() -> None:
    best = _search_point(8, 0.11, 420.0).model_copy(
        update={"uncertain": ["ttft_ms.p99 [380, 520] holds 500"]}
    )
    search = SEARCH.model_copy(update={"best": best})
    record = make_record([make_case(0, name="test_best").model_copy(update={"search": search})])
    (line,) = [line for line in summary_lines(record) if line.startswith("search ")]
    assert line.endswith("points evaluated; within noise: ttft_ms.p99 [380, 520] holds 500")


def test_terminal_says_when_there_is_no_answer() -> None:
    none = CAPACITY.model_copy(
        update={"rate_rps": None, "good_fraction": None, "stop_reason": "below_range"}
    )
    nothing = SEARCH.model_copy(update={"best": None, "frontier": []})
    record = make_record(
        [
            make_case(0, name="test_cap").model_copy(update={"capacity": none}),
            make_case(1, name="test_best").model_copy(update={"search": nothing}),
        ]
    )
    lines = summary_lines(record)
    assert "capacity test_cap: none: e2e_ms<=400 ms not met by 90% of requests even at 30" in (
        "\n".join(lines)
    )
    assert (
        "search test_best: no feasible point (3 of 5 points evaluated; e.g. batch_size=16 broke "
        "ttft_ms.p99 810 > 500)" in lines
    )


def test_capacity_probes_are_not_listed_as_saturated_cases() -> None:
    probe = make_case(0, name="test_cap@rate=60", server=True)
    lines = summary_lines(make_record([probe.model_copy(update={"part_of": "t.py::test_cap"})]))
    assert not any(line.startswith("saturated (") for line in lines)


def test_html_draws_the_capacity_curves_and_the_frontier_with_the_chosen_point() -> None:
    page = render_html(_record())
    assert '<section id="searches">' in page
    assert 'href="#searches"' in page
    text = html.unescape(page)
    assert "Good fraction against arrival rate" in text
    assert "Energy per good request against arrival rate" in text
    assert "energy_per_output_token_j against ttft_ms.p99 (feasible points evaluated)" in text
    assert "chosen: batch_size=8" in text
    assert "frontier: batch_size=4" in text
    assert "batch_size=16" not in text.split('id="searches"')[1].split("</section>")[0]


def test_the_sections_survive_the_json_record(tmp_path) -> None:
    path = tmp_path / "run.json"
    path.write_text(_record().model_dump_json())
    again = read_run_record(path)
    assert next(c.capacity for c in again.cases) == CAPACITY
    assert [c.search for c in again.cases][1] == SEARCH
    assert isinstance(again.cases[2], CaseRecord)
    assert again.cases[2].part_of == again.cases[1].id
    assert render_html(again) == render_html(_record())

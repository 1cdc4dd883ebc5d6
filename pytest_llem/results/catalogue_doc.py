"""The metric catalogue as Markdown tables, and docs/metrics.md with its tables regenerated.

docs/metrics.md keeps its prose by hand; each of its metric tables sits between a
``<!-- llem metrics: SECTION -->`` line and an ``<!-- end llem metrics -->`` line and is written
by :func:`render_doc` from :data:`~pytest_llem.results.catalogue.CATALOGUE`
(``llem metrics --doc docs/metrics.md --write``). A test fails when the committed page differs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from pytest_llem.results.catalogue import DOMAINS, SECTIONS, STEADY_PREFIX, Metric, metrics_in

__all__ = ["END_MARK", "catalogue_markdown", "render_doc", "section_markdown", "table_rows"]

#: Closes a generated table in docs/metrics.md.
END_MARK = "<!-- end llem metrics -->"
_BLOCK = re.compile(
    r"(<!-- llem metrics: (?P<section>[a-z_]+) -->\n)(?P<body>.*?)(" + re.escape(END_MARK) + ")",
    re.DOTALL,
)
_HEADER = ("name", "unit", "better", "gated", "source", "definition")


def _source_text(metric: Metric) -> str:
    if metric.source == "meters":
        return "the meters'"
    if metric.source in DOMAINS:
        return f"the {metric.source} meter's"
    return metric.source


def _names_text(names: Sequence[str]) -> str:
    """``ttft_ms.{mean,p50,...}`` for a family of statistics, the name itself otherwise."""
    if len(names) == 1:
        return f"`{names[0]}`"
    stem = names[0].rsplit(".", 1)[0]
    stats = ",".join(name.rsplit(".", 1)[1] for name in names)
    return f"`{stem}.{{{stats}}}`"


def _groups(section: str) -> list[list[Metric]]:
    """The section's metrics, a family of statistics (``ttft_ms.p50`` ...) as one group."""
    groups: dict[tuple[bool, str], list[Metric]] = {}
    for metric in metrics_in(section=section):
        groups.setdefault((metric.name.startswith(STEADY_PREFIX), metric.family), []).append(metric)
    return list(groups.values())


def table_rows(section: str) -> list[tuple[str, ...]]:
    """One row per metric (or family of statistics) of a docs section.

    Returns:
        Rows of name, unit, better (``lower``, ``higher`` or ``-``), gated (``yes`` or empty),
        source and definition.
    """
    rows: list[tuple[str, ...]] = []
    for group in _groups(section):
        first = group[0]
        definition = first.description
        if first.needs_baseline:
            definition += " (needs the idle baseline)"
        rows.append(
            (
                _names_text([m.name for m in group]),
                first.unit,
                first.better if first.better != "neither" else "-",
                "yes" if first.gated else "",
                _source_text(first),
                definition,
            )
        )
    return rows


def section_markdown(section: str) -> str:
    """The Markdown table of one docs section, ending in a newline.

    Raises:
        KeyError: ``section`` is not one of :data:`~pytest_llem.results.catalogue.SECTIONS`.
    """
    if section not in SECTIONS:
        raise KeyError(f"no metric section {section!r}; sections: {', '.join(SECTIONS)}")
    lines = [
        "| " + " | ".join(_HEADER) + " |",
        "| " + " | ".join("---" for _ in _HEADER) + " |",
    ]
    for row in table_rows(section):
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
    return "\n".join(lines) + "\n"


def catalogue_markdown() -> str:
    """Every section's table under a heading naming the section."""
    parts = [f"### {section}\n\n{section_markdown(section)}" for section in SECTIONS]
    return "\n".join(parts)


def render_doc(text: str) -> str:
    """``text`` with every generated table replaced by the catalogue's current one.

    Raises:
        KeyError: A block names an unknown section.
    """
    return _BLOCK.sub(
        lambda m: f"{m.group(1)}{section_markdown(m.group('section'))}{END_MARK}", text
    )

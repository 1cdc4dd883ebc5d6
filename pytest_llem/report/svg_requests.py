"""SVG charts of the energy attributed inside a window: each request's energy against its
tokens, and the split of a case's energy into prefill, decode and unattributed.

Built like :mod:`pytest_llem.report.svg` (whose frame and axes they reuse) from escaped text
only, from the run record alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from pytest_llem.report.svg import (
    PALETTE,
    Svg,
    _clip,
    _e,
    _Frame,
    _n,
    _open,
    _text,
    _tick_text,
    _x_axis,
    _y_axis,
    format_number,
    nice_ticks,
    placeholder,
)

__all__ = ["RequestPoint", "energy_split_bar", "request_energy_scatter"]


@dataclass(frozen=True)
class RequestPoint:
    """One request: its output tokens, its prefill and decode energy (J)."""

    output_tokens: int
    input_tokens: int
    prefill_j: float
    decode_j: float


def request_energy_scatter(
    points: Sequence[RequestPoint], *, title: str, width: float = 480, height: float = 300
) -> Svg:
    """Each request's energy against its output tokens; a tick marks its prefill share.

    Args:
        points: The requests (non-finite energies are left out).
        title: Chart title (also its accessible name).
        width: Width in pixels.
        height: Height in pixels.

    Returns:
        The SVG document, or a placeholder when there is no request with energy.
    """
    usable = [p for p in points if math.isfinite(p.prefill_j + p.decode_j)]
    if not usable:
        return placeholder(f"{title}: no attributed energy in this record", width=width)
    xs = [float(p.output_tokens) for p in usable]
    ys = [p.prefill_j + p.decode_j for p in usable]
    x_ticks = nice_ticks(0.0, max(xs))
    y_ticks = nice_ticks(min(0.0, *ys), max(0.0, *ys))
    frame = _Frame(
        64, 40, width - 80, height - 40 - 44, x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]
    )
    parts = _open(width, height, title)
    parts.append(_text(frame.left, 16, _clip(title, 70), extra=' font-weight="600"'))
    parts.append(
        _text(frame.left, 31, "\u25cf energy of one request   \u2014 its prefill part",
              extra=f' fill="{PALETTE[1]}"')
    )  # fmt: skip
    parts += _y_axis(frame, y_ticks, "energy per request (J)")
    parts += _x_axis(frame, [(t, _tick_text(t, x_ticks)) for t in x_ticks], "output tokens")
    dots, ticks = [], []
    for point, x, y in zip(usable, xs, ys, strict=True):
        px, py = frame.px(x), frame.py(y)
        tip = (
            f"{point.input_tokens} in, {point.output_tokens} out: {format_number(y)} J "
            f"(prefill {format_number(point.prefill_j)} J)"
        )
        dots.append(f'<circle cx="{_n(px)}" cy="{_n(py)}" r="3"><title>{_e(tip)}</title></circle>')
        ticks.append(f"M{_n(px - 4)} {_n(frame.py(point.prefill_j))}h8")
    parts.append(f'<g fill="{PALETTE[0]}" fill-opacity="0.6">{"".join(dots)}</g>')
    parts.append(f'<path d="{"".join(ticks)}" stroke="{PALETTE[1]}"/>')
    parts.append("</svg>")
    return Svg("".join(parts))


def energy_split_bar(
    parts_j: Sequence[tuple[str, float | None]], *, title: str, width: float = 480
) -> Svg:
    """One horizontal bar of a case's energy per round split into named parts.

    Args:
        parts_j: ``(name, joules)`` in drawing order; None or negative parts are left out.
        title: Chart title (also its accessible name).
        width: Width in pixels.

    Returns:
        The SVG document, or a placeholder when no part has energy.
    """
    known = [(name, j) for name, j in parts_j if j is not None and j > 0]
    total = math.fsum(j for _, j in known)
    if not known or total <= 0:
        return placeholder(f"{title}: no attributed energy in this record", width=width)
    height, left, bar_w = 74.0, 8.0, width - 16
    parts = _open(width, height, title)
    parts.append(_text(left, 16, _clip(title, 70), extra=' font-weight="600"'))
    x = left
    legend = []
    for i, (name, joules) in enumerate(known):
        w = bar_w * joules / total
        colour = PALETTE[i % len(PALETTE)]
        share = f"{name}: {format_number(joules)} J ({100 * joules / total:.0f}%)"
        parts.append(
            f'<rect x="{_n(x)}" y="24" width="{_n(w)}" height="18" fill="{colour}">'
            f"<title>{_e(share)}</title></rect>"
        )
        legend.append(_text(left + i * bar_w / len(known), 60, share, extra=f' fill="{colour}"'))
        x += w
    parts += legend
    parts.append("</svg>")
    return Svg("".join(parts))

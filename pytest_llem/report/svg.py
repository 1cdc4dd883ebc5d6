"""Small charts for the HTML report, drawn as inline SVG strings by this module alone.

Every piece of text that reaches a chart (titles, labels, case names, tooltips) is escaped here,
and nothing refers to an external resource, so :class:`Svg` values are safe to insert into the
page as markup. Output is deterministic: the same input always gives the same bytes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from html import escape
from typing import Literal

from pytest_llem.results.models import DistributionSummary

__all__ = [
    "PALETTE",
    "ScatterPoint",
    "Series",
    "Svg",
    "XAxis",
    "format_number",
    "latency_distribution",
    "line_chart",
    "nice_ticks",
    "pareto_front",
    "pareto_scatter",
    "placeholder",
    "power_timeline",
]

# Okabe-Ito: distinguishable with the common colour-vision deficiencies.
PALETTE = (
    "#0072b2",
    "#d55e00",
    "#009e73",
    "#cc79a7",
    "#e69f00",
    "#56b4e9",
    "#7f7f7f",
    "#000000",
)

_FONT = 'font-size="11"'
_CHAR_W = 6.2  # rough width of one 11 px character, for layout only
_MUTED = "#6b7280"
_GRID = "#e5e7eb"
_AXIS = "#9ca3af"


class Svg(str):
    """An SVG document built by this module from escaped text, safe to insert as markup."""

    __slots__ = ()


@dataclass(frozen=True)
class Series:
    """One line of a :func:`line_chart`: a name and its points (``y`` None leaves a gap)."""

    name: str
    points: Sequence[tuple[float | int | str, float | None]] = field(default_factory=tuple)


@dataclass(frozen=True)
class ScatterPoint:
    """One point of a :func:`pareto_scatter`; ``href`` links it (a fragment such as ``#case-3``)."""

    label: str
    x: float
    y: float
    href: str | None = None


@dataclass(frozen=True)
class _Frame:
    """The plot area inside a chart and the data ranges it maps."""

    left: float
    top: float
    width: float
    height: float
    x_lo: float
    x_hi: float
    y_lo: float
    y_hi: float

    def px(self, x: float) -> float:
        span = self.x_hi - self.x_lo or 1.0
        return self.left + (x - self.x_lo) / span * self.width

    def py(self, y: float) -> float:
        span = self.y_hi - self.y_lo or 1.0
        return self.top + self.height - (y - self.y_lo) / span * self.height


def _n(value: float) -> str:
    """A coordinate with one decimal, without a trailing ``.0``."""
    text = f"{value:.1f}"
    if text.endswith(".0"):
        text = text[:-2]
    return "0" if text == "-0" else text


def _i(value: float) -> str:
    """A coordinate rounded to a whole pixel (charts repeated once per case)."""
    return str(round(value))


def _e(text: object) -> str:
    return escape(str(text), quote=True)


def format_number(value: float | None, *, digits: int = 4) -> str:
    """A value for people: ``digits`` significant digits, thousands separated, ``n/a`` for None.

    Args:
        value: The number, or None when there is none.
        digits: Significant digits kept for values below 10,000.

    Returns:
        The text, such as ``0.03514``, ``2.561`` or ``12,480``.
    """
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 10 ** max(digits, 4):
        return f"{value:,.0f}"
    if magnitude < 1e-4:
        return f"{value:.{digits - 1}e}"
    decimals = max(0, digits - 1 - math.floor(math.log10(magnitude)))
    text = f"{value:,.{decimals}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


def nice_ticks(lo: float, hi: float, *, count: int = 5) -> list[float]:
    """Round tick values (steps of 1, 2 or 5 times a power of ten) covering ``[lo, hi]``.

    Args:
        lo: Smallest value to cover.
        hi: Largest value to cover.
        count: About how many intervals to make.

    Returns:
        Ascending ticks; the first is at or below ``lo`` and the last at or above ``hi``.
    """
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0, 1.0]
    if hi < lo:
        lo, hi = hi, lo
    if hi == lo:
        pad = abs(hi) * 0.5 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / max(count, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    start = math.floor(lo / step + 1e-9)
    stop = math.ceil(hi / step - 1e-9)
    return [round(i * step, 12) for i in range(start, stop + 1)]


def _tick_text(value: float, ticks: Sequence[float]) -> str:
    step = abs(ticks[1] - ticks[0]) if len(ticks) > 1 else abs(value) or 1.0
    if abs(value) >= 1e5 or (value != 0 and abs(value) < 1e-4):
        return f"{value:.2g}"
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    return f"{value:,.{decimals}f}"


def _open(width: float, height: float, title: str, *, tooltip: bool = True) -> list[str]:
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{_n(width)}" '
        f'height="{_n(height)}" viewBox="0 0 {_n(width)} {_n(height)}" role="img" '
        f'aria-label="{_e(title)}" {_FONT}>'
    ]
    if tooltip:
        parts.append(f"<title>{_e(title)}</title>")
    return parts


def _text(x: float, y: float, text: str, *, anchor: str = "start", extra: str = "") -> str:
    attrs = f' text-anchor="{anchor}"' if anchor != "start" else ""
    return f'<text x="{_n(x)}" y="{_n(y)}"{attrs}{extra}>{_e(text)}</text>'


def _clip(text: str, chars: int) -> str:
    return text if len(text) <= chars else text[: max(chars - 1, 1)] + "\u2026"


def placeholder(message: str, *, width: float = 480, height: float = 60) -> Svg:
    """A chart-sized box that says why there is no chart.

    Args:
        message: The reason, shown in the middle of the box.
        width: Width in pixels.
        height: Height in pixels.

    Returns:
        The SVG document.
    """
    parts = _open(width, height, message, tooltip=False)
    parts.append(
        f'<rect x="0.5" y="0.5" width="{_n(width - 1)}" height="{_n(height - 1)}" fill="none" '
        f'stroke="{_GRID}"/>'
    )
    parts.append(_text(8, height / 2 + 4, message, extra=f' fill="{_MUTED}"'))
    parts.append("</svg>")
    return Svg("".join(parts))


def _y_axis(frame: _Frame, ticks: Sequence[float], label: str) -> list[str]:
    right = frame.left + frame.width
    grid = "".join(f"M{_n(frame.left)} {_n(frame.py(t))}H{_n(right)}" for t in ticks)
    labels = "".join(_text(frame.left - 6, frame.py(t) + 4, _tick_text(t, ticks)) for t in ticks)
    mid = frame.top + frame.height / 2
    return [
        f'<path d="{grid}" stroke="{_GRID}"/>',
        f'<g text-anchor="end">{labels}</g>',
        _text(
            12,
            mid,
            label,
            anchor="middle",
            extra=f' transform="rotate(-90 12 {_n(mid)})" fill="{_MUTED}"',
        ),
    ]


def _x_axis(frame: _Frame, ticks: Sequence[tuple[float, str]], label: str) -> list[str]:
    bottom = frame.top + frame.height
    marks = "".join(f"M{_n(frame.px(value))} {_n(bottom)}v4" for value, _ in ticks)
    labels = "".join(_text(frame.px(value), bottom + 16, _clip(text, 14)) for value, text in ticks)
    return [
        f'<path d="M{_n(frame.left)} {_n(bottom)}h{_n(frame.width)}{marks}" stroke="{_AXIS}"/>',
        f'<g text-anchor="middle">{labels}</g>',
        _text(
            frame.left + frame.width / 2,
            bottom + 32,
            label,
            anchor="middle",
            extra=f' fill="{_MUTED}"',
        ),
    ]


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


XAxis = Literal["auto", "values", "linear", "category"]


def _x_positions(
    series: Sequence[Series], x_axis: XAxis
) -> tuple[dict[float | int | str, float], list[tuple[float, str]], float, float]:
    """Where each x value sits on the axis, the axis ticks and the axis range."""
    values: list[float | int | str] = []
    seen: set[float | int | str] = set()
    for one in series:
        for x, _ in one.points:
            if x not in seen:
                seen.add(x)
                values.append(x)
    numbers = [float(v) for v in values if not isinstance(v, str) and _is_number(v)]
    if x_axis == "auto":
        x_axis = "values" if len(numbers) == len(values) else "category"
    if x_axis == "category" or len(numbers) != len(values):
        positions: dict[float | int | str, float] = {v: float(i) for i, v in enumerate(values)}
        ticks = [(float(i), str(v)) for i, v in enumerate(values)]
        return positions, ticks, -0.5, max(len(values) - 0.5, 0.5)
    lo, hi = min(numbers), max(numbers)
    if x_axis == "linear":
        nice = nice_ticks(lo, hi)
        return (
            {v: n for v, n in zip(values, numbers, strict=True)},
            [(t, _tick_text(t, nice)) for t in nice],
            nice[0],
            nice[-1],
        )
    log = lo > 0 and hi / lo >= 16
    positions = {v: math.log2(n) if log else n for v, n in zip(values, numbers, strict=True)}
    ticks = sorted((positions[v], format_number(n)) for v, n in zip(values, numbers, strict=True))
    p_lo, p_hi = min(positions.values()), max(positions.values())
    pad = (p_hi - p_lo) * 0.06 or 0.5
    return positions, ticks, p_lo - pad, p_hi + pad


def _legend(
    names: Sequence[str], *, left: float, top: float, width: float
) -> tuple[list[str], float]:
    """Legend entries wrapped into rows; returns the parts and the height used."""
    parts: list[str] = []
    x, y = left, top
    for i, name in enumerate(names):
        text = _clip(name, 40)
        item_w = 22 + len(text) * _CHAR_W + 14
        if x > left and x + item_w > left + width:
            x, y = left, y + 16
        color = PALETTE[i % len(PALETTE)]
        parts.append(
            f'<line x1="{_n(x)}" x2="{_n(x + 16)}" y1="{_n(y)}" y2="{_n(y)}" stroke="{color}" '
            f'stroke-width="2"/>'
        )
        parts.append(_text(x + 20, y + 4, text))
        x += item_w
    return parts, (y - top + 16) if names else 0.0


def line_chart(
    series: Sequence[Series],
    *,
    title: str,
    x_label: str,
    y_label: str,
    x_axis: XAxis = "auto",
    width: float = 480,
    height: float = 280,
) -> Svg:
    """A metric against an axis, one line with points per series.

    ``x_axis`` says how x values are placed: ``values`` spaces numbers by value with a tick at
    each (on a log2 scale when they span a factor of 16 or more, as batch sizes do), ``linear``
    spaces them by value with round ticks (time), ``category`` spaces values evenly in the order
    they first appear, and ``auto`` takes ``values`` when every x is a number, else ``category``.

    Args:
        series: The lines; points with ``y`` None are left out.
        title: Chart title (also its accessible name).
        x_label: Axis label under the chart, with its unit.
        y_label: Axis label beside the chart, with its unit.
        x_axis: How x values are placed (above).
        width: Width in pixels.
        height: Height of the plot and its axes in pixels (the legend adds to it).

    Returns:
        The SVG document, or a :func:`placeholder` when no point has a value.
    """
    ys = [y for one in series for _, y in one.points if y is not None and math.isfinite(y)]
    if not ys:
        return placeholder(f"{title}: no values in this record", width=width)
    positions, x_ticks, x_lo, x_hi = _x_positions(series, x_axis)
    y_ticks = nice_ticks(min(0.0, *ys), max(0.0, *ys))
    frame = _Frame(64, 28, width - 80, height - 28 - 44, x_lo, x_hi, y_ticks[0], y_ticks[-1])
    legend, legend_h = _legend(
        [one.name for one in series] if len(series) > 1 else [],
        left=frame.left,
        top=height + 2,
        width=frame.width,
    )
    parts = _open(width, height + legend_h + (6 if legend_h else 0), title)
    parts.append(_text(frame.left, 16, _clip(title, 70), extra=' font-weight="600"'))
    parts += _y_axis(frame, y_ticks, y_label)
    parts += _x_axis(frame, x_ticks, x_label)
    for i, one in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        points = sorted(
            (positions[x], y) for x, y in one.points if y is not None and math.isfinite(y)
        )
        if len(points) > 1:
            path = "".join(
                f"{'M' if j == 0 else 'L'}{_n(frame.px(x))} {_n(frame.py(y))}"
                for j, (x, y) in enumerate(points)
            )
            parts.append(f'<path d="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        # Each point is a zero-length segment with a round cap: a dot, in one path per series.
        dots = "".join(f"M{_n(frame.px(x))} {_n(frame.py(y))}h0" for x, y in points)
        parts.append(f'<path d="{dots}" stroke="{color}" stroke-width="7" stroke-linecap="round"/>')
    parts += legend
    parts.append("</svg>")
    return Svg("".join(parts))


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (lower is better on each).

    Args:
        points: ``(x, y)`` pairs.

    Returns:
        The indices on the front, in ascending ``x``; of identical points only the first.
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1], i))
    front: list[int] = []
    best = math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def pareto_scatter(
    points: Sequence[ScatterPoint],
    *,
    title: str,
    x_label: str,
    y_label: str,
    width: float = 480,
    height: float = 300,
) -> Svg:
    """A scatter of cases with the Pareto front (lower-left is better) drawn and labelled.

    Args:
        points: One point per case; non-finite coordinates are left out.
        title: Chart title (also its accessible name).
        x_label: Axis label under the chart, with its unit.
        y_label: Axis label beside the chart, with its unit.
        width: Width in pixels.
        height: Height in pixels.

    Returns:
        The SVG document, or a :func:`placeholder` when no point has both coordinates.
    """
    usable = [p for p in points if math.isfinite(p.x) and math.isfinite(p.y)]
    if not usable:
        return placeholder(f"{title}: no values in this record", width=width)
    x_ticks = nice_ticks(min(0.0, *(p.x for p in usable)), max(0.0, *(p.x for p in usable)))
    y_ticks = nice_ticks(min(0.0, *(p.y for p in usable)), max(0.0, *(p.y for p in usable)))
    frame = _Frame(
        64, 40, width - 80, height - 40 - 44, x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]
    )
    front = pareto_front([(p.x, p.y) for p in usable])
    on_front = set(front)
    parts = _open(width, height, title)
    parts.append(_text(frame.left, 16, _clip(title, 70), extra=' font-weight="600"'))
    parts.append(
        _text(
            frame.left,
            31,
            "\u25cf Pareto front: no other case is lower on both axes (lower-left is better)",
            extra=f' fill="{PALETTE[1]}"',
        )
    )
    parts += _y_axis(frame, y_ticks, y_label)
    parts += _x_axis(frame, [(t, _tick_text(t, x_ticks)) for t in x_ticks], x_label)
    if len(front) > 1:
        coords = [(frame.px(usable[i].x), frame.py(usable[i].y)) for i in front]
        path = f"M{_n(coords[0][0])} {_n(coords[0][1])}" + "".join(
            f"H{_n(x)}V{_n(y)}" for x, y in coords[1:]
        )
        parts.append(
            f'<path d="{path}" fill="none" stroke="{PALETTE[1]}" stroke-width="1.5" '
            f'stroke-dasharray="5 3"/>'
        )
    dots: dict[bool, list[str]] = {False: [], True: []}
    for i, point in enumerate(usable):
        x, y = frame.px(point.x), frame.py(point.y)
        best = i in on_front
        tip = f"{point.label}: {format_number(point.x)}, {format_number(point.y)}"
        radius = "5" if best else "3.5"
        dot = f'<circle cx="{_n(x)}" cy="{_n(y)}" r="{radius}"><title>{_e(tip)}</title></circle>'
        if point.href is not None:
            dot = f'<a href="{_e(point.href)}">{dot}</a>'
        dots[best].append(dot)
    parts.append(f'<g fill="{_AXIS}">{"".join(dots[False])}</g>')
    parts.append(f'<g fill="{PALETTE[1]}">{"".join(dots[True])}</g>')
    parts += _front_labels(frame, [usable[i] for i in front])
    parts.append("</svg>")
    return Svg("".join(parts))


def _front_labels(frame: _Frame, points: Sequence[ScatterPoint]) -> list[str]:
    """Labels for the front's points, nudged up or down until they do not overlap; a label with
    no free place is left out (the point's tooltip still names it)."""
    placed: list[tuple[float, float, float, float]] = []
    labels = []
    for point in points:
        x, y = frame.px(point.x), frame.py(point.y)
        text = _clip(point.label, 28)
        w = len(text) * _CHAR_W
        end = x > frame.left + frame.width * 0.6
        left = x - 7 - w if end else x + 7
        for dy in (-6, 14, -20, 28, -34, 42):
            base = y + dy
            box = (left, base - 10, left + w, base + 2)
            inside = frame.top <= box[1] and box[3] <= frame.top + frame.height
            if inside and not any(
                box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed
            ):
                placed.append(box)
                labels.append(_text(left, base, text))
                break
    return labels


def latency_distribution(
    summaries: Mapping[str, DistributionSummary],
    *,
    title: str = "Latency distribution",
    width: float = 480,
) -> Svg:
    """One box-like strip per latency, each on its own axis from 0.

    The box spans p50 to p90, ticks mark p50, p95 and p99, the ring is the mean and the thin
    line runs from min to max. Each row is scaled from 0 to a round number at or above its p99,
    so a long tail does not squash the body; a max beyond that ends in an arrowhead at the
    edge. The text on the right gives p50, p99, max and the number of values.

    Args:
        summaries: Distributions by name (``ttft_ms``, ``tpot_ms``, ...).
        title: Chart title (also its accessible name).
        width: Width in pixels.

    Returns:
        The SVG document, or a :func:`placeholder` when no distribution has values.
    """
    rows = [
        (name, s) for name, s in summaries.items() if s.n > 0 and s.max is not None and s.max > 0
    ]
    if not rows:
        return placeholder(f"{title}: no latencies in this record", width=width, height=24)
    row_h, top, left, right = 26, 4, 60, 262
    span = width - left - right
    whiskers, arrows, ticks, boxes, means, labels, values = [], [], [], [], [], [], []
    for i, (name, s) in enumerate(rows):
        mid = top + i * row_h + row_h / 2
        high = float(s.p99 if s.p99 is not None and s.p99 > 0 else s.max or 0.0)
        scale = nice_ticks(0.0, high)[-1]

        def px(value: float | None, scale: float = scale) -> float:
            return left + min(value or 0.0, scale) / scale * span

        whiskers.append(f"M{_i(px(s.min))} {_i(mid)}H{_i(px(s.max))}")
        if (s.max or 0.0) > scale:
            arrows.append(f"M{_i(left + span)} {_i(mid - 4)}l6 4l-6 4z")
        ticks += [f"M{_i(px(v))} {_i(mid - 7)}v14" for v in (s.p50, s.p95, s.p99) if v is not None]
        if s.p50 is not None and s.p90 is not None:
            boxes.append(
                f'<rect x="{_i(px(s.p50))}" y="{_i(mid - 6)}" '
                f'width="{_i(max(px(s.p90) - px(s.p50), 1))}" height="12"/>'
            )
        if s.mean is not None:
            means.append(f'<circle cx="{_i(px(s.mean))}" cy="{_i(mid)}" r="3"/>')
        labels.append(_text(left - 6, mid + 4, name))
        values.append(
            _text(
                left + span + 12,
                mid + 4,
                f"p50 {format_number(s.p50, digits=3)}, p99 {format_number(s.p99, digits=3)}, "
                f"max {format_number(s.max, digits=3)} {s.unit} (n={s.n})",
            )
        )
    parts = _open(width, top + row_h * len(rows) + 4, title, tooltip=False)
    parts.append(f'<path d="{"".join(whiskers)}" stroke="{_AXIS}"/>')
    if arrows:
        parts.append(f'<path d="{"".join(arrows)}" fill="{_AXIS}"/>')
    parts.append(f'<g fill="{PALETTE[5]}" stroke="{PALETTE[0]}">{"".join(boxes)}</g>')
    parts.append(f'<path d="{"".join(ticks)}" stroke="{PALETTE[0]}" stroke-width="1.5"/>')
    parts.append(f'<g fill="#fff" stroke="{PALETTE[1]}">{"".join(means)}</g>')
    parts.append(f'<g text-anchor="end">{"".join(labels)}</g>')
    parts.append(f'<g fill="{_MUTED}">{"".join(values)}</g>')
    parts.append("</svg>")
    return Svg("".join(parts))


def power_timeline(
    series: Sequence[Sequence[tuple[float, float]]] | None,
    *,
    title: str = "Power timeline",
    unit: str = "W",
    width: float = 480,
    height: float = 200,
) -> Svg:
    """Power over each measured window, one line per window.

    Args:
        series: Per window, ``(seconds since the window opened, power)`` samples; None or
            empty when the record holds no power samples.
        title: Chart title (also its accessible name).
        unit: Unit of the power values.
        width: Width in pixels.
        height: Height in pixels.

    Returns:
        The SVG document, or a placeholder saying the record has no power timeline.
    """
    if not series or not any(series):
        return placeholder("no power timeline in this record", width=width, height=24)
    lines = [
        Series(name=f"window {i}", points=[(t, p) for t, p in samples])
        for i, samples in enumerate(series)
    ]
    return line_chart(
        lines,
        title=title,
        x_label="time in window (s)",
        y_label=f"power ({unit})",
        x_axis="linear",
        width=width,
        height=height,
    )

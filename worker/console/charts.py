"""Plots as inline SVG, drawn on the server: no charting library, no script, nothing fetched. Every text is
escaped; colours are presentation attributes (the Content-Security-Policy allows no inline style)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from html import escape

from markupsafe import Markup

__all__ = ["stacked_bars", "bars", "lines", "COLOURS", "HALF"]

W, H = 760, 260
#: The width of a chart shown at half the page (its text stays as large as a full-width chart's).
HALF = 520
LEFT, RIGHT, TOP, BOTTOM = 56, 16, 16, 44
#: One colour per series, readable by most colour-blind people (Okabe-Ito).
COLOURS = {
    "succeeded": "#009E73",
    "failed": "#D55E00",
    "cancelled": "#999999",
    "p50": "#0072B2",
    "p90": "#E69F00",
    "p99": "#CC79A7",
}
_CYCLE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#999999"]


def _nice(top: float) -> float:
    """A round upper bound for an axis of four steps, each 1, 2, 2.5 or 5 x 10^n (at least 4: whole counts)."""
    if top <= 4:
        return 4.0
    step = top / 4
    scale = 1.0
    while scale * 10 <= step:
        scale *= 10
    for nice in (1, 2, 2.5, 5, 10):
        if nice * scale >= step:
            return 4 * nice * scale
    return 40 * scale


def _frame(title: str, top: float, unit: str, w: int = W) -> list[str]:
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {H}" role="img" class="chart" '
        f'aria-label="{escape(title)}"><title>{escape(title)}</title>'
    ]
    plot_h = H - TOP - BOTTOM
    for i in range(5):
        value = top * i / 4
        y = TOP + plot_h - plot_h * i / 4
        out.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{w - RIGHT}" y2="{y:.1f}" stroke="#e3e6ea" stroke-width="1"/>')
        label = f"{value:,.0f}" if value == int(value) else f"{value:,.1f}"
        out.append(
            f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11" fill="#5b6573">'
            f"{escape(label)}{escape(unit)}</text>"
        )
    out.append(f'<line x1="{LEFT}" y1="{TOP + plot_h}" x2="{w - RIGHT}" y2="{TOP + plot_h}" stroke="#8a94a3"/>')
    return out


def _x_labels(labels: Sequence[str], slot: float, most: int = 12) -> list[str]:
    out = []
    every = max(1, -(-len(labels) // most))
    for i, label in enumerate(labels):
        if i % every == 0:
            x = LEFT + slot * (i + 0.5)
            out.append(
                f'<text x="{x:.1f}" y="{H - BOTTOM + 16}" text-anchor="middle" font-size="11" fill="#5b6573">'
                f"{escape(label)}</text>"
            )
    return out


def _legend(names: Sequence[str], colours: dict[str, str]) -> list[str]:
    out, x = [], float(LEFT)
    for name in names:
        out.append(f'<rect x="{x}" y="{H - 16}" width="10" height="10" fill="{colours[name]}"/>')
        out.append(f'<text x="{x + 14}" y="{H - 7}" font-size="11" fill="#2b3440">{escape(name)}</text>')
        x += 24 + 7 * len(name)
    return out


def _hour_label(when: datetime, span_days: float) -> str:
    return when.strftime("%d %b %H:00" if span_days > 1 else "%H:00")


def stacked_bars(title: str, hours: Sequence[tuple[datetime, Counter[str]]], series: Sequence[str]) -> Markup:
    """Per hour, a bar stacked by series (jobs per hour by outcome)."""
    top = _nice(max((sum(c[s] for s in series) for _, c in hours), default=0))
    out = _frame(title, top, "")
    plot_w, plot_h = W - LEFT - RIGHT, H - TOP - BOTTOM
    slot = plot_w / max(1, len(hours))
    span = len(hours) / 24
    for i, (hour, counts) in enumerate(hours):
        y = float(TOP + plot_h)
        for name in series:
            if counts[name]:
                height = plot_h * counts[name] / top
                y -= height
                out.append(
                    f'<rect x="{LEFT + slot * i + slot * 0.15:.1f}" y="{y:.1f}" width="{slot * 0.7:.1f}" '
                    f'height="{height:.1f}" fill="{COLOURS[name]}"><title>{escape(_hour_label(hour, 2))} UTC: '
                    f"{counts[name]} {escape(name)}</title></rect>"
                )
    out += _x_labels([_hour_label(h, span) for h, _ in hours], slot, most=12)
    out += _legend(series, COLOURS)
    out.append("</svg>")
    return Markup("".join(out))  # noqa: S704 - every text above went through escape()


def bars(title: str, counts: Sequence[tuple[str, int]], w: int = W) -> Markup:
    """One bar per category (attempts by upstream status)."""
    top = _nice(max((n for _, n in counts), default=0))
    out = _frame(title, top, "", w)
    plot_w, plot_h = w - LEFT - RIGHT, H - TOP - BOTTOM
    slot = plot_w / max(1, len(counts))
    for i, (label, n) in enumerate(counts):
        height = plot_h * n / top
        colour = _CYCLE[0] if label.startswith("2") else _CYCLE[1] if label.startswith("4") else _CYCLE[3]
        x = LEFT + slot * i + slot * 0.2
        out.append(
            f'<rect x="{x:.1f}" y="{TOP + plot_h - height:.1f}" width="{slot * 0.6:.1f}" height="{height:.1f}" '
            f'fill="{colour}"><title>{escape(label)}: {n}</title></rect>'
        )
        out.append(
            f'<text x="{x + slot * 0.3:.1f}" y="{TOP + plot_h - height - 4:.1f}" text-anchor="middle" font-size="11" '
            f'fill="#2b3440">{n}</text>'
        )
    out += _x_labels([label for label, _ in counts], slot)
    out.append("</svg>")
    return Markup("".join(out))  # noqa: S704 - every text above went through escape()


def lines(
    title: str, hours: Sequence[tuple[datetime, dict[str, float | None]]], series: Sequence[str], w: int = W
) -> Markup:
    """Per hour, one line per series (latency percentiles); an hour without a value breaks the line."""
    top = _nice(max((v for _, values in hours for v in values.values() if v is not None), default=0))
    out = _frame(title, top, " ms", w)
    plot_w, plot_h = w - LEFT - RIGHT, H - TOP - BOTTOM
    slot = plot_w / max(1, len(hours))
    span = len(hours) / 24
    for name in series:
        points: list[str] = []
        segments: list[list[str]] = [points]
        for i, (hour, values) in enumerate(hours):
            value = values.get(name)
            if value is None:
                points = []
                segments.append(points)
                continue
            x, y = LEFT + slot * (i + 0.5), TOP + plot_h - plot_h * value / top
            points.append(f"{x:.1f},{y:.1f}")
            out.append(
                f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{COLOURS[name]}"><title>'
                f"{escape(_hour_label(hour, 2))} UTC {escape(name)}: {value:,.0f} ms</title></circle>"
            )
        for segment in segments:
            if len(segment) > 1:
                out.append(
                    f'<polyline points="{" ".join(segment)}" fill="none" stroke="{COLOURS[name]}" stroke-width="2"/>'
                )
    out += _x_labels([_hour_label(h, span) for h, _ in hours], slot, most=12 * w // W)
    out += _legend(series, COLOURS)
    out.append("</svg>")
    return Markup("".join(out))  # noqa: S704 - every text above went through escape()

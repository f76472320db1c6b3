"""Charts drawn on the server as SVG: no script, no library, and every
label escaped. Colours are presentation attributes, so the page's CSP needs
no inline styles."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from markupsafe import Markup, escape

WIDTH, HEIGHT = 640, 200
LEFT, RIGHT, TOP, BOTTOM = 52, 12, 12, 28


@dataclass(frozen=True)
class Line:
    label: str
    colour: str
    values: Sequence[float | None]  # one per x label; None: no point there


def _y_scale(top: float) -> tuple[float, list[float]]:
    """The smallest of 1, 2, 5 × 10^k at or above ``top``, and five ticks."""
    top = max(top, 1e-3)
    magnitude = 10 ** math.floor(math.log10(top))
    nice = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= top)
    return nice, [nice * i / 4 for i in range(5)]


def line_chart(title: str, x_labels: Sequence[str], lines: Sequence[Line], unit: str) -> Markup:
    """Lines over shared x labels (every few labelled), a y axis in ``unit``."""
    present = [v for line in lines for v in line.values if v is not None]
    y_max, ticks = _y_scale(max(present, default=1.0))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    n = max(1, len(x_labels) - 1)

    def x(i: int) -> float:
        return LEFT + plot_w * i / n

    def y(v: float) -> float:
        return TOP + plot_h * (1 - v / y_max)

    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{escape(title)}</title>",
    ]
    for tick in ticks:
        parts.append(
            f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" '
            'stroke="#e3e6ea" stroke-width="1"/>'
            f'<text x="{LEFT - 6}" y="{y(tick) + 4:.1f}" text-anchor="end" font-size="11" '
            f'fill="#5b6470">{tick:g}{escape(unit)}</text>'
        )
    every = max(1, len(x_labels) // 6)
    for i, label in enumerate(x_labels):
        if i % every == 0:
            parts.append(
                f'<text x="{x(i):.1f}" y="{HEIGHT - 8}" text-anchor="middle" font-size="11" '
                f'fill="#5b6470">{escape(label)}</text>'
            )
    for line in lines:
        points = [(x(i), y(v)) for i, v in enumerate(line.values) if v is not None]
        if len(points) > 1:
            path = " ".join(f"{px:.1f},{py:.1f}" for px, py in points)
            parts.append(
                f'<polyline points="{path}" fill="none" stroke="{line.colour}" stroke-width="2"/>'
            )
        for px, py in points:
            parts.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="2.5" fill="{line.colour}"/>')
    legend_x = LEFT + 8
    for line in lines:
        parts.append(
            f'<rect x="{legend_x}" y="{TOP + 2}" width="10" height="10" fill="{line.colour}"/>'
            f'<text x="{legend_x + 14}" y="{TOP + 11}" font-size="11" fill="#1f2933">'
            f"{escape(line.label)}</text>"
        )
        legend_x += 24 + 7 * len(line.label)
    parts.append("</svg>")
    return Markup("".join(parts))

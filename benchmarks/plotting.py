"""A small scatter plot drawn with Pillow (no matplotlib): used by ``sweep.py`` and ``protocol.py``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PALETTE = ("blue", "green", "orange", "purple", "brown", "gray", "cyan", "magenta", "olive", "navy")
#: series drawn in a fixed colour; every other series gets the next colour of PALETTE
FIXED_COLOURS = {"specdiff": "red", "inductor": "black"}


@dataclass(frozen=True)
class Point:
    """One marker: ``series`` picks the colour (and the legend entry); ``y_low``, when given,
    draws a vertical segment from ``y`` down to it (e.g. the worst image under the mean);
    ``label``, when given, is written next to the marker."""

    series: str
    x: float
    y: float
    y_low: float | None = None
    label: str = ""


def scatter(points: list[Point], path: Path, *, x_label: str, y_label: str, title: str = "",
            y_cap: float = 60.0, size: tuple[int, int] = (720, 480)) -> None:
    """Write a scatter plot of ``points`` to ``path`` (PNG); y values are clipped at ``y_cap``
    (infinite PSNR). Nothing is written when there is no point."""
    from PIL import Image, ImageDraw

    pts = [p for p in points if p.x == p.x and p.y == p.y]  # drop NaN
    if not pts:
        return
    w, h = size
    pad = 60
    xs = [p.x for p in pts]
    ys = [min(p.y, y_cap) for p in pts]
    lows = [min(p.y_low, y_cap) for p in pts if p.y_low is not None and p.y_low == p.y_low]
    x0, x1 = 0.0, max(xs) * 1.1 or 1.0
    y0, y1 = min(ys + lows) - 2, max(ys) + 2
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.line([(pad, h - pad), (w - pad, h - pad)], fill="black")
    d.line([(pad, pad), (pad, h - pad)], fill="black")
    d.text((w // 2 - 6 * len(x_label) // 2, h - pad + 25), x_label, fill="black")
    d.text((5, pad - 30), y_label, fill="black")
    if title:
        d.text((w // 2 - 6 * len(title) // 2, 8), title, fill="black")
    for i in range(6):
        xv, yv = x0 + (x1 - x0) * i / 5, y0 + (y1 - y0) * i / 5
        px, py = pad + (w - 2 * pad) * i / 5, h - pad - (h - 2 * pad) * i / 5
        d.text((px - 10, h - pad + 5), f"{xv:.1f}", fill="black")
        d.text((5, py - 5), f"{yv:.0f}", fill="black")
    others = sorted({p.series for p in pts} - set(FIXED_COLOURS))
    colours = {**FIXED_COLOURS, **{m: PALETTE[i % len(PALETTE)] for i, m in enumerate(others)}}

    def to_px(x: float, y: float) -> tuple[float, float]:
        return pad + (w - 2 * pad) * (x - x0) / (x1 - x0), h - pad - (h - 2 * pad) * (y - y0) / (y1 - y0)

    series = sorted({p.series for p in pts})
    # the legend goes into the top corner that covers fewer markers
    box_w, box_h = 160, 15 * len(series)
    marks = [to_px(p.x, y) for p, y in zip(pts, ys)]
    corners = [w - pad - 150, pad + 10]
    legend_x = min(corners, key=lambda lx: sum(lx - 8 <= mx <= lx + box_w and pad - 8 <= my <= pad + box_h
                                               for mx, my in marks))
    for p, y in zip(pts, ys):
        colour = colours[p.series]
        px, py = to_px(p.x, y)
        if p.y_low is not None and p.y_low == p.y_low:
            _, py_low = to_px(p.x, min(p.y_low, y_cap))
            d.line([(px, py), (px, py_low)], fill=colour)
            d.line([(px - 3, py_low), (px + 3, py_low)], fill=colour)
        d.ellipse([px - 4, py - 4, px + 4, py + 4], fill=colour)
        if p.label:
            d.text((px + 6, py - 6), p.label, fill=colour)
    for i, m in enumerate(series):
        d.rectangle([legend_x, pad + 15 * i, legend_x + 8, pad + 15 * i + 8], fill=colours[m])
        d.text((legend_x + 15, pad + 15 * i - 2), m, fill="black")
    img.save(path)

"""A small bar chart PNG with error whiskers, drawn with Pillow (already installed with torchvision).

Enough for `cofx bench --plot` (a few labelled bars with their spread) and for the
benchmark tables (many bars over orders of magnitude: `bar_rows`, one row each on a
log scale), no plotting library to install.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

W, H = 720, 440
LEFT, RIGHT, TOP, BOTTOM = 80, 30, 56, 70
COLOURS = ("#3182bd", "#9ecae1", "#e6550d", "#a1d99b")


def _nice_max(value: float) -> float:
    """The smallest 1/2/2.5/5 x 10^k at or above `value`, for the y axis."""
    if value <= 0:
        return 1.0
    base = 10 ** math.floor(math.log10(value))
    return next(m * base for m in (1, 2, 2.5, 5, 10) if m * base >= value)


def bar_chart(path, bars: Sequence[Tuple[str, float, float, float]], title: str, unit: str, note: str = "") -> None:
    """Write a PNG to `path`: one bar per (label, value, low, high), whiskers from low to high, values in `unit`.

    `note` is a line of small print under the bars (what the whiskers mean, say).
    """
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError:
        raise ValueError("drawing a plot needs Pillow: pip install pillow") from None
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font, small = ImageFont.load_default(size=16), ImageFont.load_default(size=13)
    d.text((W // 2, 20), title, fill="black", font=font, anchor="mm")
    top = _nice_max(max(high for _, _, _, high in bars) * 1.1)
    plot_h = H - TOP - BOTTOM

    def y(v):
        return H - BOTTOM - plot_h * v / top
    for i in range(6):
        v = top * i / 5
        d.line([(LEFT, y(v)), (W - RIGHT, y(v))], fill="#dddddd")
        d.text((LEFT - 8, y(v)), f"{v:.3g}", fill="black", font=small, anchor="rm")
    d.text((18, TOP + plot_h // 2), unit, fill="black", font=small, anchor="mm")
    d.line([(LEFT, TOP), (LEFT, H - BOTTOM), (W - RIGHT, H - BOTTOM)], fill="black")
    slot = (W - LEFT - RIGHT) / len(bars)
    for i, (label, value, low, high) in enumerate(bars):
        cx = LEFT + slot * (i + 0.5)
        half = slot * 0.3
        d.rectangle([cx - half, y(value), cx + half, H - BOTTOM], fill=COLOURS[i % len(COLOURS)])
        d.line([(cx, y(high)), (cx, y(low))], fill="black", width=2)
        for v in (low, high):
            d.line([(cx - 8, y(v)), (cx + 8, y(v))], fill="black", width=2)
        d.text((cx, y(high) - 10), f"{value:.3g} {unit}", fill="black", font=small, anchor="mb")
        d.text((cx, H - BOTTOM + 18), label, fill="black", font=small, anchor="mm")
    if note:
        d.text((W // 2, H - 22), note, fill="#555555", font=small, anchor="mm")
    img.save(path, format="PNG")


def bar_rows(path, bars: Sequence[Tuple[str, float, float, float]], title: str, unit: str, note: str = "") -> None:
    """Write a PNG to `path`: one horizontal bar per (label, value, low, high) on a log scale, whiskers from low
    to high, labels on the left; the image grows with the number of bars."""
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError:
        raise ValueError("drawing a plot needs Pillow: pip install pillow") from None
    row, label_w, top_m, bottom_m, right_m = 20, 250, 50, 56, 90
    width, height = 900, top_m + bottom_m + row * len(bars)
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    font, small = ImageFont.load_default(size=16), ImageFont.load_default(size=12)
    d.text((width // 2, 20), title, fill="black", font=font, anchor="mm")
    lo = 10 ** math.floor(math.log10(min(low for _, _, low, _ in bars)))
    hi = 10 ** math.ceil(math.log10(max(high for _, _, _, high in bars)))
    plot_w = width - label_w - right_m

    def x(v):
        return label_w + plot_w * (math.log10(max(v, lo)) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))
    bottom = height - bottom_m
    decade = lo
    while decade <= hi:
        d.line([(x(decade), top_m), (x(decade), bottom)], fill="#dddddd")
        d.text((x(decade), bottom + 12), f"{decade:g} {unit}", fill="black", font=small, anchor="mm")
        decade *= 10
    for i, (label, value, low, high) in enumerate(bars):
        cy = top_m + row * (i + 0.5)
        d.rectangle([label_w, cy - row * 0.35, x(value), cy + row * 0.35], fill=COLOURS[i % len(COLOURS)])
        d.line([(x(low), cy), (x(high), cy)], fill="black", width=2)
        d.text((label_w - 8, cy), label, fill="black", font=small, anchor="rm")
        d.text((x(high) + 6, cy), f"{value:.3g}", fill="black", font=small, anchor="lm")
    d.line([(label_w, top_m), (label_w, bottom)], fill="black")
    if note:
        d.text((width // 2, height - 16), note, fill="#555555", font=small, anchor="mm")
    img.save(path, format="PNG")

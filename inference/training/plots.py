"""ROC and reliability plots as PNG, drawn with Pillow (no plotting library needed)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

_SIZE = 520
_MARGIN = 60
_COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189))


@dataclass(frozen=True)
class Curve:
    """One line on a unit-square plot: (x, y) points in [0, 1], a legend label, markers or not."""

    x: Sequence[float]
    y: Sequence[float]
    label: str
    markers: bool = False


def unit_square_plot(path: Path, title: str, x_label: str, y_label: str, curves: Sequence[Curve], footer: str = "") -> Path:
    """Draw ``curves`` on [0, 1] x [0, 1] axes with a dashed diagonal and write a PNG."""
    image = Image.new("RGB", (_SIZE, _SIZE + 40), "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = _MARGIN, 40, _SIZE - 20, _SIZE - _MARGIN

    def to_pixel(x: float, y: float) -> tuple[float, float]:
        return left + x * (right - left), bottom - y * (bottom - top)

    draw.rectangle((left, top, right, bottom), outline="black")
    for tick in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0):
        px, _ = to_pixel(tick, 0)
        _, py = to_pixel(0, tick)
        draw.line((px, bottom, px, bottom + 5), fill="black")
        draw.line((left - 5, py, left, py), fill="black")
        draw.text((px - 8, bottom + 8), f"{tick:.1f}", fill="black")
        draw.text((left - 30, py - 5), f"{tick:.1f}", fill="black")
    for step in range(0, 40, 2):  # dashed diagonal: chance (ROC) or perfect calibration
        a, b = step / 40, (step + 1) / 40
        draw.line((*to_pixel(a, a), *to_pixel(b, b)), fill=(150, 150, 150))
    draw.text((left, 12), title, fill="black")
    draw.text(((left + right) / 2 - 40, bottom + 26), x_label, fill="black")
    _vertical_text(image, y_label, x=8, centre_y=(top + bottom) / 2)
    for number, curve in enumerate(curves):
        colour = _COLOURS[number % len(_COLOURS)]
        points = [to_pixel(min(max(x, 0.0), 1.0), min(max(y, 0.0), 1.0)) for x, y in zip(curve.x, curve.y)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        if curve.markers or len(points) == 1:
            for px, py in points:
                draw.ellipse((px - 3, py - 3, px + 3, py + 3), outline=colour, fill=colour)
        draw.text((left + 10, top + 10 + 14 * number), curve.label, fill=colour)
    if footer:
        draw.text((left, _SIZE + 14), footer, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path


def _vertical_text(image: Image.Image, text: str, x: int, centre_y: float) -> None:
    """Write ``text`` rotated by 90 degrees (reading bottom to top) at the left edge."""
    probe = ImageDraw.Draw(image)
    left, top, right, bottom = probe.textbbox((0, 0), text)
    label = Image.new("RGB", (int(right - left) + 4, int(bottom - top) + 4), "white")
    ImageDraw.Draw(label).text((2 - left, 2 - top), text, fill="black")
    rotated = label.rotate(90, expand=True)
    image.paste(rotated, (x, int(centre_y - rotated.height / 2)))

"""``overview.png``: the slide in grey with one class's probability heatmap and a colour bar.

The slide is drawn in grey and the heatmap in the upper three quarters of viridis (blue ->
teal -> green -> yellow, perceptually uniform, readable with colour-vision deficiencies), so no
pixel of the picture has the pink or purple of H&E stain: a colour on it is always the model's
output, never the tissue's. Cells are nearly transparent at probability 0 and more opaque the
more probable the class; the colour bar shows the same colours and opacities.

Drawn directly with Pillow and numpy (no plotting library: matplotlib's import and figure
took about half a second a slide alone, two under load): an 880 px wide picture with the
two-line title, µm axes, the picture and the colour bar.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

__all__ = ["OverviewChoice", "choose_overview_class", "write_overview", "OVERVIEW_NOTE_COLOR"]

_VIRIDIS_FROM = 0.25
"""Where the map starts in viridis: its lower quarter is purple."""
_ALPHA = (0.12, 0.9)
"""Opacity of an analysed cell at probability 0 and 1."""
OVERVIEW_NOTE_COLOR = "#dceeff"
"""Face colour of the box that states why there is no heatmap (tests find it by its pixels)."""
_USUAL_CLASSES = ("background", "tissue")
"""Names of the expected, uninformative classes of a QC model."""


@dataclass(frozen=True)
class OverviewChoice:
    """Which class overview.png shows, and why (recorded in summary.json)."""

    class_name: str
    reason: str


def choose_overview_class(
    class_names: Sequence[str], probabilities: np.ndarray, requested: str | None
) -> OverviewChoice:
    """``requested`` when the model has it; else the most informative class.

    That is, of the classes other than the first (background by convention) and those named
    background or tissue, the one with the highest mean probability over the slide's tiles:
    for a QC model the worst artefact. A model with no such class shows its second class.
    """
    names = tuple(class_names)
    if requested is not None and requested in names:
        return OverviewChoice(requested, "requested (overview_class)")
    candidates = [i for i in range(1, len(names)) if names[i].lower() not in _USUAL_CLASSES]
    if candidates:
        means = probabilities.mean(axis=0) if len(probabilities) else np.zeros(len(names))
        best = max(candidates, key=lambda i: (float(means[i]), -i))  # ties: the earlier class
        reason = f"default: highest mean probability among {', '.join(names[i] for i in candidates)}"
    else:
        best = min(1, len(names) - 1)
        reason = "default: the second class (no class other than background and tissue)"
    if requested is not None:
        reason = f"{requested!r} is not a class of this model; {reason}"
    return OverviewChoice(names[best], reason)


# viridis (matplotlib's, rounded to 8 bits) at t = 0, 1/32, ..., 1; linear in between.
_VIRIDIS_33 = (
    "440154 470d60 48186a 482374 472d7b 453781 424086 3e4989 3b528b 375b8d 33638d 2f6b8e 2c728e 297a8e 26828e "
    "23898e 21918c 1f988b 1fa088 22a785 28ae80 32b67a 3fbc73 4ec36b 5ec962 70cf57 84d44b 98d83e addc30 c2df23 "
    "d8e219 ece51b fde725"
)

# The picture, in pixels: 8 x (3 to 12) inches at 110 dpi, as the figure it replaces.
_WIDTH_PX = 880
_DPI = 110
_MARGIN_PX = {"left": 94, "right": 96, "top": 66, "bottom": 58}
_BAR_WIDTH_PX = 22
_BAR_GAP_PX = 26
_TEXT_PX = 15
"""10 pt at 110 dpi: title, ticks and axis labels."""
_NOTE_TEXT_PX = 21
_BLACK = (0, 0, 0)
_WHITE = (255, 255, 255)


def _probability_colors() -> np.ndarray:
    """(256, 4) float RGBA of probability 0..1: the upper three quarters of viridis, opacity rising."""
    anchors = np.array([[int(h[i : i + 2], 16) for i in (0, 2, 4)] for h in _VIRIDIS_33.split()], np.float64)
    t = np.linspace(0.0, 1.0, 256)
    where = _VIRIDIS_FROM + (1 - _VIRIDIS_FROM) * t
    grid = np.linspace(0.0, 1.0, len(anchors))
    rgb = np.stack([np.interp(where, grid, anchors[:, c]) for c in range(3)], axis=1)
    alpha = _ALPHA[0] + (_ALPHA[1] - _ALPHA[0]) * t
    return np.column_stack([rgb, alpha])


def _grey(thumbnail: np.ndarray) -> np.ndarray:
    rgb = thumbnail[..., :3].astype(np.float32)
    return rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


_Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


@functools.lru_cache(maxsize=4)
def _font(size_px: int) -> _Font:
    """DejaVu Sans where the system has it (matplotlib's face, with a µ), else Pillow's own."""
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size_px)
    except OSError:
        return ImageFont.load_default(size=size_px)


def _um(font: _Font) -> str:
    """"µm", or "um" with a font that has no µ (drawn as its missing-glyph box)."""
    missing = font.getmask("\U0010fffd")
    micro = font.getmask("µ")
    return "µm" if micro.size != missing.size or bytes(micro) != bytes(missing) else "um"


def _nice_step(extent: float, ticks: int = 5) -> float:
    """A tick spacing of 1, 2 or 5 x 10^k giving about ``ticks`` ticks over ``extent``."""
    raw = max(extent, 1e-9) / ticks
    power = 10.0 ** np.floor(np.log10(raw))
    return float(min((m * power for m in (1.0, 2.0, 5.0, 10.0)), key=lambda s: abs(s - raw)))


def _tick_label(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1 or value == 0 else f"{value:g}"


def _blend(base: np.ndarray, rgba: np.ndarray) -> np.ndarray:
    """``rgba`` (float, 0-255 colour and 0-1 opacity) over ``base`` (float RGB)."""
    alpha = rgba[..., 3:4]
    return base * (1 - alpha) + rgba[..., :3] * alpha


def _panel(grey: np.ndarray, size: tuple[int, int], heatmap: np.ndarray | None, kept: np.ndarray,
           um_per_px: float, spacing_um: float, origin_um: float) -> np.ndarray:
    """The picture (rows, cols, 3) uint8: the slide in grey, the heatmap's kept cells over it."""
    width, height = size
    image = Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8), mode="L")
    resized = np.asarray(image.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)
    rgb = np.repeat(resized[..., None], 3, axis=2)
    if heatmap is None or heatmap.size == 0:
        return rgb.astype(np.uint8)
    rows, cols = heatmap.shape
    # Cell centres at origin + i * spacing: cell i spans half a spacing either side.
    first_edge_um = origin_um - spacing_um / 2
    col = np.floor(((np.arange(width) + 0.5) * um_per_px - first_edge_um) / spacing_um).astype(np.int64)
    row = np.floor(((np.arange(height) + 0.5) * um_per_px - first_edge_um) / spacing_um).astype(np.int64)
    col_ok, row_ok = (col >= 0) & (col < cols), (row >= 0) & (row < rows)
    col, row = np.clip(col, 0, cols - 1), np.clip(row, 0, rows - 1)
    level = np.round(np.clip(np.nan_to_num(heatmap), 0.0, 1.0) * 255).astype(np.int64)
    rgba = _probability_colors().astype(np.float32)  # float32 throughout: half the time of float64
    cells = rgba[level]  # (rows, cols, 4)
    cells[~kept, 3] = 0.0
    per_px = cells[row][:, col]
    per_px[~row_ok, :, 3] = 0.0
    per_px[:, ~col_ok, 3] = 0.0
    return np.clip(np.round(_blend(rgb, per_px)), 0, 255).astype(np.uint8)


def _colour_bar(height: int) -> np.ndarray:
    """(height, _BAR_WIDTH_PX, 3) uint8: probability 1 at the top, over white."""
    rgba = _probability_colors()
    level = np.round(np.linspace(1.0, 0.0, height) * 255).astype(np.int64)
    column = _blend(np.full((height, 3), 255.0), rgba[level])
    return np.repeat(np.round(column).astype(np.uint8)[:, None, :], _BAR_WIDTH_PX, axis=1)


def _vertical_text(canvas: Image.Image, text: str, centre: tuple[float, float], font: _Font) -> None:
    """``text`` turned 90° anticlockwise, centred at ``centre``."""
    left, top, right, bottom = font.getbbox(text)
    label = Image.new("L", (int(right - left) + 2, int(bottom - top) + 2), 0)
    ImageDraw.Draw(label).text((1 - left, 1 - top), text, fill=255, font=font)
    label = label.rotate(90, expand=True)
    at = (round(centre[0] - label.width / 2), round(centre[1] - label.height / 2))
    canvas.paste(Image.new("RGB", label.size, _BLACK), at, label)


def _wrapped(text: str, font: _Font, width_px: float) -> str:
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}".strip()
            if line and font.getlength(candidate) > width_px:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return "\n".join(lines)


def _axes(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], w_um: float, h_um: float,
          font: _Font) -> None:
    """Frame, ticks and tick labels in µm along the bottom and the left of ``box``."""
    x0, y0, x1, y1 = box
    draw.rectangle((x0 - 1, y0 - 1, x1, y1), outline=_BLACK)
    step = _nice_step(max(w_um, h_um))
    for value in np.arange(0.0, w_um + step * 1e-6, step):
        x = x0 + value / w_um * (x1 - x0) if w_um > 0 else x0
        draw.line((x, y1, x, y1 + 4), fill=_BLACK)
        draw.text((x, y1 + 6), _tick_label(value), fill=_BLACK, font=font, anchor="ma")
    for value in np.arange(0.0, h_um + step * 1e-6, step):
        y = y0 + value / h_um * (y1 - y0) if h_um > 0 else y0
        draw.line((x0 - 5, y, x0 - 1, y), fill=_BLACK)
        draw.text((x0 - 7, y), _tick_label(value), fill=_BLACK, font=font, anchor="rm")


def write_overview(
    thumbnail: np.ndarray,
    thumbnail_mpp: float,
    heatmap: np.ndarray,
    kept: np.ndarray,
    spacing_um: float,
    origin_um: float,
    class_name: str,
    title: str,
    path: Path,
    note: str | None = None,
) -> None:
    """Overlay ``heatmap`` (rows, cols of probabilities; ``kept`` marks the analysed cells) on
    ``thumbnail`` in µm coordinates. ``note`` replaces the heatmap (e.g. 0 tiles) with a notice."""
    h_um, w_um = thumbnail.shape[0] * thumbnail_mpp, thumbnail.shape[1] * thumbnail_mpp
    aspect = h_um / max(w_um, 1e-9)
    fig_w = _WIDTH_PX / _DPI
    height_px = round(max(3.0, min(12.0, fig_w * aspect * 0.9)) * _DPI)
    m = _MARGIN_PX
    box_w = _WIDTH_PX - m["left"] - m["right"] - _BAR_GAP_PX - _BAR_WIDTH_PX
    box_h = height_px - m["top"] - m["bottom"]
    px_per_um = min(box_w / max(w_um, 1e-9), box_h / max(h_um, 1e-9))
    width, height = max(1, round(w_um * px_per_um)), max(1, round(h_um * px_per_um))
    x0 = m["left"] + (box_w - width) // 2
    y0 = m["top"] + (box_h - height) // 2

    canvas = Image.new("RGB", (_WIDTH_PX, height_px), _WHITE)
    picture = _panel(_grey(thumbnail), (width, height), None if note is not None else heatmap, kept,
                     w_um / width, spacing_um, origin_um)
    canvas.paste(Image.fromarray(picture, mode="RGB"), (x0, y0))
    draw = ImageDraw.Draw(canvas)
    font = _font(_TEXT_PX)
    _axes(draw, (x0, y0, x0 + width, y0 + height), w_um, h_um, font)
    draw.text((x0 + width / 2, y0 + height + 8 + 2 * _TEXT_PX), _um(font), fill=_BLACK, font=font, anchor="ma")
    _vertical_text(canvas, _um(font), (m["left"] - 70, y0 + height / 2), font)
    draw.multiline_text((x0 + width / 2, m["top"] - 10), title, fill=_BLACK, font=font, anchor="md",
                        align="center", spacing=3)

    bar_x = m["left"] + box_w + _BAR_GAP_PX
    canvas.paste(Image.fromarray(_colour_bar(height), mode="RGB"), (bar_x, y0))
    draw.rectangle((bar_x - 1, y0 - 1, bar_x + _BAR_WIDTH_PX, y0 + height), outline=_BLACK)
    for value in np.linspace(0.0, 1.0, 6):
        y = y0 + (1 - value) * (height - 1)
        draw.line((bar_x + _BAR_WIDTH_PX, y, bar_x + _BAR_WIDTH_PX + 4, y), fill=_BLACK)
        draw.text((bar_x + _BAR_WIDTH_PX + 7, y), f"{value:.1f}", fill=_BLACK, font=font, anchor="lm")
    _vertical_text(canvas, f"P({class_name})", (bar_x + _BAR_WIDTH_PX + 50, y0 + height / 2), font)

    if note is not None:
        note_font = _font(_NOTE_TEXT_PX)
        text = _wrapped(note, note_font, 0.8 * width)
        left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=note_font, spacing=4)
        pad = int(0.8 * _NOTE_TEXT_PX)
        cx, cy = x0 + width / 2, y0 + height / 2
        half_w, half_h = (right - left) / 2 + pad, (bottom - top) / 2 + pad
        face = tuple(int(OVERVIEW_NOTE_COLOR[i : i + 2], 16) for i in (1, 3, 5))
        draw.rounded_rectangle((cx - half_w, cy - half_h, cx + half_w, cy + half_h), radius=pad,
                               fill=face, outline=_BLACK, width=1)
        draw.multiline_text((cx, cy), text, fill=_BLACK, font=note_font, anchor="mm", align="center", spacing=4)

    info = PngInfo()
    info.add_text("Title", title)
    info.add_text("Description", note or f"P({class_name})")
    # zlib level 1: lossless either way, and a greyscale photo of tissue barely compresses
    # better at the default level 6, which took a third of the time of writing it.
    canvas.save(path, format="PNG", pnginfo=info, compress_level=1, dpi=(_DPI, _DPI))

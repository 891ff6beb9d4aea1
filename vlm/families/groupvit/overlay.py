"""Drawing a Segmentation: tinted regions, outlines, every label's name inside its region, a legend."""

from __future__ import annotations

import colorsys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch.nn import functional as F

from ...errors import InputError

if TYPE_CHECKING:
    from .segmentation import Segmentation

# Okabe & Ito's colour-blind-safe set (black left out: it hides the image), then Paul Tol's "muted" set.
OKABE_ITO = ["#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7"]
TOL_MUTED = ["#CC6677", "#332288", "#DDCC77", "#117733", "#88CCEE", "#882255", "#44AA99", "#999933", "#AA4499"]
MIN_FONT = 8


@dataclass(frozen=True)
class LabelBox:
    label: int                      # index into Segmentation.labels
    text: str                       # the label, shortened with "…" if it cannot fit the image
    anchor: tuple[int, int]         # (x, y): a pixel inside the label's region
    box: tuple[int, int, int, int]  # (left, top, right, bottom), inside the image, around the anchor
    font_size: int


@dataclass(frozen=True)
class LegendRow:
    name: str
    color: tuple[int, int, int] | None  # None: background, left untinted
    percent: float                      # one decimal; the rows sum to exactly 100.0


def palette(n: int) -> list[tuple[int, int, int]]:
    """n distinct colours: the 16 colour-blind-safe ones first, then evenly spread hues."""
    named = [tuple(int(c[i:i + 2], 16) for i in (1, 3, 5)) for c in OKABE_ITO + TOL_MUTED]
    spread = [tuple(round(255 * v) for v in colorsys.hsv_to_rgb(i * 0.618034 % 1, 0.65, 0.9))
              for i in range(max(n - len(named), 0))]
    return (named + spread)[:n]


def font_size(width: int, height: int) -> int:
    """Text height that scales with the image."""
    return max(10, min(40, round(min(width, height) / 25)))


def render(seg: Segmentation, opacity: float = 0.5, show_labels: bool = True, legend: bool = True,
           contours: bool = True, only: Iterable[str] | None = None) -> Image.Image:
    """The overlay image; with a legend it is taller than the input (the legend sits below it)."""
    if not 0.0 <= opacity <= 1.0:
        raise InputError(f"opacity must be between 0 and 1, not {opacity}.")
    shown = chosen_labels(seg.labels, only)
    mask = seg.mask.numpy()
    colors = np.array(seg.colors, dtype=np.float32).reshape(-1, 3)
    tinted = np.isin(mask, shown)[..., None]
    pixels = np.asarray(seg.image, dtype=np.float32)
    tint = np.append(colors, [[0, 0, 0]], axis=0)[mask]  # background (-1) takes the unused last row
    pixels = np.where(tinted, pixels * (1 - opacity) + tint * opacity, pixels)
    if contours:
        edge = boundary(mask, max(1, round(min(mask.shape) / 300)))[..., None] & tinted
        pixels = np.where(edge, tint, pixels)
    image = Image.fromarray(np.rint(pixels).astype(np.uint8))
    size = font_size(*image.size)
    if show_labels:
        draw = ImageDraw.Draw(image)
        for label in place_labels(seg, size, shown):
            draw_label(draw, label, seg.colors[label.label])
    if not legend:
        return image
    rows = legend_rows(seg)  # the labels in order, then the background: a label not drawn is not listed
    return with_legend(image, [row for i, row in enumerate(rows) if i >= len(seg.labels) or i in shown], size)


def chosen_labels(labels: tuple[str, ...], only: Iterable[str] | None) -> list[int]:
    """Indices of the labels named in `only` (all when None)."""
    if only is None:
        return list(range(len(labels)))
    only = [only] if isinstance(only, str) else list(only)
    unknown = [name for name in only if name not in labels]
    if unknown:
        raise InputError(f"Unknown label(s) {unknown}; the segmentation has {list(labels)}.")
    return [labels.index(name) for name in only]


def boundary(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels within `width - 1` of a pixel whose 4-neighbour has another value: a band of `width`
    pixels on both sides of every edge."""
    edge = np.zeros(mask.shape, dtype=bool)
    rows, cols = mask[1:] != mask[:-1], mask[:, 1:] != mask[:, :-1]
    edge[1:] |= rows
    edge[:-1] |= rows
    edge[:, 1:] |= cols
    edge[:, :-1] |= cols
    return _spread(_spread(edge, width - 1, 0), width - 1, 1)


def _spread(flags: np.ndarray, radius: int, axis: int) -> np.ndarray:
    """True where the 2 radius + 1 pixels around, along `axis`, hold a True (window sums of a cumsum)."""
    pad = [(radius + 1, radius) if a == axis else (0, 0) for a in range(flags.ndim)]
    sums = np.moveaxis(np.pad(flags, pad).cumsum(axis=axis, dtype=np.int32), axis, 0)
    return np.moveaxis(sums[2 * radius + 1:] - sums[:-2 * radius - 1] > 0, 0, axis)


# ---------------------------------------------------------------------------------------------- label names


def place_labels(seg: Segmentation, size: int | None = None, shown: list[int] | None = None) -> list[LabelBox]:
    """A name box for every shown label that has pixels: centred on a deep interior point of its region,
    the first such point whose box does not cover a box already placed (smaller regions choose first),
    and moved inside the image where it would cross an edge."""
    mask = seg.mask.numpy()
    height, width = mask.shape
    size = size or font_size(width, height)
    shown = range(len(seg.labels)) if shown is None else shown
    area = np.bincount(mask[mask >= 0], minlength=len(seg.labels))
    placed: list[LabelBox] = []
    for i in sorted((i for i in shown if area[i]), key=lambda i: area[i]):
        fitted = fit_text(seg.labels[i], size, width, height)
        if fitted is None:
            continue
        text, font_px, (box_w, box_h) = fitted
        candidates = [(point, clamp_box(point, box_w, box_h, width, height)) for point in interior_points(mask == i)]
        free = [c for c in candidates if not any(overlaps(c[1], other.box) for other in placed)]
        point, box = (free or candidates)[0]
        placed.append(LabelBox(i, text, point, box, font_px))
    return placed


def fit_text(text: str, size: int, width: int, height: int) -> tuple[str, int, tuple[int, int]] | None:
    """(text, font size, box size) of the largest rendering down to half `size` that fits the image,
    shortened with "…" at the smallest size if needed; None if nothing fits."""
    smallest = max(MIN_FONT, size // 2)
    for px in range(size, smallest - 1, -1):
        box = box_size(text, px)
        if box[0] <= width and box[1] <= height:
            return text, px, box
    for cut in range(len(text) - 1, -1, -1):
        short = text[:cut].rstrip() + "…"
        box = box_size(short, smallest)
        if box[0] <= width and box[1] <= height:
            return short, smallest, box
    return None


def box_size(text: str, px: int) -> tuple[int, int]:
    left, top, right, bottom = ImageFont.load_default(size=px).getbbox(text)
    pad = max(2, px // 4)
    return right - left + 2 * pad, bottom - top + 2 * pad


def interior_points(region: np.ndarray, grid: int = 256, keep: int = 400) -> list[tuple[int, int]]:
    """(x, y) pixels of `region`, deepest first: farthest from the region's edge (the image border counts
    as an edge), ties broken by closeness to the region's centre; sampled on a coarse grid."""
    height, width = region.shape
    step = -(-max(height, width) // grid)
    share = F.avg_pool2d(torch.from_numpy(region).float()[None, None], step, step, ceil_mode=True)[0, 0]
    cells = share > 0.5 if bool((share > 0.5).any()) else share > 0
    depth, layer = torch.zeros_like(share), cells.float()
    while bool(layer.any()):  # erode one cell per round
        depth += layer
        layer = -F.max_pool2d(-F.pad(layer, (1, 1, 1, 1))[None], 3, 1)[0]
    ys, xs = torch.nonzero(cells, as_tuple=True)
    centre = torch.stack([ys.float().mean(), xs.float().mean()])
    distance = torch.stack([ys.float(), xs.float()], 1).sub(centre).norm(dim=1)
    order = torch.argsort(depth[ys, xs] - distance / (distance.max() + 1), descending=True)[:keep]
    points = [(min(width - 1, int((xs[k] + 0.5) * step)), min(height - 1, int((ys[k] + 0.5) * step)))
              for k in order.tolist()]
    inside = [(x, y) for x, y in points if region[y, x]]
    if inside:
        return inside
    y, x = np.argwhere(region)[int(region.sum()) // 2]
    return [(int(x), int(y))]


def clamp_box(point: tuple[int, int], box_w: int, box_h: int, width: int, height: int) -> tuple[int, int, int, int]:
    """A box_w x box_h box centred on `point`, shifted inside the image."""
    left = min(max(point[0] - box_w // 2, 0), width - box_w)
    top = min(max(point[1] - box_h // 2, 0), height - box_h)
    return left, top, left + box_w, top + box_h


def overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def draw_label(draw: ImageDraw.ImageDraw, label: LabelBox, color: tuple[int, int, int]) -> None:
    """The name in black or white (whichever contrasts more) on a box of the label's colour."""
    ink = text_color(color)
    font = ImageFont.load_default(size=label.font_size)
    left, top, _, _ = font.getbbox(label.text)
    pad = max(2, label.font_size // 4)
    draw.rectangle([label.box[0], label.box[1], label.box[2] - 1, label.box[3] - 1], fill=color, outline=ink)
    draw.text((label.box[0] + pad - left, label.box[1] + pad - top), label.text, fill=ink, font=font)


def text_color(color: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever has the higher WCAG contrast ratio with `color`."""
    linear = [(c / 255) / 12.92 if c <= 10 else ((c / 255 + 0.055) / 1.055) ** 2.4 for c in color]
    luminance = 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]
    return (0, 0, 0) if (luminance + 0.05) / 0.05 >= 1.05 / (luminance + 0.05) else (255, 255, 255)


# ---------------------------------------------------------------------------------------------- legend


def legend_rows(seg: Segmentation) -> list[LegendRow]:
    """Every label with its share of the pixels, then the background if any, in percent to one decimal
    (largest-remainder rounding, so the rows add up to exactly 100.0)."""
    mask = seg.mask.numpy()
    counts = np.append(np.bincount(mask[mask >= 0], minlength=len(seg.labels)), (mask < 0).sum())  # background last
    exact = counts * 1000 / counts.sum()
    tenths = np.floor(exact).astype(int)
    tenths[np.argsort(tenths - exact, kind="stable")[: 1000 - tenths.sum()]] += 1
    rows = [LegendRow(label, color, tenths[i] / 10) for i, (label, color) in enumerate(zip(seg.labels, seg.colors))]
    if counts[-1]:
        name = "background" if "background" not in (label.lower() for label in seg.labels) else "(no label)"
        rows.append(LegendRow(name, None, tenths[-1] / 10))
    return rows


def with_legend(image: Image.Image, rows: list[LegendRow], size: int) -> Image.Image:
    """`image` above a white panel listing the rows (a colour swatch, the name, the share), wrapped."""
    font = ImageFont.load_default(size=size)
    pad = max(4, size // 2)
    entries = [(row, f"{row.name}  {row.percent:.1f}%") for row in rows]
    widths = [size + pad // 2 + round(font.getlength(text)) for _, text in entries]
    canvas_w = max(image.width, max(widths) + 2 * pad)
    positions, x, y = [], pad, pad
    for w in widths:
        if x > pad and x + w > canvas_w - pad:
            x, y = pad, y + size + pad
        positions.append((x, y))
        x += w + 2 * pad
    canvas = Image.new("RGB", (canvas_w, image.height + y + size + pad), "white")
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for (row, text), (x, y) in zip(entries, positions):
        top = image.height + y
        swatch = [x, top, x + size - 1, top + size - 1]
        draw.rectangle(swatch, fill=row.color or (255, 255, 255), outline=(60, 60, 60) if row.color is None else None)
        draw.text((x + size + pad // 2, top + size // 2), text, fill=(0, 0, 0), font=font, anchor="lm")
    return canvas

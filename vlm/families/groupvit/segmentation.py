"""The result of GroupViT segmentation: logits, a label map at the image's own size, scores and areas."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from .overlay import LegendRow, legend_rows, palette, render

BACKGROUND = -1  # mask value of pixels where no label is confident enough


@dataclass(frozen=True)
class Segmentation:
    image: Image.Image                # the input image (RGB, own size H x W)
    labels: tuple[str, ...]           # label i <-> logits[i] <-> mask value i
    logits: torch.Tensor              # (L, h, w) segmentation logits on the resized, uncropped image
    confidence: torch.Tensor          # (h, w) probability of the label of each pixel's main group
    mask: torch.Tensor                # (H, W) int64: label index, or BACKGROUND
    logits_per_image: torch.Tensor    # (L,) image-text logits of the centre crop (CLIP's input)
    threshold: float

    @property
    def scores(self) -> torch.Tensor:
        """(L,) probability of each label for the image (zero-shot classification of the centre crop)."""
        return self.logits_per_image.softmax(-1)

    @property
    def areas(self) -> torch.Tensor:
        """(L,) share of the image's pixels given to each label."""
        return torch.bincount(self.mask[self.mask >= 0], minlength=len(self.labels)).double() / self.mask.numel()

    @property
    def background_area(self) -> float:
        """Share of the pixels left as background."""
        return float((self.mask == BACKGROUND).double().mean())

    @property
    def colors(self) -> list[tuple[int, int, int]]:
        """The overlay's colour of each label."""
        return palette(len(self.labels))

    def legend(self) -> list[LegendRow]:
        """(name, colour, percent of the pixels) of every label, then of the background if any."""
        return legend_rows(self)

    def label_masks(self) -> dict[str, np.ndarray]:
        """One boolean (H, W) mask per label."""
        mask = self.mask.numpy()
        return {label: mask == i for i, label in enumerate(self.labels)}

    def overlay(self, opacity: float = 0.5, show_labels: bool = True, legend: bool = True, contours: bool = True,
                only: Iterable[str] | None = None) -> Image.Image:
        """The image with each label's pixels tinted, outlined and named, and a legend of area shares
        below it; `only` restricts the tint, outlines and names to some labels."""
        return render(self, opacity=opacity, show_labels=show_labels, legend=legend, contours=contours, only=only)


def label_map(logits: torch.Tensor, confidence: torch.Tensor, threshold: float, size: tuple[int, int]) -> torch.Tensor:
    """(H, W) label index of the logits resized (bilinear, as F.interpolate) to `size`; BACKGROUND where
    the resized confidence is below `threshold`, capped at the image's highest confidence so the most
    confident region always keeps its label (as NVlabs' evaluation). In bands of rows, to bound memory."""
    height, width = size
    rows = resize_index(logits.shape[1], height)
    confidence = bilinear(confidence[None], rows, width)[0]
    mask = torch.empty(size, dtype=torch.long)
    step = max(1, 2 ** 24 // (len(logits) * width))
    for top in range(0, height, step):
        band = tuple(t[top:top + step] for t in rows)
        mask[top:top + step] = bilinear(logits, band, width).max(0).indices
    mask[confidence < min(threshold, float(confidence.max()))] = BACKGROUND
    return mask


def resize_index(src: int, dst: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """1-D bilinear resampling (align_corners=False): for each of `dst` positions the two source positions
    and the weight of the second, computed in float32 as F.interpolate computes them."""
    # The ratio in float32; the position rounded once, as the fused multiply-add of the CPU kernel.
    scale = (torch.tensor(float(src)) / dst).double()
    pos = (scale * (torch.arange(dst, dtype=torch.float64) + 0.5) - 0.5).float().clamp(min=0)
    low = pos.long().clamp(max=src - 1)
    return low, (low + 1).clamp(max=src - 1), (pos - low).clamp(0, 1)


def bilinear(x: torch.Tensor, rows: tuple[torch.Tensor, ...], width: int) -> torch.Tensor:
    """(C, h, w) -> (C, len(rows[0]), width): the rows picked by a resize_index, then the columns resized;
    a band of rows of F.interpolate's result without computing the others."""
    low, high, frac = rows
    x = x[:, low] * (1 - frac)[:, None] + x[:, high] * frac[:, None]
    return F.interpolate(x[None], size=(len(low), width), mode="bilinear", align_corners=False)[0]

"""IDEFICS image preprocessing, as transformers' ``IdeficsImageProcessorPil``: alpha over white, a square
resize to the tower's size (the aspect ratio is not kept), bicubic, then rescale and normalise."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ...checkpoint import read_processor_configs
from ...layers.patches import normalize_pixels
from ...media import to_rgb

IDEFICS_STANDARD_MEAN = (0.48145466, 0.4578275, 0.40821073)
IDEFICS_STANDARD_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImageSettings:
    """The image processor's settings (defaults are the reference's)."""

    image_size: int = 224
    image_mean: tuple[float, ...] = IDEFICS_STANDARD_MEAN
    image_std: tuple[float, ...] = IDEFICS_STANDARD_STD
    rescale_factor: float = 1 / 255
    resample: int = 3  # PIL.Image.Resampling.BICUBIC

    @classmethod
    def from_dir(cls, directory: str | os.PathLike) -> "ImageSettings":
        """processor_config.json["image_processor"] (transformers 5), else preprocessor_config.json (hub),
        where the size is `size: {height, width}` or the older `image_size`."""
        d, _, _ = read_processor_configs(Path(directory))
        size = d.get("size") or {}
        kw: dict[str, Any] = {}
        side = d.get("image_size") or size.get("height") or size.get("shortest_edge")
        if side:
            kw["image_size"] = int(side)
        for key in ("rescale_factor", "resample"):
            if d.get(key) is not None:
                kw[key] = d[key]
        for key in ("image_mean", "image_std"):
            if d.get(key) is not None:
                kw[key] = tuple(float(x) for x in d[key])
        return cls(**kw)


def preprocess_image(image: Image.Image, s: ImageSettings) -> torch.Tensor:
    """An image -> (3, S, S) float32."""
    square = to_rgb(image).resize((s.image_size, s.image_size), resample=s.resample)
    return normalize_pixels(np.asarray(square), s.image_mean, s.image_std, s.rescale_factor)

"""Resizing images and video frames to whole merged patches, and flattening them into patch rows.

The size rule is transformers' ``smart_resize``: sides become multiples of `factor` (one merged token is
factor x factor pixels) with the pixel count kept within [min_pixels, max_pixels] and the aspect ratio
kept. Qwen2-VL / Qwen2.5-VL bound one frame; GLM-4.1V bounds all frames together and first scales up
images smaller than one merged token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import InputError
from ..layers.patches import image_patches, video_patches
from ..media import resample_mode, to_rgb

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

SizeRule = Callable[[int, int], tuple[int, int]]  # (height, width) -> resized (height, width)


@dataclass(frozen=True)
class PatchSettings:
    """What every Qwen-style image or video processor has (defaults: ``Qwen2VLImageProcessorPil``'s)."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = 3  # PIL.Image.Resampling.BICUBIC

    @property
    def factor(self) -> int:
        """Sides are resized to multiples of this (one merged token = factor x factor pixels)."""
        return self.patch_size * self.merge_size

    @classmethod
    def known_fields(cls, d: dict[str, Any], skip: tuple[str, ...] = ()) -> dict[str, Any]:
        """The fields of a transformers processor dict this class has (mean/std as tuples)."""
        names = {f.name for f in fields(cls)} - set(skip)
        kw = {k: v for k, v in d.items() if k in names and v is not None}
        for key in ("image_mean", "image_std"):
            if key in kw:
                kw[key] = tuple(float(x) for x in kw[key])
        return kw


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int, frames: int = 1,
                 temporal_factor: int = 1, upscale_small: bool = False) -> tuple[int, int]:
    """(h, w), multiples of `factor`, with frames x h x w within [min_pixels, max_pixels], aspect kept.

    `frames` frames are bounded together (rounded to `temporal_factor` for the upper check), and with
    `upscale_small` a side smaller than `factor` is first scaled up to it (GLM-4.1V). Identical to
    transformers' ``smart_resize`` of each family; raises InputError where it raises ValueError.
    """
    if min(height, width) < 1:
        raise InputError(f"An image or video frame is empty ({width}x{height} pixels).")
    if upscale_small and (height < factor or width < factor):
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise InputError(f"The image is too elongated ({width}x{height}); the aspect ratio must be at most 200:1.")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def image_rows(images: Sequence[Image.Image], s: PatchSettings, size: SizeRule) -> tuple[torch.Tensor, torch.Tensor]:
    """Images resized by `size` with Pillow -> (pixel_values float32 [sum(t*h*w), C*tp*p*p], grid_thw [n, 3]).

    The float steps are the Pillow image processors' (rescale in float64, then normalise in float32).
    """
    rows, grids = [], []
    for image in images:
        image = to_rgb(image)
        h, w = size(image.height, image.width)
        pixels = np.asarray(image.resize((w, h), resample=s.resample))  # (H, W, 3) uint8
        patches, grid = image_patches(pixels, s.image_mean, s.image_std, s.rescale_factor, s.temporal_patch_size,
                                      s.patch_size, s.merge_size)
        rows.append(patches)
        grids.append(grid)
    if not rows:
        raise InputError("preprocess_images needs at least one image.")
    return torch.cat(rows), torch.tensor(grids, dtype=torch.long)


def frame_rows(frames: np.ndarray, s: PatchSettings, size: SizeRule) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded frames (T, H, W, 3) uint8, all resized by `size` -> (pixel_values_videos, video_grid_thw [1, 3]).

    The resize is torchvision's on CPU (uint8, antialiased), then a fused rescale + normalise, as the
    reference video processors do.
    """
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or not len(frames):
        raise InputError(f"Video frames must be a (T, H, W, 3) uint8 array, got {frames.dtype} {frames.shape}.")
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()  # (T, 3, H, W) uint8
    h, w = size(x.shape[2], x.shape[3])
    patches, grid = video_patches(x, (h, w), resample_mode(s.resample), s.image_mean, s.image_std, s.rescale_factor,
                                  s.temporal_patch_size, s.patch_size, s.merge_size)
    return patches, torch.tensor([grid], dtype=torch.long)

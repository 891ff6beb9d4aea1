"""LLaVA-OneVision image and video preprocessing (pixels only) and the placeholder counts they imply.

Images follow transformers' ``LlavaOnevisionImageProcessorPil`` exactly: a conversation's only image is
resized (Pillow, aspect kept) into its best pinpoint, zero-padded, cut into tiles and preceded by the whole
image resized to one tile; with several images each is padded to a square in the mean colour and resized to
one tile. Videos follow ``LlavaOnevisionVideoProcessor``: uint8 bicubic antialiased resize with
``torch.nn.functional.interpolate`` (the kernel torchvision runs on CPU), fused rescale + normalise.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from ...checkpoint import read_processor_configs
from ...errors import InputError
from ...media import resample_mode, to_rgb
from .anyres import Size, anyres_shape, best_resolution, max_tiles

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_PINPOINTS = [(384 * a, 384 * b) for a in range(1, 7) for b in range(1, 7)]


@dataclass(frozen=True)
class PixelSettings:
    """One processor's resize/normalise settings (defaults are the reference's)."""

    size: Size = (384, 384)
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = 3  # PIL.Image.Resampling.BICUBIC
    pinpoints: tuple[Size, ...] = tuple(DEFAULT_PINPOINTS)
    do_sample_frames: bool = False  # video: the reference keeps every frame unless asked to sample
    num_frames: int | None = None
    fps: float | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PixelSettings":
        size = d.get("size") or {}
        side = size.get("shortest_edge")
        kw: dict[str, Any] = {"size": (size.get("height", side or 384), size.get("width", side or 384))}
        for key in ("rescale_factor", "resample", "do_sample_frames", "num_frames", "fps"):
            if d.get(key) is not None:
                kw[key] = d[key]
        for key in ("image_mean", "image_std"):
            if d.get(key) is not None:
                kw[key] = tuple(float(x) for x in d[key])
        if d.get("image_grid_pinpoints"):
            kw["pinpoints"] = tuple(tuple(p) for p in d["image_grid_pinpoints"])
        return cls(**kw)


@dataclass(frozen=True)
class ProcessorSettings:
    image: PixelSettings = field(default_factory=PixelSettings)
    video: PixelSettings = field(default_factory=PixelSettings)
    num_image_tokens: int | None = None  # patches per tile; None: from the model config
    select_strategy: str | None = None
    vision_aspect_ratio: str = "anyres_max_9"

    @classmethod
    def from_dir(cls, directory: str | os.PathLike) -> "ProcessorSettings":
        """Read the processor files the way transformers does.

        Images: ``processor_config.json["image_processor"]``, else ``preprocessor_config.json``. Videos:
        ``processor_config.json["video_processor"]``, else ``video_preprocessor_config.json``, else
        ``preprocessor_config.json``. Placeholder settings: the top level of ``processor_config.json``.
        """
        image, video, top = read_processor_configs(Path(directory))
        return cls(PixelSettings.from_dict(image), PixelSettings.from_dict(video), top.get("num_image_tokens"),
                   top.get("vision_feature_select_strategy"), top.get("vision_aspect_ratio") or "anyres_max_9")

    # --------------------------------------------------------------------------- placeholder counts

    def image_tokens(self, size: Size, anyres: bool, grid: int) -> int:
        """Placeholders for one image of (H, W) `size` (the reference processor's count)."""
        base = self.num_image_tokens or grid * grid
        side = math.isqrt(base)
        if anyres:
            h, w = anyres_shape(size, list(self.image.pinpoints), self.image.size[0], side,
                                max_tiles(self.vision_aspect_ratio))
            count = base + h * (w + 1)
        else:
            count = base + 1
        return count - 1 if self.select_strategy == "default" else count

    def video_tokens(self, frames: int, grid: int) -> int:
        """Placeholders for a video of `frames` frames: 2x2-pooled patches per frame, then one newline."""
        pooled = math.ceil(math.isqrt(self.num_image_tokens or grid * grid) / 2)
        return frames * pooled * pooled + 1


# ------------------------------------------------------------------------------------------- images


def image_tiles(image: Image.Image, s: PixelSettings, anyres: bool) -> list[Image.Image]:
    """An image -> its tiles as Pillow images: [whole image, row-major tiles] (AnyRes) or [padded square]."""
    image = to_rgb(image)
    tile_h, tile_w = s.size
    if not anyres:
        side = max(image.size)
        square = Image.new("RGB", (side, side), tuple(int(m * 255) for m in s.image_mean))
        square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        return [square.resize((tile_w, tile_h), resample=s.resample)]
    best_h, best_w = best_resolution((image.height, image.width), list(s.pinpoints))
    new_h, new_w = _fit(image.height, image.width, best_h, best_w)
    canvas = Image.new("RGB", (best_w, best_h))
    canvas.paste(image.resize((new_w, new_h), resample=s.resample), ((best_w - new_w) // 2, (best_h - new_h) // 2))
    side = tile_h  # tiles are square, of the processor's height
    tiles = [canvas.crop((x, y, x + side, y + side)) for y in range(0, best_h, side) for x in range(0, best_w, side)]
    return [image.resize((tile_w, tile_h), resample=s.resample)] + tiles


def _fit(height: int, width: int, target_h: int, target_w: int) -> Size:
    """Largest size of the same aspect inside the target (transformers' get_patch_output_size)."""
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def preprocess_image(image: Image.Image, s: PixelSettings, anyres: bool) -> torch.Tensor:
    """An image -> (tiles, C, H, W) float32, normalised as the reference's NumPy path does."""
    mean, std = np.array(s.image_mean, dtype=np.float32), np.array(s.image_std, dtype=np.float32)
    out = []
    for tile in image_tiles(image, s, anyres):
        if tile.size != (s.size[1], s.size[0]):
            tile = tile.resize((s.size[1], s.size[0]), resample=s.resample)
        x = ((np.asarray(tile).astype(np.float64) * s.rescale_factor).astype(np.float32) - mean) / std
        out.append(torch.from_numpy(x).permute(2, 0, 1))
    return torch.stack(out)


def largest_image(s: PixelSettings) -> int:
    """The most pixels an image is resized to (its largest pinpoint, what load_image may shrink it to)."""
    return max(h * w for h, w in s.pinpoints)


def pad_stack(items: list[torch.Tensor]) -> torch.Tensor:
    """Stack (n_i, ...) tensors into (len, max n_i, ...), zero-padding the first axis."""
    out = items[0].new_zeros((len(items), max(len(x) for x in items), *items[0].shape[1:]))
    for i, x in enumerate(items):
        out[i, :len(x)] = x
    return out


# ------------------------------------------------------------------------------------------- video


def preprocess_frames(frames: np.ndarray, s: PixelSettings) -> torch.Tensor:
    """Decoded frames (T, H, W, 3) uint8 -> (T, 3, H', W') float32 at the processor's size."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or not len(frames):
        raise InputError(f"Video frames must be a (T, H, W, 3) uint8 array, got {frames.dtype} {frames.shape}.")
    mode = resample_mode(s.resample)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()
    if tuple(x.shape[2:]) != s.size:
        x = F.interpolate(x, size=s.size, mode=mode, align_corners=False, antialias=True)
    mean = torch.tensor(s.image_mean) * (1.0 / s.rescale_factor)  # fused rescale + normalise
    std = torch.tensor(s.image_std) * (1.0 / s.rescale_factor)
    return (x.to(torch.float32) - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)

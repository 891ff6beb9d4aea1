"""Qwen2-VL image and video preprocessing (pixels only; tokenisation lives elsewhere).

Images follow transformers' ``Qwen2VLImageProcessorPil`` exactly (Pillow resize, numpy rescale and
normalise); videos follow ``Qwen2VLVideoProcessor`` (uint8 bicubic antialiased resize with
``torch.nn.functional.interpolate``, the kernel torchvision calls on CPU; fused rescale+normalise).
Both produce the same flat patch layout: one row per patch, ordered (t, h-block, w-block, h-in-block,
w-in-block) with the 2x2 (merge_size^2) patches of one merged token adjacent; each row is
(C, temporal_patch_size, patch_size, patch_size) flattened.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from ...checkpoint import read_processor_configs
from ...errors import InputError
from ...layers.patches import image_patches, video_patches
from ...media import VideoSample, probe_video, read_frames, resample_mode, sample_frames_bounded, to_rgb

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class _PatchSettings:
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
        """Side lengths are resized to multiples of this (one merged token = factor x factor pixels)."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_dict(cls, d: dict[str, Any], **extra: Any):
        """Build from a transformers processor dict (``size`` and/or ``min_pixels``/``max_pixels``)."""
        names = {f.name for f in fields(cls)} - {"min_pixels", "max_pixels", "video"}
        kw: dict[str, Any] = {k: v for k, v in d.items() if k in names and v is not None}
        for key in ("image_mean", "image_std"):
            if key in kw:
                kw[key] = tuple(float(x) for x in kw[key])
        size = d.get("size") or {}
        defaults = {f.name: f.default for f in fields(cls)}
        min_px = d.get("min_pixels") or size.get("shortest_edge") or size.get("min_pixels")
        max_px = d.get("max_pixels") or size.get("longest_edge") or size.get("max_pixels")
        kw["min_pixels"] = int(min_px or defaults["min_pixels"])
        kw["max_pixels"] = int(max_px or defaults["max_pixels"])
        return cls(**kw, **extra)


@dataclass(frozen=True)
class VideoSettings(_PatchSettings):
    """Video processor settings; defaults are ``Qwen2VLVideoProcessor``'s."""

    min_pixels: int = 128 * 28 * 28
    max_pixels: int = 28 * 28 * 768
    fps: float | None = None           # frames per second to sample (None: see preprocess_video)
    num_frames: int | None = None
    min_frames: int = 4
    max_frames: int = 768
    do_sample_frames: bool = False     # reference default: keep every frame unless fps/num_frames given
    cap_pixels_per_frame: bool = False
    max_video_tokens: int = 128000


@dataclass(frozen=True)
class VisionSettings(_PatchSettings):
    """Image processor settings (defaults are ``Qwen2VLImageProcessorPil``'s) plus the video ones."""

    video: VideoSettings = field(default_factory=VideoSettings)

    @classmethod
    def from_dir(cls, directory: str | os.PathLike) -> "VisionSettings":
        """Read a checkpoint directory the way transformers does.

        Images: ``processor_config.json["image_processor"]``, else ``preprocessor_config.json``.
        Videos: ``processor_config.json["video_processor"]``, else ``video_preprocessor_config.json``,
        else ``preprocessor_config.json``. Missing files give the reference defaults.
        """
        image, video, _ = read_processor_configs(Path(directory))
        return cls.from_dict(image, video=VideoSettings.from_dict(video))


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 14 * 14 * 4 * 1280
) -> tuple[int, int]:
    """Size (h, w), both multiples of ``factor``, with h*w in [min_pixels, max_pixels], aspect kept.

    Identical to transformers' ``smart_resize``; raises InputError where it raises ValueError.
    """
    if min(height, width) < 1:
        raise InputError(f"An image or video frame is empty ({width}x{height} pixels).")
    if max(height, width) / min(height, width) > 200:
        raise InputError(
            f"The image is too elongated ({width}x{height}); the aspect ratio must be at most 200:1."
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def preprocess_images(
    images: Sequence[Image.Image],
    settings: VisionSettings,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images -> (pixel_values float32 [sum(t*h*w), C*tp*p*p], image_grid_thw int64 [n, 3])."""
    s = settings
    lo = s.min_pixels if min_pixels is None else min_pixels
    hi = s.max_pixels if max_pixels is None else max_pixels
    rows, grids = [], []
    for image in images:
        image = to_rgb(image)
        h, w = smart_resize(image.height, image.width, s.factor, lo, hi)
        pixels = np.asarray(image.resize((w, h), resample=s.resample))  # (H, W, 3) uint8
        patches, grid = image_patches(pixels, s.image_mean, s.image_std, s.rescale_factor, s.temporal_patch_size,
                                      s.patch_size, s.merge_size)
        rows.append(patches)
        grids.append(grid)
    if not rows:
        raise InputError("preprocess_images needs at least one image.")
    return torch.cat(rows), torch.tensor(grids, dtype=torch.long)


def preprocess_frames(
    frames: np.ndarray,
    settings: VisionSettings,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded frames (T, H, W, 3) uint8 -> (pixel_values_videos, video_grid_thw [1, 3])."""
    s = settings.video
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or not len(frames):
        raise InputError(f"Video frames must be a (T, H, W, 3) uint8 array, got {frames.dtype} {frames.shape}.")
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()  # (T, 3, H, W) uint8
    h, w = frame_size(settings, len(frames), x.shape[2], x.shape[3], min_pixels, max_pixels)
    patches, grid = video_patches(x, (h, w), resample_mode(s.resample), s.image_mean, s.image_std, s.rescale_factor,
                                  s.temporal_patch_size, s.patch_size, s.merge_size)
    return patches, torch.tensor([grid], dtype=torch.long)


def frame_size(settings: VisionSettings, count: int, height: int, width: int, min_pixels: int | None = None,
               max_pixels: int | None = None) -> tuple[int, int]:
    """The (height, width) each of a clip's `count` frames of `height` x `width` is resized to."""
    s = settings.video
    lo = s.min_pixels if min_pixels is None else min_pixels
    hi = s.max_pixels if max_pixels is None else max_pixels
    if s.cap_pixels_per_frame:  # the reference's bound on a whole video's pixels
        budget = int(s.max_video_tokens * s.factor * s.factor * 0.9)
        hi = max(min(hi, budget * s.temporal_patch_size // count), int(lo * 1.05))
    return smart_resize(height, width, s.factor, lo, hi)


def preprocess_video(
    path: str | os.PathLike,
    settings: VisionSettings,
    fps: float | None = None,
    num_frames: int | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, VideoSample]:
    """Probe, sample, decode (only the sampled frames) and preprocess a video file.

    Sampling: the call's ``fps`` or ``num_frames`` if given; else the settings' fps/num_frames when
    ``do_sample_frames`` is set; else every frame (the reference's default), refused with InputError
    when that is more than ``max_frames`` frames. Returns (pixel_values_videos, video_grid_thw [1, 3],
    VideoSample with the probe result and the sampled indices).
    """
    s = settings.video
    info = probe_video(path)
    if fps is None and num_frames is None and s.do_sample_frames:
        fps, num_frames = (None, s.num_frames) if s.num_frames is not None else (s.fps, None)
    if fps is None and num_frames is None and info.num_frames > s.max_frames:
        raise InputError(
            f"{info.path} has {info.num_frames} frames, more than max_frames={s.max_frames}; "
            "pass fps (e.g. 2) or num_frames to sample it."
        )
    indices = sample_frames_bounded(
        info.num_frames, info.fps, num_frames=num_frames, fps=fps,
        min_frames=s.min_frames, max_frames=s.max_frames, multiple=s.temporal_patch_size,
    )
    frames = read_frames(path, indices, resize=lambda h, w: frame_size(settings, len(indices), h, w, min_pixels,
                                                                          max_pixels), mode=resample_mode(s.resample))
    pixel_values, grid = preprocess_frames(frames, settings, min_pixels, max_pixels)
    return pixel_values, grid, VideoSample(info, tuple(indices))

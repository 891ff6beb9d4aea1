"""GLM-4.1V image and video preprocessing (pixels and frame choice; tokens live in inputs.py).

Images follow transformers' ``Glm4vImageProcessorPil`` (Pillow resize, numpy rescale and normalise);
videos follow ``Glm4vVideoProcessor``: frames sampled by time (`fps` per second up to `max_duration`
seconds, then evenly), an even frame count, one size for the whole clip from a pixel budget that
counts every frame, uint8 bicubic antialiased resize (the kernel torchvision runs on CPU), fused
rescale + normalise. Both produce one row per patch, ordered (t, h-block, w-block, h-in-block,
w-in-block), each row (C, temporal_patch_size, patch_size, patch_size) flattened.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from ...checkpoint import read_processor_configs
from ...errors import InputError
from ...layers.patches import image_patches, video_patches
from ...media import VideoInfo, VideoSample, probe_video, read_frames, resample_mode, to_rgb

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class PatchSettings:
    """One processor's settings; defaults are ``Glm4vImageProcessorPil``'s."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 112 * 112  # size["shortest_edge"]: a pixel count, temporal patch included
    max_pixels: int = 28 * 28 * 15000  # size["longest_edge"]
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = 3  # PIL.Image.Resampling.BICUBIC
    fps: float = 2.0  # videos: frames sampled per second
    max_duration: float = 300.0  # videos: longer clips get int(max_duration * fps) evenly spread frames

    @property
    def factor(self) -> int:
        """Sides are resized to multiples of this (one merged token = factor x factor pixels)."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_dict(cls, d: dict[str, Any], **defaults: Any) -> "PatchSettings":
        """From a transformers processor dict (``size`` with shortest/longest edge in pixels)."""
        names = {f.name for f in fields(cls)}
        kw: dict[str, Any] = {**defaults, **{k: v for k, v in d.items() if k in names and v is not None}}
        for key in ("image_mean", "image_std"):
            if key in kw:
                kw[key] = tuple(float(x) for x in kw[key])
        size = d.get("size") or {}
        if size.get("shortest_edge"):
            kw["min_pixels"] = int(size["shortest_edge"])
        if size.get("longest_edge"):
            kw["max_pixels"] = int(size["longest_edge"])
        return cls(**kw)


# Glm4vVideoProcessor's class defaults where they differ from the image processor's.
VIDEO_DEFAULTS = dict(max_pixels=28 * 28 * 2 * 30000)


@dataclass(frozen=True)
class VisionSettings:
    image: PatchSettings
    video: PatchSettings

    @classmethod
    def from_dir(cls, directory: str | os.PathLike) -> "VisionSettings":
        """Read a checkpoint the way transformers does: ``processor_config.json`` (nested, as
        save_pretrained writes it), else ``preprocessor_config.json`` and ``video_preprocessor_config.json``."""
        image, video, _ = read_processor_configs(Path(directory))
        return cls(PatchSettings.from_dict(image), PatchSettings.from_dict(video, **VIDEO_DEFAULTS))


def smart_resize(num_frames: int, height: int, width: int, temporal_factor: int = 2, factor: int = 28,
                 min_pixels: int = 112 * 112, max_pixels: int = 14 * 14 * 2 * 2 * 2 * 6144) -> tuple[int, int]:
    """GLM-4.1V's size rule: sides are multiples of `factor`, frames * h * w kept within [min, max] pixels.

    Identical to transformers' ``glm4v`` ``smart_resize``; raises InputError where it raises ValueError.
    """
    if min(height, width) < 1:
        raise InputError(f"An image or video frame is empty ({width}x{height} pixels).")
    if height < factor or width < factor:  # tiny images are scaled up first
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise InputError(f"The image is too elongated ({width}x{height}); the aspect ratio must be at most 200:1.")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def preprocess_images(images: Sequence[Image.Image], s: PatchSettings, min_pixels: int | None = None,
                      max_pixels: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images -> (pixel_values float32 [sum(h*w), C*tp*p*p], image_grid_thw int64 [n, 3]).

    `min_pixels`/`max_pixels` override the settings' bounds with bounds per image (the settings'
    count the temporal patch: an image is two identical frames).
    """
    lo = s.min_pixels if min_pixels is None else min_pixels * s.temporal_patch_size
    hi = s.max_pixels if max_pixels is None else max_pixels * s.temporal_patch_size
    rows, grids = [], []
    for image in images:
        image = to_rgb(image)
        h, w = smart_resize(s.temporal_patch_size, image.height, image.width, s.temporal_patch_size, s.factor, lo, hi)
        pixels = np.asarray(image.resize((w, h), resample=s.resample))  # (H, W, 3) uint8
        patches, grid = image_patches(pixels, s.image_mean, s.image_std, s.rescale_factor, s.temporal_patch_size,
                                      s.patch_size, s.merge_size)
        rows.append(patches)
        grids.append(grid)
    if not rows:
        raise InputError("preprocess_images needs at least one image.")
    return torch.cat(rows), torch.tensor(grids, dtype=torch.long)


def sample_frame_indices(info: VideoInfo, s: PatchSettings, fps: float | None = None) -> list[int]:
    """Frames to keep, as ``Glm4vVideoProcessor.sample_frames``: one every 1/fps seconds (at most
    int(max_duration * fps) spread over longer clips), without repeats, then an even count."""
    if not info.fps:
        raise InputError(f"{info.path} has no frame rate; GLM-4.1V samples frames by time and needs it.")
    requested = s.fps if fps is None else fps
    if requested <= 0:
        raise InputError(f"fps must be positive, not {requested}")
    last = info.num_frames - 1
    duration = info.duration or round(last / info.fps) + 1
    if duration <= s.max_duration:
        count = max(int(math.floor(duration * requested)), 1)
        indices = [min(last, int(math.ceil(i * info.fps / requested))) for i in range(count)]
    else:
        count = int(s.max_duration * requested)
        if count >= info.num_frames:
            indices = list(range(info.num_frames))
        else:
            indices = [min(last, int(math.ceil(t * info.fps))) for t in np.linspace(0, duration, count, endpoint=True)]
    unique = list(dict.fromkeys(indices))
    if len(unique) % 2:
        unique.append(unique[-1])
    return unique


def preprocess_frames(frames: np.ndarray, s: PatchSettings, min_pixels: int | None = None,
                      max_pixels: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded frames (T, H, W, 3) uint8 -> (pixel_values_videos, video_grid_thw [1, 3]).

    The settings' pixel bounds count every frame; `min_pixels`/`max_pixels` override them per frame.
    """
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or not len(frames):
        raise InputError(f"Video frames must be a (T, H, W, 3) uint8 array, got {frames.dtype} {frames.shape}.")
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()  # (T, 3, H, W) uint8
    h, w = frame_size(s, len(frames), x.shape[2], x.shape[3], min_pixels, max_pixels)
    patches, grid = video_patches(x, (h, w), resample_mode(s.resample), s.image_mean, s.image_std, s.rescale_factor,
                                  s.temporal_patch_size, s.patch_size, s.merge_size)
    return patches, torch.tensor([grid], dtype=torch.long)


def frame_size(s: PatchSettings, count: int, height: int, width: int, min_pixels: int | None = None,
               max_pixels: int | None = None) -> tuple[int, int]:
    """The (height, width) each of a clip's `count` frames of `height` x `width` is resized to."""
    lo = s.min_pixels if min_pixels is None else min_pixels * count
    hi = s.max_pixels if max_pixels is None else max_pixels * count
    return smart_resize(count, height, width, s.temporal_patch_size, s.factor, lo, hi)


def preprocess_video(path: str | os.PathLike, s: PatchSettings, fps: float | None = None,
                     num_frames: int | None = None, min_pixels: int | None = None,
                     max_pixels: int | None = None) -> tuple[torch.Tensor, torch.Tensor, VideoSample]:
    """Probe, sample, decode (only the sampled frames) and preprocess a video file.

    `num_frames` instead of `fps` takes that many evenly spaced frames (rounded up to even).
    Returns (pixel_values_videos, video_grid_thw [1, 3], the VideoSample with the frame indices).
    """
    info = probe_video(path)
    if num_frames is not None:
        if fps is not None:
            raise InputError("Give either num_frames or fps for video sampling, not both.")
        if not 1 <= num_frames <= info.num_frames:
            raise InputError(f"num_frames must be between 1 and the video's {info.num_frames} frames.")
        indices = np.linspace(0, info.num_frames - 1, num_frames).round().astype(int).tolist()
        indices += indices[-1:] * (len(indices) % 2)
    else:
        indices = sample_frame_indices(info, s, fps)
    frames = read_frames(path, indices, resize=lambda h, w: frame_size(s, len(indices), h, w, min_pixels, max_pixels),
                         mode=resample_mode(s.resample))
    pixel_values, grid = preprocess_frames(frames, s, min_pixels, max_pixels)
    return pixel_values, grid, VideoSample(info, tuple(indices))

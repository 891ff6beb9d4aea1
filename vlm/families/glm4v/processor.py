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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from ...checkpoint import read_processor_configs
from ...errors import InputError
from ...media import VideoInfo, VideoSample, probe_video, read_frames, resample_mode
from ...processing.images import PatchSettings as _PatchSettings
from ...processing.images import SizeRule, frame_rows, image_rows, smart_resize


@dataclass(frozen=True)
class PatchSettings(_PatchSettings):
    """One processor's settings; defaults are ``Glm4vImageProcessorPil``'s."""

    min_pixels: int = 112 * 112  # size["shortest_edge"]: a pixel count, temporal patch included
    max_pixels: int = 28 * 28 * 15000  # size["longest_edge"]
    fps: float = 2.0  # videos: frames sampled per second
    max_duration: float = 300.0  # videos: longer clips get int(max_duration * fps) evenly spread frames

    @classmethod
    def from_dict(cls, d: dict[str, Any], **defaults: Any) -> "PatchSettings":
        """From a transformers processor dict (``size`` with shortest/longest edge in pixels)."""
        kw: dict[str, Any] = {**defaults, **cls.known_fields(d)}
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


def glm_size(frames: int, s: PatchSettings, min_pixels: int, max_pixels: int):
    """GLM-4.1V's size rule for `frames` frames bounded together, as its ``smart_resize``: small images are
    first scaled up to one merged token."""
    return lambda h, w: smart_resize(h, w, s.factor, min_pixels, max_pixels, frames, s.temporal_patch_size,
                                     upscale_small=True)


def preprocess_images(images: Sequence[Image.Image], s: PatchSettings, min_pixels: int | None = None,
                      max_pixels: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images -> (pixel_values float32 [sum(h*w), C*tp*p*p], image_grid_thw int64 [n, 3]).

    `min_pixels`/`max_pixels` override the settings' bounds with bounds per image (the settings'
    count the temporal patch: an image is two identical frames).
    """
    lo = s.min_pixels if min_pixels is None else min_pixels * s.temporal_patch_size
    hi = s.max_pixels if max_pixels is None else max_pixels * s.temporal_patch_size
    return image_rows(images, s, glm_size(s.temporal_patch_size, s, lo, hi))


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
    """Decoded frames (T, H, W, 3) uint8 -> (pixel_values_videos, video_grid_thw [1, 3]) (sizes: `frame_size`)."""
    return frame_rows(frames, s, frame_size(s, len(frames), min_pixels, max_pixels))


def frame_size(s: PatchSettings, count: int, min_pixels: int | None = None, max_pixels: int | None = None) -> SizeRule:
    """The size rule of a clip's `count` frames: the settings' pixel bounds count every frame,
    `min_pixels`/`max_pixels` bound each frame."""
    lo = s.min_pixels if min_pixels is None else min_pixels * count
    hi = s.max_pixels if max_pixels is None else max_pixels * count
    return glm_size(count, s, lo, hi)


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
    size = frame_size(s, len(indices), min_pixels, max_pixels)  # each frame is resized as it arrives
    pixel_values, grid = frame_rows(read_frames(path, indices, resize=size, mode=resample_mode(s.resample)), s, size)
    return pixel_values, grid, VideoSample(info, tuple(indices))

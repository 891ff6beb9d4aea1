"""The processor of Qwen2-VL and Qwen2.5-VL (both use ``Qwen2VLImageProcessor`` / ``Qwen2VLVideoProcessor``):
pixels, placeholder expansion and M-RoPE positions.

Images follow ``Qwen2VLImageProcessorPil`` exactly (Pillow resize, numpy rescale and normalise); videos
follow ``Qwen2VLVideoProcessor`` (uint8 bicubic antialiased resize, the kernel torchvision calls on CPU;
fused rescale + normalise). Both give one row per patch, ordered (t, h-block, w-block, h-in-block,
w-in-block), each row (C, temporal_patch_size, patch_size, patch_size) flattened. The two generations
differ in one thing here: Qwen2.5-VL spaces a video's temporal positions by its time
(`tokens_per_second` x seconds per frame group, `second_per_grid_ts`), Qwen2-VL by 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from ..checkpoint import read_processor_configs
from ..conversation import media_items, template_view
from ..errors import InputError
from ..media import VideoSample, load_image, probe_video, read_frames, resample_mode, sample_frames_bounded
from ..pipeline import pad_id
from ..tokenizer import Tokenizer
from .images import PatchSettings, SizeRule, frame_rows, image_rows, smart_resize
from .prompt import (IMAGE, VIDEO, Placeholder, Row, VisionRun, batch_inputs, expand_placeholders, grid_tokens,
                     repeated)

# Frames per second sampled from a video when neither the call nor the checkpoint says (the reference's
# sampling default, as qwen-vl-utils uses it); the reference without sampling would keep every frame.
DEFAULT_VIDEO_FPS = 2.0


class _QwenPatchSettings(PatchSettings):
    @classmethod
    def from_dict(cls, d: dict[str, Any], **extra: Any):
        """Build from a transformers processor dict (``min_pixels``/``max_pixels`` and/or ``size``)."""
        kw = cls.known_fields(d, skip=("min_pixels", "max_pixels", "video"))
        size = d.get("size") or {}
        defaults = {f.name: f.default for f in fields(cls)}
        min_px = d.get("min_pixels") or size.get("shortest_edge") or size.get("min_pixels")
        max_px = d.get("max_pixels") or size.get("longest_edge") or size.get("max_pixels")
        kw["min_pixels"] = int(min_px or defaults["min_pixels"])
        kw["max_pixels"] = int(max_px or defaults["max_pixels"])
        return cls(**kw, **extra)


@dataclass(frozen=True)
class VideoSettings(_QwenPatchSettings):
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
class VisionSettings(_QwenPatchSettings):
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


def resized_size(height: int, width: int, settings: PatchSettings, min_pixels: int | None = None,
                 max_pixels: int | None = None) -> tuple[int, int]:
    """The (height, width) an image of this size is resized to (bounds: the call's, else the settings')."""
    lo = settings.min_pixels if min_pixels is None else min_pixels
    hi = settings.max_pixels if max_pixels is None else max_pixels
    return smart_resize(height, width, settings.factor, lo, hi)


def preprocess_images(images: Sequence[Image.Image], settings: VisionSettings, min_pixels: int | None = None,
                      max_pixels: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images -> (pixel_values float32 [sum(t*h*w), C*tp*p*p], image_grid_thw int64 [n, 3])."""
    return image_rows(images, settings, lambda h, w: resized_size(h, w, settings, min_pixels, max_pixels))


def preprocess_frames(frames: np.ndarray, settings: VisionSettings, min_pixels: int | None = None,
                      max_pixels: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded frames (T, H, W, 3) uint8 -> (pixel_values_videos, video_grid_thw [1, 3])."""
    return frame_rows(frames, settings.video, frame_size(settings, len(frames), min_pixels, max_pixels))


def frame_size(settings: VisionSettings, count: int, min_pixels: int | None = None,
               max_pixels: int | None = None) -> SizeRule:
    """The size rule of a clip's `count` frames (bounds per frame: the call's, else the settings')."""
    s = settings.video
    lo = s.min_pixels if min_pixels is None else min_pixels
    hi = s.max_pixels if max_pixels is None else max_pixels
    if s.cap_pixels_per_frame and count:  # the reference's bound on a whole video's pixels
        budget = int(s.max_video_tokens * s.factor * s.factor * 0.9)
        hi = max(min(hi, budget * s.temporal_patch_size // count), int(lo * 1.05))
    return lambda h, w: smart_resize(h, w, s.factor, lo, hi)


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
    size = frame_size(settings, len(indices), min_pixels, max_pixels)  # each frame is resized as it arrives
    pixel_values, grid = frame_rows(read_frames(path, indices, resize=size, mode=resample_mode(s.resample)), s, size)
    return pixel_values, grid, VideoSample(info, tuple(indices))


@dataclass
class TokenIds:
    image: int
    video: int
    pad: int


def token_ids(config: dict[str, Any], tokenizer: Tokenizer, generation: dict[str, Any]) -> TokenIds:
    """The placeholder ids from config.json (else the tokenizer's) and the padding id."""
    return TokenIds(image=config.get("image_token_id") or tokenizer.token_id("<|image_pad|>"),
                    video=config.get("video_token_id") or tokenizer.token_id("<|video_pad|>"),
                    pad=pad_id(generation, tokenizer))


class QwenVLInputs:
    """Builds `input_ids`, `attention_mask`, `mm_token_type_ids`, vision tensors, `positions` (3, B, L) and
    `next_position` for a left-padded batch.

    `tokens_per_second` (Qwen2.5-VL) spaces a video's temporal positions by time and adds
    `second_per_grid_ts` (seconds per frame group of each video) to the inputs; None (Qwen2-VL) steps by 1.
    """

    def __init__(self, tokenizer: Tokenizer, settings: VisionSettings, ids: TokenIds,
                 tokens_per_second: int | None = None):
        self.tokenizer, self.settings, self.ids = tokenizer, settings, ids
        self.tokens_per_second = tokens_per_second

    def __call__(self, conversations: list[list[dict]], add_generation_prompt: bool = True,
                 **media_options: Any) -> dict[str, Any]:
        seconds: list[float] = []  # per video, in order

        def encode(messages: list[dict]) -> Row:
            ids = self.tokenizer.encode_chat(template_view(messages), add_generation_prompt=add_generation_prompt)
            images, videos = self._vision(messages, media_options)
            seconds.extend(self._seconds(sample) for _, _, sample in videos)
            return *self._expand(ids, images, videos), images, videos

        out = batch_inputs(conversations, encode, self.ids.pad)
        if seconds and self.tokens_per_second is not None:
            out["second_per_grid_ts"] = torch.tensor(seconds)
        return out

    def visual_tokens(self, inputs: dict[str, Any]) -> dict[str, list[int]]:
        """Placeholder tokens of each image and each video of `inputs`, in order (for cost estimates)."""
        return grid_tokens(inputs, self.settings.merge_size**2, self.settings.merge_size**2)

    def resized_size(self, width: int, height: int, **media_options: Any) -> tuple[int, int]:
        """The (width, height) an image of this size is shown to the model at (Qwen2.5-VL boxes are in its pixels)."""
        bounds = {k: media_options.get(k) for k in ("min_pixels", "max_pixels")}
        h, w = resized_size(height, width, self.settings, **bounds)
        return w, h

    def _vision(self, messages, options):
        media = media_items(messages)
        pixel_args = {k: options.get(k) for k in ("min_pixels", "max_pixels")}
        most = self.settings.max_pixels if pixel_args["max_pixels"] is None else pixel_args["max_pixels"]
        images = [load_image(m.source, target_pixels=most) for m in media if m.kind == "image"]
        image_part = preprocess_images(images, self.settings, **pixel_args) if images else None
        videos = [preprocess_video(m.source, self.settings, **self._sampling({**options, **m.options}), **pixel_args)
                  for m in media if m.kind == "video"]
        return image_part, videos

    def _sampling(self, options: dict[str, Any]) -> dict[str, Any]:
        """fps / num_frames for one video: the call's, else the checkpoint's, else DEFAULT_VIDEO_FPS."""
        fps, num_frames = options.get("fps"), options.get("num_frames")
        if fps is None and num_frames is None and not self.settings.video.do_sample_frames:
            fps = DEFAULT_VIDEO_FPS
        return {"fps": fps, "num_frames": num_frames}

    def _seconds(self, sample: VideoSample) -> float:
        """Seconds one frame group spans, as the reference's second_per_grid_ts."""
        return self.settings.video.temporal_patch_size / sample.sampled_fps

    def _expand(self, ids: list[int], images, videos) -> tuple[list[int], list[int], list[VisionRun]]:
        """Each image/video placeholder replaced by one token per merged patch; the types and vision runs."""
        image_runs = [self._run(grid) for grid in (images[1] if images else [])]
        video_runs = [self._run(grid[0], sample) for _, grid, sample in videos]
        placeholders = [Placeholder(name, token, [repeated(token, kind, r.t * r.h * r.w) for r in runs])
                        for name, token, kind, runs in (("image", self.ids.image, IMAGE, image_runs),
                                                        ("video", self.ids.video, VIDEO, video_runs))]
        expanded, types = expand_placeholders(ids, placeholders)
        queues = {self.ids.image: iter(image_runs), self.ids.video: iter(video_runs)}
        return expanded, types, [next(queues[token]) for token in ids if token in queues]

    def _run(self, grid: torch.Tensor, sample: VideoSample | None = None) -> VisionRun:
        t, h, w = grid.tolist()
        m = self.settings.merge_size
        step: float | torch.Tensor = 1
        if sample is not None and self.tokens_per_second is not None:  # float32, as the reference's tensor
            step = self.tokens_per_second * torch.tensor(self._seconds(sample), dtype=torch.float32)
        return VisionRun(t, h // m, w // m, step)

"""Conversations -> GLM-4.1V model inputs: template, placeholder expansion (with per-frame timestamps
for videos), vision tensors and 3-D positions as the reference's ``get_rope_index``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...conversation import media_items, template_view
from ...media import VideoSample, load_image
from ...processing.prompt import (IMAGE, TEXT, VIDEO, Placeholder, Row, VisionRun, batch_inputs, expand_placeholders,
                                  grid_tokens, repeated)
from ...tokenizer import Tokenizer
from .processor import VisionSettings, preprocess_images, preprocess_video


@dataclass
class TokenIds:
    image: int  # <|image|>: one per merged patch, for images and video frames alike
    video: int  # <|video|>: the template's video placeholder, replaced by the frames
    begin_image: int
    end_image: int
    pad: int


class Glm4vInputs:
    """Builds `input_ids`, `attention_mask`, `mm_token_type_ids`, vision tensors, `positions` (3, B, L)
    and `next_position` for a left-padded batch."""

    def __init__(self, tokenizer: Tokenizer, settings: VisionSettings, ids: TokenIds):
        self.tokenizer, self.settings, self.ids = tokenizer, settings, ids

    def __call__(self, conversations: list[list[dict]], add_generation_prompt: bool = True,
                 template_vars: dict[str, Any] | None = None, **media_options: Any) -> dict[str, Any]:
        def encode(messages: list[dict]) -> Row:
            ids = self.tokenizer.encode_chat(template_view(messages), add_generation_prompt=add_generation_prompt,
                                             **(template_vars or {}))
            images, videos = self._vision(messages, media_options)
            return *self._expand(ids, images[1] if images else [], videos), images, videos

        return batch_inputs(conversations, encode, self.ids.pad)

    def _vision(self, messages, options):
        media = media_items(messages)
        pixels = {k: options.get(k) for k in ("min_pixels", "max_pixels")}
        image = self.settings.image
        most = image.max_pixels // image.temporal_patch_size if pixels["max_pixels"] is None else pixels["max_pixels"]
        images = [load_image(m.source, target_pixels=most) for m in media if m.kind == "image"]
        image_part = preprocess_images(images, self.settings.image, **pixels) if images else None
        videos = [preprocess_video(m.source, self.settings.video, fps=m.options.get("fps", options.get("fps")),
                                   num_frames=m.options.get("num_frames", options.get("num_frames")), **pixels)
                  for m in media if m.kind == "video"]
        return image_part, videos

    def _expand(self, ids: list[int], image_grid, videos) -> tuple[list[int], list[int], list[VisionRun]]:
        """Replace each image placeholder by one token per merged patch and each video placeholder by
        its frame pairs, each `<|begin_of_image|>` + tokens + `<|end_of_image|>` + its second (as text).

        Returns the ids, their types (TEXT/IMAGE/VIDEO) and the vision runs in order: one per image and
        one per video frame pair (t = 1 each).
        """
        images = [self._run(grid, self.settings.image.merge_size) for grid in image_grid]
        videos = [(self._run(grid[0], self.settings.video.merge_size), int(grid[0, 0]), sample)
                  for _, grid, sample in videos]
        expanded, types = expand_placeholders(ids, [
            Placeholder("image", self.ids.image, [repeated(self.ids.image, IMAGE, r.h * r.w) for r in images]),
            Placeholder("video", self.ids.video, [self._video_tokens(t, r.h * r.w, sample) for r, t, sample in videos]),
        ])
        queues = {self.ids.image: iter([r] for r in images), self.ids.video: iter([r] * t for r, t, _ in videos)}
        return expanded, types, [run for token in ids if token in queues for run in next(queues[token])]

    @staticmethod
    def _run(grid: torch.Tensor, merge: int) -> VisionRun:
        """One image or video frame pair of a (t, h, w) patch grid: 1 x h/merge x w/merge merged tokens."""
        _, h, w = grid.tolist()
        return VisionRun(1, h // merge, w // merge)

    def _video_tokens(self, t: int, count: int, sample: VideoSample) -> tuple[list[int], list[int]]:
        """Token ids and types of a video's `t` frame pairs: each its `count` patch tokens framed as an
        image, then its timestamp."""
        seconds = sample.timestamps[::self.settings.video.temporal_patch_size][:t]  # first frame of each pair
        seconds += seconds[-1:] * (t - len(seconds)) if seconds else [0] * t
        ids, types = [], []
        for second in seconds:
            stamp = self.tokenizer.encode(str(int(second)))
            ids += [self.ids.begin_image, *[self.ids.image] * count, self.ids.end_image, *stamp]
            types += [TEXT, *[VIDEO] * count, TEXT, *[TEXT] * len(stamp)]
        return ids, types

    def visual_tokens(self, inputs: dict[str, Any]) -> dict[str, list[int]]:
        """Placeholder tokens of each image and each video of `inputs`, in order (for cost estimates)."""
        return grid_tokens(inputs, self.settings.image.merge_size**2, self.settings.video.merge_size**2)

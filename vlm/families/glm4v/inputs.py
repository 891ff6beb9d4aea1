"""Conversations -> GLM-4.1V model inputs: template, placeholder expansion (with per-frame timestamps
for videos), vision tensors and 3-D positions as the reference's ``get_rope_index``."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch

from ...conversation import left_pad, media_items, template_view
from ...errors import InputError
from ...media import VideoSample, load_image
from ...tokenizer import Tokenizer
from .processor import VisionSettings, preprocess_images, preprocess_video

TEXT, IMAGE, VIDEO = 0, 1, 2


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
        rows, kinds, grids, images, videos = [], [], [], [], []
        for messages in conversations:
            ids = self.tokenizer.encode_chat(template_view(messages), add_generation_prompt=add_generation_prompt,
                                             **(template_vars or {}))
            row_images, row_videos = self._vision(messages, media_options)
            ids, types, row_grids = self._expand(ids, row_images[1] if row_images else [], row_videos)
            rows.append(ids)
            kinds.append(types)
            grids.append(row_grids)
            images += [row_images] if row_images else []
            videos += row_videos
        input_ids, attention_mask = left_pad(rows, self.ids.pad)
        out: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask,
                               "mm_token_type_ids": left_pad(kinds, TEXT)[0]}
        if images:
            out["pixel_values"] = torch.cat([pv for pv, _ in images])
            out["image_grid_thw"] = torch.cat([g for _, g in images])
        if videos:
            out["pixel_values_videos"] = torch.cat([pv for pv, _, _ in videos])
            out["video_grid_thw"] = torch.cat([g for _, g, _ in videos])
        out["positions"], out["next_position"] = self.positions(input_ids, kinds, grids)
        return out

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

    def _expand(self, ids: list[int], image_grid, videos) -> tuple[list[int], list[int], list[tuple[int, int]]]:
        """Replace each image placeholder by one token per merged patch and each video placeholder by
        its frame pairs, each `<|begin_of_image|>` + tokens + `<|end_of_image|>` + its second (as text).

        Returns the ids, their types (TEXT/IMAGE/VIDEO) and the merged (h, w) of each run of vision tokens.
        """
        found = {"image": ids.count(self.ids.image), "video": ids.count(self.ids.video)}
        for name, given in (("image", len(image_grid)), ("video", len(videos))):
            if found[name] != given:
                raise InputError(f"The prompt has {found[name]} {name} placeholders for {given} {name}s.")
        images, frames = iter(image_grid), iter(videos)
        out, types, grids = [], [], []
        for token in ids:
            if token == self.ids.image:
                _, h, w = next(images).tolist()
                m = self.settings.image.merge_size
                out += [token] * (h * w // m**2)
                types += [IMAGE] * (h * w // m**2)
                grids.append((h // m, w // m))
            elif token == self.ids.video:
                _, grid, sample = next(frames)
                t, h, w = grid[0].tolist()
                m = self.settings.video.merge_size
                for frame_ids, frame_types in self._video_frames(t, h * w // m**2, sample):
                    out += frame_ids
                    types += frame_types
                    grids.append((h // m, w // m))
            else:
                out.append(token)
                types.append(TEXT)
        return out, types, grids

    def _video_frames(self, t: int, count: int, sample: VideoSample):
        """Token ids and types of each of the `t` frame pairs: its `count` patch tokens framed as an
        image, then its timestamp."""
        seconds = sample.timestamps[::self.settings.video.temporal_patch_size][:t]  # first frame of each pair
        seconds += seconds[-1:] * (t - len(seconds)) if seconds else [0] * t
        for second in seconds:
            stamp = self.tokenizer.encode(str(int(second)))
            yield ([self.ids.begin_image, *[self.ids.image] * count, self.ids.end_image, *stamp],
                   [TEXT, *[VIDEO] * count, TEXT, *[TEXT] * len(stamp)])

    @staticmethod
    def positions(input_ids: torch.Tensor, kinds: list[list[int]],
                  grids: list[list[tuple[int, int]]]) -> tuple[torch.Tensor, torch.Tensor]:
        """3-D positions (3, B, L) and each row's next position, as the reference's get_rope_index.

        Text advances all three axes together; an image or a video frame pair of h x w merged patches
        (`grids`, per row in order) takes (start, start + row, start + column) and advances the text
        position by max(h, w).
        """
        batch, width = input_ids.shape
        positions = torch.zeros(3, batch, width, dtype=torch.long)
        next_position = torch.zeros(batch, dtype=torch.long)
        for row, (types, row_grids) in enumerate(zip(kinds, grids)):
            parts, current, runs = [], 0, iter(row_grids)
            for kind, group in itertools.groupby(types):
                count = len(list(group))
                if kind == TEXT:
                    parts.append(torch.arange(current, current + count).expand(3, -1))
                    current += count
                else:
                    h, w = next(runs)
                    if h * w != count:
                        raise InputError("Vision placeholder runs do not match the patch grids.")
                    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
                    parts.append(torch.stack([torch.zeros_like(rows), rows, cols]).reshape(3, -1) + current)
                    current += max(h, w)
            row_positions = torch.cat(parts, dim=1)
            positions[:, row, width - row_positions.shape[1]:] = row_positions
            next_position[row] = row_positions.max() + 1
        return positions, next_position

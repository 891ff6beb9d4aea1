"""Conversations -> Qwen2-VL model inputs: template, placeholder expansion, vision tensors, M-RoPE positions."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch

from ...conversation import left_pad, media_items, template_view
from ...errors import InputError
from ...media import load_image
from ...tokenizer import Tokenizer
from .processor import VisionSettings, preprocess_images, preprocess_video

TEXT, IMAGE, VIDEO = 0, 1, 2
# Frames per second sampled from a video when neither the call nor the checkpoint says (the reference's
# sampling default, as qwen-vl-utils uses it); the reference without sampling would keep every frame.
DEFAULT_VIDEO_FPS = 2.0


@dataclass
class TokenIds:
    image: int
    video: int
    pad: int


class Qwen2VLInputs:
    """Builds `input_ids`, `attention_mask`, `positions`, `next_position` and vision tensors for a batch."""

    def __init__(self, tokenizer: Tokenizer, settings: VisionSettings, ids: TokenIds):
        self.tokenizer, self.settings, self.ids = tokenizer, settings, ids

    def __call__(self, conversations: list[list[dict]], add_generation_prompt: bool = True,
                 **media_options: Any) -> dict[str, Any]:
        rows, kinds, images, videos = [], [], [], []
        for messages in conversations:
            ids = self.tokenizer.encode_chat(template_view(messages), add_generation_prompt=add_generation_prompt)
            row_images, row_videos = self._vision(messages, media_options)
            ids, types = self._expand(ids, row_images[1] if row_images else None, row_videos[1] if row_videos else None)
            rows.append(ids)
            kinds.append(types)
            images += [row_images] if row_images else []
            videos += [row_videos] if row_videos else []
        input_ids, attention_mask = left_pad(rows, self.ids.pad)
        out: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if images:
            out["pixel_values"] = torch.cat([pv for pv, _ in images])
            out["image_grid_thw"] = torch.cat([g for _, g in images])
        if videos:
            out["pixel_values_videos"] = torch.cat([pv for pv, _ in videos])
            out["video_grid_thw"] = torch.cat([g for _, g in videos])
        out["positions"], out["next_position"] = self.positions(
            input_ids, attention_mask, kinds, out.get("image_grid_thw"), out.get("video_grid_thw"))
        return out

    def _vision(self, messages, options):
        media = media_items(messages)
        pixel_args = {k: options.get(k) for k in ("min_pixels", "max_pixels")}
        most = self.settings.max_pixels if pixel_args["max_pixels"] is None else pixel_args["max_pixels"]
        images = [load_image(m.source, target_pixels=most) for m in media if m.kind == "image"]
        image_part = preprocess_images(images, self.settings, **pixel_args) if images else None
        video_parts = [
            preprocess_video(m.source, self.settings, **self._sampling({**options, **m.options}), **pixel_args)[:2]
            for m in media if m.kind == "video"
        ]
        video_part = None
        if video_parts:
            video_part = (torch.cat([pv for pv, _ in video_parts]), torch.cat([g for _, g in video_parts]))
        return image_part, video_part

    def _sampling(self, options: dict[str, Any]) -> dict[str, Any]:
        """fps / num_frames for one video: the call's, else the checkpoint's, else DEFAULT_VIDEO_FPS."""
        fps, num_frames = options.get("fps"), options.get("num_frames")
        if fps is None and num_frames is None and not self.settings.video.do_sample_frames:
            fps = DEFAULT_VIDEO_FPS
        return {"fps": fps, "num_frames": num_frames}

    def _expand(self, ids: list[int], image_grid, video_grid) -> tuple[list[int], list[int]]:
        """Replace each image/video placeholder by one token per merged patch; check the counts."""
        merge = self.settings.merge_size**2
        grids = {self.ids.image: list(image_grid) if image_grid is not None else [],
                 self.ids.video: list(video_grid) if video_grid is not None else []}
        found = {key: ids.count(key) for key in grids}
        for key, name in ((self.ids.image, "image"), (self.ids.video, "video")):
            if found[key] != len(grids[key]):
                raise InputError(f"The prompt has {found[key]} {name} placeholders for {len(grids[key])} {name}s.")
        out, types, used = [], [], {key: 0 for key in grids}
        for token in ids:
            if token in grids:
                count = int(grids[token][used[token]].prod()) // merge
                used[token] += 1
                out += [token] * count
                types += [IMAGE if token == self.ids.image else VIDEO] * count
            else:
                out.append(token)
                types.append(TEXT)
        return out, types

    def positions(self, input_ids, attention_mask, kinds, image_grid, video_grid):
        """M-RoPE positions (3, B, L) as the reference's get_rope_index, and each row's next position."""
        batch, width = input_ids.shape
        positions = torch.zeros(3, batch, width, dtype=torch.long)
        next_position = torch.zeros(batch, dtype=torch.long)
        grids = {IMAGE: iter(image_grid if image_grid is not None else []),
                 VIDEO: iter(video_grid if video_grid is not None else [])}
        merge = self.settings.merge_size
        for row, types in enumerate(kinds):
            parts, current = [], 0
            for kind, group in itertools.groupby(types):
                count = len(list(group))
                if kind == TEXT:
                    parts.append(torch.arange(current, current + count).expand(3, -1))
                    current += count
                else:
                    t, h, w = next(grids[kind]).tolist()
                    parts.append(_grid_positions(t, h // merge, w // merge) + current)
                    current += max(h, w) // merge
            row_positions = torch.cat(parts, dim=1)
            positions[:, row, width - row_positions.shape[1]:] = row_positions
            next_position[row] = row_positions.max() + 1
        return positions, next_position


def _grid_positions(t: int, h: int, w: int) -> torch.Tensor:
    """(3, t*h*w) temporal/row/column indices of a vision grid."""
    tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([tt, hh, ww]).reshape(3, -1)

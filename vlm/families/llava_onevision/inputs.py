"""Conversations -> LLaVA-OneVision model inputs: template, placeholder expansion, pixel tensors, 1-D positions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...conversation import Media, left_pad, media_items, template_view
from ...errors import InputError
from ...media import load_image, probe_video, read_frames, resample_mode, sample_frames_uniform
from ...tokenizer import Tokenizer
from .processor import ProcessorSettings, largest_image, pad_stack, preprocess_frames, preprocess_image


@dataclass
class TokenIds:
    image: int
    video: int
    pad: int


class LlavaOnevisionInputs:
    """Builds `input_ids`, `attention_mask`, `positions`, `next_position` and the vision tensors of a batch.

    Media options: `num_frames` or `fps` sample videos; `min_pixels` / `max_pixels` (Qwen2-VL's) do not apply.

    Vision tensors are laid out as the reference's: `pixel_values` (images, max tiles, 3, S, S) with
    `image_sizes` (images, 2) and `batch_num_images` (conversations with images,); `pixel_values_videos`
    (videos, max frames, 3, S, S) with `video_num_frames` (videos,).
    """

    def __init__(self, tokenizer: Tokenizer, settings: ProcessorSettings, ids: TokenIds, grid: int, max_context: int):
        self.tokenizer, self.settings, self.ids = tokenizer, settings, ids
        self.grid, self.max_context = grid, max_context

    def __call__(self, conversations: list[list[dict]], add_generation_prompt: bool = True,
                 **media_options: Any) -> dict[str, Any]:
        template_vars = media_options.pop("template_vars", None) or {}
        rows, images, image_sizes, per_row, videos = [], [], [], [], []
        for messages in conversations:
            ids = self.tokenizer.encode_chat(_text_parts(template_view(messages)),
                                             add_generation_prompt=add_generation_prompt, **template_vars)
            media = media_items(messages)
            pictures = [load_image(m.source, target_pixels=largest_image(self.settings.image))
                        for m in media if m.kind == "image"]
            clips = [self._video(m, media_options) for m in media if m.kind == "video"]
            anyres = len(pictures) == 1  # the reference tiles a conversation's image only when it is alone
            counts = {
                self.ids.image: [self.settings.image_tokens((p.height, p.width), anyres, self.grid) for p in pictures],
                self.ids.video: [self.settings.video_tokens(len(c), self.grid) for c in clips],
            }
            rows.append(self._expand(ids, counts))
            images += [preprocess_image(p, self.settings.image, anyres) for p in pictures]
            image_sizes += [(p.height, p.width) for p in pictures]
            per_row += [len(pictures)] if pictures else []
            videos += clips
        input_ids, attention_mask = left_pad(rows, self.ids.pad)
        out: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if images:
            out["pixel_values"] = pad_stack(images)
            out["image_sizes"] = torch.tensor(image_sizes, dtype=torch.long)
            out["batch_num_images"] = torch.tensor(per_row, dtype=torch.long)
        if videos:
            out["pixel_values_videos"] = pad_stack(videos)
            out["video_num_frames"] = torch.tensor([len(v) for v in videos], dtype=torch.long)
        # 1-D positions as transformers' generate derives them: count of real tokens so far, padding at 0.
        out["positions"] = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)[None]
        out["next_position"] = attention_mask.sum(-1)
        return out

    def visual_tokens(self, inputs: dict[str, Any]) -> dict[str, list[int]]:
        """Placeholder tokens of each image and each video of one conversation's `inputs`, in order (for cost
        estimates)."""
        sizes = inputs.get("image_sizes", torch.zeros(0, 2, dtype=torch.long)).tolist()
        frames = inputs.get("video_num_frames", torch.zeros(0, dtype=torch.long)).tolist()
        return {"image": [self.settings.image_tokens(tuple(size), len(sizes) == 1, self.grid) for size in sizes],
                "video": [self.settings.video_tokens(n, self.grid) for n in frames]}

    def _video(self, item: Media, options: dict[str, Any]) -> torch.Tensor:
        """Sample (the call's or the item's num_frames / fps, else the processor's), decode, preprocess."""
        s = self.settings.video
        num_frames = item.options.get("num_frames", options.get("num_frames"))
        fps = item.options.get("fps", options.get("fps"))
        if num_frames is None and fps is None and s.do_sample_frames:
            num_frames, fps = s.num_frames, (s.fps if s.num_frames is None else None)
        info = probe_video(item.source)
        indices = sample_frames_uniform(info.num_frames, info.fps, num_frames=num_frames, fps=fps)
        needed = self.settings.video_tokens(len(indices), self.grid)
        if needed >= self.max_context:
            raise InputError(f"{info.path}: {len(indices)} frames need {needed} tokens, more than this model's context "
                             f"of {self.max_context}; pass num_frames (e.g. 8) or fps (e.g. 1) to sample fewer frames.")
        frames = read_frames(item.source, indices, resize=lambda h, w: s.size, mode=resample_mode(s.resample))
        return preprocess_frames(frames, s)

    def _expand(self, ids: list[int], counts: dict[int, list[int]]) -> list[int]:
        """Repeat each image/video placeholder by its feature count; the placeholders must match the media."""
        for token, name in ((self.ids.image, "image"), (self.ids.video, "video")):
            found, given = ids.count(token), len(counts[token])
            if found != given:
                raise InputError(f"The prompt has {found} {name} placeholders for {given} {name}s.")
        pending = {token: iter(c) for token, c in counts.items()}
        out: list[int] = []
        for token in ids:
            out += [token] * next(pending[token]) if token in pending else [token]
        return out


def _text_parts(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """String content as one text part: the hub template renders only typed parts and would drop it."""
    return [{**m, "content": [{"type": "text", "text": m["content"]}]} if isinstance(m["content"], str) else m
            for m in messages]

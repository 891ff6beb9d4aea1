"""Qwen2-VL: vision transformer + Qwen2 decoder with M-RoPE."""

from __future__ import annotations

from typing import Any

from torch import nn

from ...layers.decoder import Decoder, DecoderConfig
from ...layers.rotary import MRotary
from ...model import ChatModel, Embedded, place_media, request_ids
from .vision import VisionConfig, VisionTransformer

# Checkpoint prefix -> module prefix; hub checkpoints already use the module names.
WEIGHT_NAMES = [
    ("model.language_model.", "model."),
    ("model.visual.", "visual."),
]
TIED = {"lm_head.weight": "model.embed_tokens.weight"}


class Qwen2VL(ChatModel):
    language_modules = ("model.", "lm_head")  # what quantization applies to

    def __init__(self, text: DecoderConfig, vision: VisionConfig, image_token_id: int, video_token_id: int):
        super().__init__()
        section = text.rope.get("mrope_section") or [16, 24, 24]
        self.model = Decoder(text, MRotary(text.head_dim, text.rope["rope_theta"], section))
        self.visual = VisionTransformer(vision)
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        self.image_token_id, self.video_token_id = image_token_id, video_token_id

    def embed(self, inputs: dict[str, Any]) -> Embedded:
        """Token embeddings with each image's and video's features written over its placeholders."""
        embedded = super().embed(inputs)
        ids = request_ids(inputs)
        for token, pixels, grid, kind in ((self.image_token_id, "pixel_values", "image_grid_thw", "image"),
                                          (self.video_token_id, "pixel_values_videos", "video_grid_thw", "video")):
            if pixels in inputs:
                grids = inputs[grid]
                parts = inputs[pixels].to(embedded.embeds.device).split(grids.prod(-1).tolist())
                items = [self.features.encode(self.visual, part, g[None]) for part, g in zip(parts, grids)]
                place_media(embedded, ids == token, items, kind)
        return embedded

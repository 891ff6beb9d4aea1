"""The model the Qwen VL families share (Qwen2-VL, Qwen2.5-VL): a Qwen2 decoder with M-RoPE and its head,
reading each image's and video's features, from the vision tower the family gives, over its placeholders.
The processor builds the M-RoPE positions (Qwen2.5-VL's time-aligned ones included)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..model import ChatModel, Embedded, place_media, request_ids
from .decoder import Decoder, DecoderConfig
from .rotary import MRotary

# Checkpoint prefix -> module prefix (first match wins); hub checkpoints, and transformers 5's save_pretrained,
# already use the module names.
WEIGHT_NAMES = [
    ("model.language_model.", "model."),  # transformers 5 in memory (its state_dict)
    ("model.visual.", "visual."),
    ("language_model.", "model."),  # the model without a head (Qwen2VLModel...) as transformers 5 saves it
]
TIED = {"lm_head.weight": "model.embed_tokens.weight"}


class QwenVL(ChatModel):
    """`visual`: the family's vision tower, (pixels, grid (1, 3)) -> one feature per placeholder token."""

    language_modules = ("model.", "lm_head")  # what quantization applies to

    def __init__(self, text: DecoderConfig, visual: nn.Module, image_token_id: int, video_token_id: int):
        super().__init__()
        section = text.rope.get("mrope_section") or [16, 24, 24]
        self.model = Decoder(text, MRotary(text.head_dim, text.rope["rope_theta"], section))
        self.visual = visual
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

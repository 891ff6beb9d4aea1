"""Qwen2-VL: vision transformer + Qwen2 decoder with M-RoPE."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...caching import FeatureCache
from ...errors import InputError
from ...layers.attention import KVCache
from ...layers.decoder import Decoder, DecoderConfig
from ...layers.rotary import MRotary
from .vision import VisionConfig, VisionTransformer

# Checkpoint prefix -> module prefix (first match wins); hub checkpoints, and transformers 5's save_pretrained,
# already use the module names.
WEIGHT_NAMES = [
    ("model.language_model.", "model."),  # transformers 5 in memory (its state_dict)
    ("model.visual.", "visual."),
    ("language_model.", "model."),  # Qwen2VLModel (no head) as transformers 5 saves it
]
TIED = {"lm_head.weight": "model.embed_tokens.weight"}


class Qwen2VL(nn.Module):
    language_modules = ("model.", "lm_head")  # what quantization applies to

    def __init__(self, text: DecoderConfig, vision: VisionConfig, image_token_id: int, video_token_id: int):
        super().__init__()
        section = text.rope.get("mrope_section") or [16, 24, 24]
        self.model = Decoder(text, MRotary(text.head_dim, text.rope["rope_theta"], section))
        self.visual = VisionTransformer(vision)
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        self.image_token_id, self.video_token_id = image_token_id, video_token_id
        self.features = FeatureCache()

    def embed(self, inputs: dict[str, Any]) -> torch.Tensor:
        """Token embeddings with vision features written over the image/video placeholders."""
        ids = inputs["input_ids"]
        embeds = self.model.embed_tokens(ids)
        for token, pixels, grid in ((self.image_token_id, "pixel_values", "image_grid_thw"),
                                    (self.video_token_id, "pixel_values_videos", "video_grid_thw")):
            if pixels not in inputs:
                continue
            features = self.features(self.visual, inputs[pixels].to(embeds.device), inputs[grid])
            slots = ids == token
            if int(slots.sum()) != features.shape[0]:
                raise InputError(f"{int(slots.sum())} placeholder tokens for {features.shape[0]} vision features.")
            embeds[slots] = features.to(embeds.dtype)
        return embeds

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(ids)

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        return self.model.new_cache(batch, capacity)

    def forward(self, embeds, positions, cache, valid) -> torch.Tensor:
        return self.model(embeds, positions, cache, valid)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

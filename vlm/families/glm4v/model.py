"""GLM-4.1V: the GLM-4.1V vision transformer feeding a GLM-4 decoder with 3-D (M-RoPE) positions."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...caching import FeatureCache
from ...errors import InputError
from ...layers.attention import KVCache
from ...layers.decoder import DecoderConfig
from ...layers.rotary import MRotary
from ..glm4.model import GlmDecoder, InterleavedRotary, rotary_dim
from .vision import VisionConfig, VisionTransformer

# Checkpoint prefix -> module prefix (first match wins). The modules carry the hub's names, which
# transformers 4 and 5 write too; `visual.*` and `language_model.*` are Glm4vModel's (no head), which
# transformers reads into this model by adding its `model.` prefix. `model.*` for the language model is a
# Qwen2-VL-style name this project has read from the start (transformers does not read it for GLM-4.1V).
WEIGHT_NAMES = [
    ("model.language_model.", "model.language_model."),
    ("model.visual.", "model.visual."),
    ("model.", "model.language_model."),
    ("visual.", "model.visual."),
    ("language_model.", "model.language_model."),
]
TIED = {"lm_head.weight": "model.language_model.embed_tokens.weight"}


class Glm4v(nn.Module):
    language_modules = ("model.language_model.", "lm_head")  # what quantization applies to

    def __init__(self, text: DecoderConfig, vision: VisionConfig, image_token_id: int):
        super().__init__()
        section = text.rope.get("mrope_section") or [8, 12, 12]
        rotary = InterleavedRotary(MRotary(rotary_dim(text, 1.0), text.rope["rope_theta"], section))
        self.model = nn.ModuleDict({"language_model": GlmDecoder(text, rotary, attention_bias=True),
                                    "visual": VisionTransformer(vision)})
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        self.image_token_id = image_token_id
        self.features = FeatureCache()

    @property
    def language_model(self) -> GlmDecoder:
        return self.model["language_model"]

    @property
    def visual(self) -> VisionTransformer:
        return self.model["visual"]

    def embed(self, inputs: dict[str, Any]) -> torch.Tensor:
        """Token embeddings with vision features written over the placeholders.

        Images and videos share one placeholder token; `mm_token_type_ids` (1 image, 2 video) tells
        them apart. Every video frame pair is encoded as an image of its own.
        """
        ids = inputs["input_ids"]
        embeds = self.language_model.embed_tokens(ids)
        for kind, pixels, grid in ((1, "pixel_values", "image_grid_thw"), (2, "pixel_values_videos", "video_grid_thw")):
            if pixels not in inputs:
                continue
            grids = inputs[grid]
            if kind == 2:
                grids = torch.repeat_interleave(grids, grids[:, 0], dim=0).index_fill(1, torch.tensor([0]), 1)
            features = self.features(self.visual, inputs[pixels].to(embeds.device), grids)
            slots = (ids == self.image_token_id) & (inputs["mm_token_type_ids"].to(ids.device) == kind)
            if int(slots.sum()) != features.shape[0]:
                raise InputError(f"{int(slots.sum())} placeholder tokens for {features.shape[0]} vision features.")
            embeds[slots] = features.to(embeds.dtype)
        return embeds

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.embed_tokens(ids)

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        return self.language_model.new_cache(batch, capacity)

    def forward(self, embeds, positions, cache, valid) -> torch.Tensor:
        return self.language_model(embeds, positions, cache, valid)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

"""GLM-4.1V: the GLM-4.1V vision transformer feeding a GLM-4 decoder with 3-D (M-RoPE) positions."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...layers.decoder import DecoderConfig
from ...layers.rotary import MRotary
from ...model import ChatModel, Embedded, place_media, request_ids
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


class Glm4v(ChatModel):
    language_modules = ("model.language_model.", "lm_head")  # what quantization applies to

    def __init__(self, text: DecoderConfig, vision: VisionConfig, image_token_id: int):
        super().__init__()
        section = text.rope.get("mrope_section") or [8, 12, 12]
        rotary = InterleavedRotary(MRotary(rotary_dim(text, 1.0), text.rope["rope_theta"], section))
        self.model = nn.ModuleDict({"language_model": GlmDecoder(text, rotary, attention_bias=True),
                                    "visual": VisionTransformer(vision)})
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        self.image_token_id = image_token_id

    @property
    def decoder(self) -> GlmDecoder:
        return self.model["language_model"]

    @property
    def visual(self) -> VisionTransformer:
        return self.model["visual"]

    def embed(self, inputs: dict[str, Any]) -> Embedded:
        """Token embeddings with each image's and video's features written over its placeholders.

        Images and videos share one placeholder token; `mm_token_type_ids` (1 image, 2 video) tells
        them apart. Every video frame pair is encoded as an image of its own.
        """
        embedded = super().embed(inputs)
        ids = request_ids(inputs)
        types = inputs["mm_token_type_ids"][0].to(ids.device)
        for kind, pixels, grid, name in ((1, "pixel_values", "image_grid_thw", "image"),
                                         (2, "pixel_values_videos", "video_grid_thw", "video")):
            if pixels not in inputs:
                continue
            grids = inputs[grid]
            parts = inputs[pixels].to(embedded.embeds.device).split(grids.prod(-1).tolist())
            items = [self.features.encode(self.visual, part, _frame_grids(g) if kind == 2 else g[None])
                     for part, g in zip(parts, grids)]
            place_media(embedded, (ids == self.image_token_id) & (types == kind), items, name)
        return embedded


def _frame_grids(grid: torch.Tensor) -> torch.Tensor:
    """A video's (t, h, w) grid as t grids of one frame pair each, (t, 3)."""
    return grid[None].repeat(int(grid[0]), 1).index_fill(1, torch.tensor([0]), 1)

"""IDEFICS' CLIP vision tower (ViT-H/14 in the released checkpoints): class token and learned positions,
a LayerNorm before the encoder, and the last layer's hidden states of every token as the image's
features (the pooled `post_layernorm` output is not used)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ... import cancellation
from ...errors import InputError
from ...layers.vit import Encoder, ViTConfig

# IdeficsVisionConfig's defaults.
DEFAULTS: dict[str, Any] = {
    "embed_dim": 768, "image_size": 224, "intermediate_size": 5120, "patch_size": 14, "num_hidden_layers": 32,
    "num_attention_heads": 16, "num_channels": 3, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
}


def vision_config(d: dict[str, Any] | None) -> ViTConfig:
    """IDEFICS' `vision_config`."""
    return ViTConfig.from_dict(d, DEFAULTS)


class Embeddings(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.image_size = cfg.image_size
        self.class_embedding = nn.Parameter(torch.empty(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size,
                                         bias=False)
        self.position_embedding = nn.Embedding(cfg.grid**2 + 1, cfg.hidden_size)  # the class token's, then patches

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (N, C, S, S) -> (N, 1 + patches, D): the class token, then the patches row by row."""
        if pixels.shape[-2:] != (self.image_size, self.image_size):
            raise InputError(f"Images must be {self.image_size}x{self.image_size} pixels for this vision tower, "
                             f"not {pixels.shape[-1]}x{pixels.shape[-2]}.")
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class ClipVision(nn.Module):
    """Hub prefix `model.vision_model.`."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.embeddings = Embeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic: the hub's name
        self.encoder = Encoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # of the pooled token: unused

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (N, C, S, S) -> the last layer's hidden states (N, tokens, D)."""
        x = self.pre_layrnorm(self.embeddings(pixels))
        for layer in self.encoder.layers:
            cancellation.check()
            x = layer(x)
        return x

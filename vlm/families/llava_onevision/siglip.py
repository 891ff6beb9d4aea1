"""SigLIP vision tower (as LLaVA-OneVision uses it): patch embedding with learned positions, then a
pre-norm ViT encoder; the caller picks which layers' hidden states it wants (no post-norm, no head)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ... import cancellation
from ...layers.vit import Encoder, ViTConfig

# SiglipVisionConfig's defaults, overridden by the ones LlavaOnevisionConfig gives its vision sub-config.
DEFAULTS: dict[str, Any] = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "num_channels": 3, "image_size": 224, "patch_size": 16, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
}
LLAVA_ONEVISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 1152, "intermediate_size": 4304, "patch_size": 14, "image_size": 384, "num_hidden_layers": 26,
    "num_attention_heads": 16,
}


def siglip_config(d: dict[str, Any] | None) -> ViTConfig:
    """LLaVA-OneVision's `vision_config`."""
    return ViTConfig.from_dict(d, {**DEFAULTS, **LLAVA_ONEVISION_DEFAULTS})


class Embeddings(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.grid**2, cfg.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (N, C, S, S) -> (N, grid^2, D)."""
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))
        return x.flatten(2).transpose(1, 2) + self.position_embedding.weight


class SiglipVision(nn.Module):
    """Returns the hidden states of the requested layers (0 = embeddings, -1 = last layer), concatenated.

    `post_layernorm` is part of the checkpoint, but LLaVA takes its features before it.
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixels: torch.Tensor, feature_layers: list[int]) -> torch.Tensor:
        """pixels (N, C, S, S) -> (N, grid^2, D * len(feature_layers))."""
        count = self.cfg.num_layers + 1
        wanted = [i % count for i in feature_layers]
        x = self.embeddings(pixels)
        kept = {0: x} if 0 in wanted else {}
        for i, layer in enumerate(self.encoder.layers[:max(wanted)], 1):  # later layers are never used
            cancellation.check()
            x = layer(x)
            if i in wanted:
                kept[i] = x
        return torch.cat([kept[i] for i in wanted], dim=-1)

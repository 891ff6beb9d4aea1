"""SigLIP vision tower (as LLaVA-OneVision uses it): patch embedding with learned positions, then a
pre-norm ViT encoder; the caller picks which layers' hidden states it wants (no post-norm, no head)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ... import cancellation
from ...layers.attention import full_attention
from ...layers.mlp import MLP

# SiglipVisionConfig's defaults, overridden by the ones LlavaOnevisionConfig gives its vision sub-config.
DEFAULTS: dict[str, Any] = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "num_channels": 3, "image_size": 224, "patch_size": 16, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
}
LLAVA_ONEVISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 1152, "intermediate_size": 4304, "patch_size": 14, "image_size": 384, "num_hidden_layers": 26,
    "num_attention_heads": 16,
}


@dataclass
class SiglipConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "SiglipConfig":
        d = {**DEFAULTS, **LLAVA_ONEVISION_DEFAULTS, **(d or {})}
        return cls(hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
                   num_layers=d["num_hidden_layers"], num_heads=d["num_attention_heads"], image_size=d["image_size"],
                   patch_size=d["patch_size"], num_channels=d["num_channels"], hidden_act=d["hidden_act"],
                   layer_norm_eps=d["layer_norm_eps"])

    @property
    def grid(self) -> int:
        """Patches per side of one image tile."""
        return self.image_size // self.patch_size


class Embeddings(nn.Module):
    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.grid**2, cfg.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (N, C, S, S) -> (N, grid^2, D)."""
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))
        return x.flatten(2).transpose(1, 2) + self.position_embedding.weight


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape
        q, k, v = (p(x).view(n, length, self.heads, -1).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        out = full_attention(q, k, v)  # (N, heads, patches, head_dim), every patch sees all
        return self.out_proj(out.transpose(1, 2).reshape(n, length, -1))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = Attention(cfg.hidden_size, cfg.num_heads)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_layers))


class SiglipVision(nn.Module):
    """Returns the hidden states of the requested layers (0 = embeddings, -1 = last layer), concatenated.

    `post_layernorm` is part of the checkpoint, but LLaVA takes its features before it.
    """

    def __init__(self, cfg: SiglipConfig):
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

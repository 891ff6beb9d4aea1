"""Qwen2-VL vision transformer: 3-D patch embedding, 2-D rotary ViT blocks with attention confined to
each image (or video frame group), and the 2x2 patch merger into the language model's width."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ... import cancellation
from ...layers.attention import VisionAttention
from ...layers.mlp import MLP
from ...layers.patches import patch_rows_cols
from ...layers.rotary import VisionRotary2D


@dataclass
class VisionConfig:
    depth: int
    embed_dim: int
    hidden_size: int  # output width (the language model's hidden size)
    num_heads: int
    mlp_ratio: float
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    in_channels: int = 3
    hidden_act: str = "quick_gelu"
    rope_theta: float = 10000.0

    @classmethod
    def from_dict(cls, d: dict[str, Any], text_hidden: int) -> "VisionConfig":
        return cls(
            depth=d["depth"], embed_dim=d["embed_dim"], hidden_size=d.get("hidden_size", text_hidden),
            num_heads=d["num_heads"], mlp_ratio=d.get("mlp_ratio", 4), patch_size=d.get("patch_size", 14),
            temporal_patch_size=d.get("temporal_patch_size", 2), spatial_merge_size=d.get("spatial_merge_size", 2),
            in_channels=d.get("in_channels", d.get("in_chans", 3)), hidden_act=d.get("hidden_act", "quick_gelu"),
            rope_theta=(d.get("rope_parameters") or {}).get("rope_theta", 10000.0),
        )


class PatchEmbed(nn.Module):
    """Conv3d with kernel = stride = (temporal patch, patch, patch), applied as one matmul per patch."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.embed_dim, kernel_size=k, stride=k, bias=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """patches (N, C * tp * p * p) -> (N, embed_dim)."""
        weight = self.proj.weight
        return F.linear(patches.to(weight.dtype), weight.flatten(1))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.attn = VisionAttention(cfg.embed_dim, cfg.num_heads)
        self.mlp = MLP(cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio), cfg.hidden_act)

    def forward(self, x, cos, sin, lengths):
        x = x + self.attn(self.norm1(x), cos, sin, lengths)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """LayerNorm, then each merge x merge block of patches concatenated and projected by an MLP."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        width = cfg.embed_dim * cfg.spatial_merge_size**2
        self.ln_q = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, cfg.hidden_size))
        self.width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.width))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.rotary = VisionRotary2D(cfg.embed_dim // cfg.num_heads, cfg.rope_theta)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)

    def forward(self, patches: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """patches (N, C*tp*p*p), grid_thw (n, 3) -> merged features (N / merge^2, hidden_size)."""
        rows_cols = patch_rows_cols(grid_thw, self.cfg.spatial_merge_size).to(patches.device)
        cos, sin = self.rotary(rows_cols)
        lengths = [h * w for t, h, w in grid_thw.tolist() for _ in range(t)]  # attention per frame group
        x = self.patch_embed(patches)
        for block in self.blocks:
            cancellation.check()
            x = block(x, cos, sin, lengths)
        return self.merger(x)


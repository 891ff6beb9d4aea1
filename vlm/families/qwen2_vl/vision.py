"""Qwen2-VL vision transformer: 3-D patch embedding, 2-D rotary ViT blocks with attention confined to
each image (or video frame group), and the 2x2 patch merger into the language model's width."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ... import cancellation
from ...layers.mlp import MLP
from ...layers.patches import patch_rows_cols
from ...layers.rotary import VisionRotary2D
from ...layers.vit import PatchEmbed, PatchMerger, VisionBlock, frame_lengths


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


def _layer_norm(dim: int) -> nn.Module:
    return nn.LayerNorm(dim, eps=1e-6)


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.in_channels, d, cfg.temporal_patch_size, cfg.patch_size)
        self.rotary = VisionRotary2D(d // cfg.num_heads, cfg.rope_theta)
        mlp = int(d * cfg.mlp_ratio)
        self.blocks = nn.ModuleList(VisionBlock(d, cfg.num_heads, _layer_norm, MLP(d, mlp, cfg.hidden_act))
                                    for _ in range(cfg.depth))
        self.merger = PatchMerger(d, cfg.hidden_size, cfg.spatial_merge_size, _layer_norm)

    def forward(self, patches: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """patches (N, C*tp*p*p), grid_thw (n, 3) -> merged features (N / merge^2, hidden_size)."""
        rows_cols = patch_rows_cols(grid_thw, self.cfg.spatial_merge_size).to(patches.device)
        cos, sin = self.rotary(rows_cols)
        lengths = frame_lengths(grid_thw)  # attention per frame group
        x = self.patch_embed(patches)
        for block in self.blocks:
            cancellation.check()
            x = block(x, cos, sin, lengths)
        return self.merger(x)

"""GLM-4.1V vision transformer: conv3d patch embedding, a learned position table resampled to each
image's grid, 2-D rotary RMSNorm blocks with attention confined to each image (or video frame pair),
then a 2x2 strided conv and a gated merger into the language model's width."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ... import cancellation
from ...layers.mlp import GatedMLP, activation
from ...layers.norms import RMSNorm
from ...layers.patches import patch_rows_cols
from ...layers.rotary import VisionRotary2D
from ...layers.vit import PatchEmbed, VisionBlock, frame_lengths


@dataclass
class VisionConfig:
    depth: int
    hidden_size: int
    num_heads: int
    intermediate_size: int  # width of the merger's gated MLP
    out_hidden_size: int  # the language model's width (and the blocks' MLP width)
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    image_size: int = 336  # the position table covers (image_size / patch_size)^2 patches
    in_channels: int = 3
    rms_norm_eps: float = 1e-5
    hidden_act: str = "silu"
    attention_bias: bool = False
    rope_theta: float = 10000.0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VisionConfig":
        names = set(cls.__dataclass_fields__)
        kw = {k: v for k, v in d.items() if k in names}
        kw.setdefault("num_heads", d.get("num_attention_heads"))
        kw["rope_theta"] = (d.get("rope_parameters") or {}).get("rope_theta", cls.rope_theta)
        return cls(**kw)


class PositionEmbedding(nn.Module):
    """A square table of learned positions, bicubically resampled at each patch's place in its image."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.side = cfg.image_size // cfg.patch_size
        self.position_embedding = nn.Embedding(self.side**2, cfg.hidden_size)

    def forward(self, rows_cols: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
        """rows_cols (N, 2) patch row/column, sizes (N, 2) its image's grid height/width -> (N, hidden)."""
        weight = self.position_embedding.weight
        table = weight.view(self.side, self.side, -1).permute(2, 0, 1)[None].float()  # (1, D, side, side)
        where = (rows_cols.float() + 0.5) / sizes.float() * 2 - 1  # grid_sample's [-1, 1], (row, col)
        grid = where.flip(-1)[None, :, None, :]  # (1, N, 1, 2) as (x = col, y = row)
        out = F.grid_sample(table, grid, mode="bicubic", align_corners=False, padding_mode="border")
        return out[0, :, :, 0].T.to(weight.dtype)


def _block(cfg: VisionConfig) -> VisionBlock:
    return VisionBlock(cfg.hidden_size, cfg.num_heads, lambda dim: RMSNorm(dim, cfg.rms_norm_eps),
                       GatedMLP(cfg.hidden_size, cfg.out_hidden_size, cfg.hidden_act),
                       qkv_bias=cfg.attention_bias, proj_bias=False)


class PatchMerger(nn.Module):
    """Linear, LayerNorm + GELU, then a gated MLP (out_hidden -> intermediate -> out_hidden)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        dim = cfg.out_hidden_size
        self.proj = nn.Linear(dim, dim, bias=False)
        self.post_projection_norm = nn.LayerNorm(dim)
        self.gate_proj = nn.Linear(dim, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(dim, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, dim, bias=False)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.post_projection_norm(self.proj(x)))
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = PositionEmbedding(cfg)
        self.patch_embed = PatchEmbed(cfg.in_channels, cfg.hidden_size, cfg.temporal_patch_size, cfg.patch_size,
                                      bias=True)
        self.rotary = VisionRotary2D(cfg.hidden_size // cfg.num_heads, cfg.rope_theta)
        self.post_conv_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.blocks = nn.ModuleList(_block(cfg) for _ in range(cfg.depth))
        self.post_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        m = cfg.spatial_merge_size
        self.downsample = nn.Conv2d(cfg.hidden_size, cfg.out_hidden_size, kernel_size=m, stride=m)
        self.merger = PatchMerger(cfg)

    def forward(self, patches: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """patches (N, C*tp*p*p), grid_thw (n, 3) -> merged features (N / merge^2, out_hidden)."""
        m = self.cfg.spatial_merge_size
        rows_cols = patch_rows_cols(grid_thw, m).to(patches.device)
        sizes = torch.cat([torch.tensor([[h, w]]).expand(t * h * w, 2) for t, h, w in grid_thw.tolist()])
        cos, sin = self.rotary(rows_cols)
        lengths = frame_lengths(grid_thw)  # attention per frame pair
        x = self.post_conv_layernorm(self.patch_embed(patches))
        x = x + self.embeddings(rows_cols, sizes.to(patches.device))
        for block in self.blocks:
            cancellation.check()
            x = block(x, cos, sin, lengths)
        x = self.post_layernorm(x).view(-1, m, m, x.shape[-1]).permute(0, 3, 1, 2)  # (N / m^2, D, m, m)
        return self.merger(self.downsample(x).flatten(1))


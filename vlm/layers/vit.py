"""Pieces of the vision towers, written once:
- the Qwen-style towers (Qwen2-VL, Qwen2.5-VL, GLM-4.1V): the 3-D patch embedding, the pre-norm ViT block
  whose norm and MLP the family chooses, and the patch merger into the language model;
- the CLIP and SigLIP towers (IDEFICS, LLaVA-OneVision): their config and pre-norm encoder layer (hub names
  `self_attn.{q,k,v,out}_proj`, `layer_norm1`, `mlp.fc1/fc2`, `layer_norm2`), every patch attending to every
  patch of its image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F

from .attention import VisionAttention, full_attention
from .mlp import MLP

Norm = Callable[[int], nn.Module]  # width -> a norm module (nn.LayerNorm, RMSNorm, with the family's eps)


class PatchEmbed(nn.Module):
    """Conv3d with kernel = stride = (temporal patch, patch, patch), applied as one matmul per patch row."""

    def __init__(self, in_channels: int, dim: int, temporal_patch_size: int, patch_size: int, bias: bool = False):
        super().__init__()
        k = (temporal_patch_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=k, stride=k, bias=bias)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """patches (N, C * tp * p * p) -> (N, dim)."""
        weight = self.proj.weight
        return F.linear(patches.to(weight.dtype), weight.flatten(1), self.proj.bias)


class VisionBlock(nn.Module):
    """x + attn(norm1(x)), then x + mlp(norm2(x)); attention runs within the segments it is given."""

    def __init__(self, dim: int, heads: int, norm: Norm, mlp: nn.Module, qkv_bias: bool = True,
                 proj_bias: bool = True):
        super().__init__()
        self.norm1, self.norm2 = norm(dim), norm(dim)
        self.attn = VisionAttention(dim, heads, qkv_bias=qkv_bias, proj_bias=proj_bias)
        self.mlp = mlp

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, lengths)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Norm, then each merge x merge block of patches concatenated and projected by a GELU MLP."""

    def __init__(self, dim: int, out_dim: int, merge_size: int, norm: Norm):
        super().__init__()
        self.width = dim * merge_size**2
        self.ln_q = norm(dim)
        self.mlp = nn.Sequential(nn.Linear(self.width, self.width), nn.GELU(), nn.Linear(self.width, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.width))


def frame_lengths(grid_thw: torch.Tensor) -> list[int]:
    """Patches per frame group of each (t, h, w) grid: the segments full attention stays within."""
    return [h * w for t, h, w in grid_thw.tolist() for _ in range(t)]


# ------------------------------------------------------------------------------------ CLIP and SigLIP
@dataclass
class ViTConfig:
    """A CLIP/SigLIP vision config (`embed_dim` is CLIP's older name for `hidden_size`)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    num_channels: int
    hidden_act: str
    layer_norm_eps: float

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, defaults: dict[str, Any]) -> "ViTConfig":
        """A `vision_config` over the family's defaults (which name every field, in the hub's names)."""
        d = {**defaults, **(d or {})}
        return cls(hidden_size=d.get("hidden_size", d.get("embed_dim")), intermediate_size=d["intermediate_size"],
                   num_layers=d["num_hidden_layers"], num_heads=d["num_attention_heads"], image_size=d["image_size"],
                   patch_size=d["patch_size"], num_channels=d["num_channels"], hidden_act=d["hidden_act"],
                   layer_norm_eps=d["layer_norm_eps"])

    @property
    def grid(self) -> int:
        """Patches per side of an image."""
        return self.image_size // self.patch_size


class Attention(nn.Module):
    """Multi-head attention of a ViT (q/k/v/out projections with biases, no mask)."""

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
    def __init__(self, dim: int, heads: int, hidden: int, act: str, eps: float):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.self_attn = Attention(dim, heads)
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, hidden, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    """Hub prefix `encoder.`: the stack of layers."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg.hidden_size, cfg.num_heads, cfg.intermediate_size,
                                                 cfg.hidden_act, cfg.layer_norm_eps) for _ in range(cfg.num_layers))

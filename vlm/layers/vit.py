"""Pieces of the Qwen-style vision towers (Qwen2-VL, Qwen2.5-VL, GLM-4.1V): the 3-D patch embedding, the
pre-norm ViT block whose norm and MLP the family chooses, and the patch merger into the language model."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from .attention import VisionAttention

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

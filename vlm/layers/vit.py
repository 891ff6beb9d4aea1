"""The pre-norm ViT encoder layer of CLIP and SigLIP towers (hub names `self_attn.{q,k,v,out}_proj`,
`layer_norm1`, `mlp.fc1/fc2`, `layer_norm2`): every patch attends to every patch of its image."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .attention import full_attention
from .mlp import MLP


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

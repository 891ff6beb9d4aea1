"""The perceiver resampler (Flamingo's): a fixed set of learned latents cross-attends to an image's
vision tokens (keys and values from the tokens and the latents together), with a ReLU MLP after each
attention and a final LayerNorm, so every image becomes `latents` vectors of the vision width."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...layers.attention import full_attention
from ...layers.mlp import activation

# IdeficsPerceiverConfig's defaults.
DEFAULTS: dict[str, Any] = {"resampler_depth": 6, "resampler_n_heads": 16, "resampler_head_dim": 96,
                            "resampler_n_latents": 64, "qk_layer_norms_perceiver": False}


@dataclass
class PerceiverConfig:
    depth: int
    heads: int
    head_dim: int
    latents: int
    qk_layer_norms: bool

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "PerceiverConfig":
        d = {**DEFAULTS, **(d or {})}
        return cls(depth=d["resampler_depth"], heads=d["resampler_n_heads"], head_dim=d["resampler_head_dim"],
                   latents=d["resampler_n_latents"], qk_layer_norms=bool(d["qk_layer_norms_perceiver"]))


class PerceiverAttention(nn.Module):
    def __init__(self, dim: int, cfg: PerceiverConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        self.context_layer_norm = nn.LayerNorm(dim)
        self.latents_layer_norm = nn.LayerNorm(dim)
        if cfg.qk_layer_norms:
            self.q_layer_norm = nn.LayerNorm(cfg.head_dim)
            self.k_layer_norm = nn.LayerNorm(cfg.head_dim)
        inner = cfg.heads * cfg.head_dim
        self.q_proj = nn.Linear(dim, inner, bias=False)
        self.k_proj = nn.Linear(dim, inner, bias=False)
        self.v_proj = nn.Linear(dim, inner, bias=False)
        self.output_proj = nn.Linear(inner, dim, bias=False)
        self.qk_layer_norms = cfg.qk_layer_norms

    def forward(self, context: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """context (N, T, D), latents (N, latents, D) -> (N, latents, D)."""
        context, latents = self.context_layer_norm(context), self.latents_layer_norm(latents)
        both = torch.cat([context, latents], dim=1)
        q, k, v = (x.view(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)
                   for x in (self.q_proj(latents), self.k_proj(both), self.v_proj(both)))
        if self.qk_layer_norms:
            q, k = self.q_layer_norm(q), self.k_layer_norm(k)
        out = full_attention(q, k, v)
        return self.output_proj(out.transpose(1, 2).flatten(2))


class PerceiverMLP(nn.Module):
    """LayerNorm, then fc -> ReLU -> c_proj (no biases)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, hidden, bias=False)
        self.c_proj = nn.Linear(hidden, dim, bias=False)
        self.act = activation("relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.fc(self.ln(x))))


class PerceiverResampler(nn.Module):
    """Hub prefix `model.perceiver_resampler.`; `blocks.N.0` is the attention, `blocks.N.1` the MLP."""

    def __init__(self, dim: int, cfg: PerceiverConfig):
        super().__init__()
        self.latents = nn.Parameter(torch.empty(cfg.latents, dim))
        self.blocks = nn.ModuleList(nn.ModuleList([PerceiverAttention(dim, cfg), PerceiverMLP(dim, 4 * dim)])
                                    for _ in range(cfg.depth))
        self.layer_norm = nn.LayerNorm(dim)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        """Vision tokens (N, T, D) -> (N, latents, D)."""
        latents = self.latents.expand(context.shape[0], -1, -1)
        for attention, mlp in self.blocks:
            latents = attention(context, latents) + latents
            latents = mlp(latents) + latents
        return self.layer_norm(latents)

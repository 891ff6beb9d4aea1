"""Qwen2/Llama-style decoder (pre-norm, GQA self-attention with or without q/k/v biases, SwiGLU), shared by
Qwen2-VL, LLaVA-OneVision and IDEFICS; the rotary embedding is chosen by the family."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import cancellation
from ..checkpoint import rope_config
from .attention import CacheSpec, Rows, SelfAttention
from .fused_decode import decode_step
from .mlp import GatedMLP
from .norms import RMSNorm


@dataclass
class DecoderConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: dict[str, Any]
    tie_word_embeddings: bool
    hidden_act: str = "silu"
    qkv_bias: bool = True  # Qwen2's q/k/v projections have biases, Llama's none

    @classmethod
    def from_dict(cls, text: dict[str, Any]) -> "DecoderConfig":
        """Read the text fields of a (flat or nested) config."""
        heads = text["num_attention_heads"]
        return cls(
            vocab_size=text["vocab_size"],
            hidden_size=text["hidden_size"],
            intermediate_size=text["intermediate_size"],
            num_layers=text["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=text.get("num_key_value_heads") or heads,
            head_dim=text.get("head_dim") or text["hidden_size"] // heads,
            rms_norm_eps=text.get("rms_norm_eps", 1e-6),
            rope=rope_config(text),
            tie_word_embeddings=bool(text.get("tie_word_embeddings", False)),
            hidden_act=text.get("hidden_act", "silu"),
        )


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer: int):
        super().__init__()
        self.self_attn = SelfAttention(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, layer,
                                       qkv_bias=cfg.qkv_bias)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, rows):
        fused = decode_step(self, x, cos, sin, rows)  # one compiled call where the kernels apply
        if fused is not None:
            return fused
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, rows)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Token embedding, decoder layers and final norm; `forward` runs embeddings through the stack."""

    def __init__(self, cfg: DecoderConfig, rotary: nn.Module):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = rotary

    def cache_spec(self) -> CacheSpec:
        w = self.embed_tokens.weight
        return CacheSpec(self.cfg.num_layers, self.cfg.num_kv_heads, self.cfg.head_dim, w.dtype, w.device)

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, rows: Rows) -> torch.Tensor:
        """embeds (N, D) and positions (P, N) of a step's rows (`rows` says whose) -> hidden states (N, D)."""
        cos, sin = self.rotary(positions[:, None], embeds.dtype)
        x = embeds[None]
        for layer in self.layers:
            cancellation.check()  # the engine stops a step whose every request was cancelled
            x = layer(x, cos, sin, rows)
        rows.commit()
        return self.norm(x)[0]

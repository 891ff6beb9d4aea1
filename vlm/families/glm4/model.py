"""GLM-4 decoder (GLM-4-9B-0414, also the language model of GLM-4.1V).

It differs from the Qwen2 decoder in three places: the rotary embedding covers only the first
`partial_rotary_factor` of each head and rotates adjacent pairs (interleaved, not half-split); every
layer has extra RMSNorms after attention and after the MLP (sandwich norm); gate and up projections
are one fused `gate_up_proj`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...layers.attention import KVCache, SelfAttention
from ...layers.decoder import Decoder, DecoderConfig
from ...layers.mlp import activation
from ...layers.norms import RMSNorm
from ...layers.rotary import Rotary

# Checkpoint prefix -> module prefix (first match wins): the hub's names are the modules'; Glm4Model's (no
# head, no `model.` prefix) get the prefix, as transformers reads them.
WEIGHT_NAMES = [("model.", "model."), ("lm_head.", "lm_head."), ("", "model.")]
TIED = {"lm_head.weight": "model.embed_tokens.weight"}


def rotary_dim(cfg: DecoderConfig, default_factor: float = 0.5) -> int:
    """Number of rotated dimensions per head: head_dim * partial_rotary_factor (GLM-4's default: half)."""
    return int(cfg.head_dim * cfg.rope.get("partial_rotary_factor", default_factor))


class InterleavedRotary(nn.Module):
    """cos/sin (B, L, rotary_dim) with each angle repeated for an adjacent pair of dimensions.

    `angles` supplies the rotary angles (B, L, rotary_dim / 2): a 1-D `Rotary` for GLM-4, an
    M-RoPE `MRotary` for GLM-4.1V.
    """

    def __init__(self, angles: Rotary):
        super().__init__()
        self.angles = angles

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        angles = self.angles.angles(positions).repeat_interleave(2, dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)."""
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def apply_partial_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dims of x (B, H, L, D) in interleaved pairs; the rest pass through."""
    dim = cos.shape[-1]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rot, rest = x[..., :dim], x[..., dim:]
    return torch.cat((rot * cos + rotate_pairs(rot) * sin, rest), dim=-1)


class GlmAttention(SelfAttention):
    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return apply_partial_rotary(x, cos, sin)


class GlmMLP(nn.Module):
    """down(act(gate) * up) with gate and up in one `gate_up_proj` matrix."""

    def __init__(self, dim: int, hidden: int, act: str = "silu"):
        super().__init__()
        self.gate_up_proj = nn.Linear(dim, 2 * hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * self.act(gate))


class GlmDecoderLayer(nn.Module):
    """Pre-norm residual blocks whose outputs are normalised again before the residual add."""

    def __init__(self, cfg: DecoderConfig, layer: int, attention_bias: bool = True):
        super().__init__()
        self.self_attn = GlmAttention(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, layer,
                                      qkv_bias=attention_bias)
        self.mlp = GlmMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_self_attn_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_mlp_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, cache, mask):
        x = x + self.post_self_attn_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, cache, mask))
        return x + self.post_mlp_layernorm(self.mlp(self.post_attention_layernorm(x)))


class GlmDecoder(Decoder):
    """The shared decoder stack (embedding, layers, final norm, KV cache) with GLM layers."""

    def __init__(self, cfg: DecoderConfig, rotary: nn.Module, attention_bias: bool = True):
        super().__init__(cfg, rotary)
        self.layers = nn.ModuleList(GlmDecoderLayer(cfg, i, attention_bias) for i in range(cfg.num_layers))


class Glm4(nn.Module):
    """GLM-4 causal LM; module names are the hub's (`model.*`, `lm_head`)."""
    language_modules = ("model.", "lm_head")  # what quantization applies to

    def __init__(self, cfg: DecoderConfig, attention_bias: bool = True):
        super().__init__()
        rotary = InterleavedRotary(Rotary(rotary_dim(cfg), cfg.rope["rope_theta"]))
        self.model = GlmDecoder(cfg, rotary, attention_bias)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def embed(self, inputs: dict[str, Any]) -> torch.Tensor:
        return self.model.embed_tokens(inputs["input_ids"])

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(ids)

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        return self.model.new_cache(batch, capacity)

    def forward(self, embeds, positions, cache, valid) -> torch.Tensor:
        return self.model(embeds, positions, cache, valid)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

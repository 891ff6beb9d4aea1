"""IDEFICS: a Llama decoder that reads images through gated cross-attention (Flamingo-style).

Each image goes through the CLIP tower and, with `use_resampler`, the perceiver resampler; its hidden
states are keys and values for a gated cross-attention block placed before every `cross_layer_interval`-th
decoder layer. A text token attends to the most recent image before it only (`image_attention_mask`); the
attention output of a token that sees no image is zeroed, and both halves of the block (attention and
MLP) are scaled by tanh of a learned gate. The image tokens are not in the sequence: `<image>` and
`<fake_token_around_image>` are ordinary tokens whose embeddings (and output rows) live in the extra
`additional_embedding` / `lm_head.additional_fc` tables after the Llama vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from ...checkpoint import prefix_renamer, rope_config
from ...errors import CheckpointError, InputError
from ...layers.attention import Rows, attention
from ...layers.decoder import Decoder, DecoderConfig
from ...layers.linear import PackedLinear, packable
from ...layers.mlp import GatedMLP
from ...layers.norms import RMSNorm
from ...layers.rotary import Rotary
from ...model import ChatModel, Embedded
from .perceiver import PerceiverConfig, PerceiverResampler
from ...layers.vit import ViTConfig
from .vision import ClipVision, vision_config

# Module names are the hub's, except the base rows of the decoupled head (a plain linear inside it).
WEIGHT_NAMES = [("lm_head.weight", "lm_head.base.weight")]
rename = prefix_renamer(WEIGHT_NAMES)
TIED = {"lm_head.base.weight": "model.embed_tokens.weight",
        "lm_head.additional_fc.weight": "model.embed_tokens.additional_embedding.weight"}

# IdeficsConfig's defaults for the text fields.
DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000, "additional_vocab_size": 0, "hidden_size": 4096, "intermediate_size": 11008,
    "num_hidden_layers": 32, "num_attention_heads": 32, "hidden_act": "silu", "rms_norm_eps": 1e-6,
    "max_position_embeddings": 2048, "cross_layer_interval": 1, "qk_layer_norms": False, "alpha_type": "float",
    "use_resampler": False, "tie_word_embeddings": False,
}


@dataclass
class IdeficsConfig:
    text: DecoderConfig
    vision: ViTConfig
    perceiver: PerceiverConfig | None  # None: the cross-attention reads the ViT's tokens directly
    additional_vocab_size: int
    cross_layer_interval: int
    qk_layer_norms: bool
    alpha_type: str  # "float": one gate value per block half, "vector": one per channel
    max_context: int

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "IdeficsConfig":
        """Read config.json (hub or transformers 5 layout: text fields at the top, nested vision/perceiver)."""
        c = {**DEFAULTS, **config}
        heads = c["num_attention_heads"]
        rope = rope_config(c)
        if rope.get("rope_type", "default") != "default":
            raise CheckpointError(f"Rotary scaling {rope['rope_type']!r} is not supported for IDEFICS.")
        text = DecoderConfig(
            vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
            num_layers=c["num_hidden_layers"], num_heads=heads, num_kv_heads=heads,
            head_dim=c["hidden_size"] // heads, rms_norm_eps=c["rms_norm_eps"], rope=rope,
            tie_word_embeddings=bool(c["tie_word_embeddings"]), hidden_act=c["hidden_act"], qkv_bias=False)
        interval = c["cross_layer_interval"]
        if interval < 1 or text.num_layers % interval:
            raise CheckpointError(f"cross_layer_interval={interval} must divide num_hidden_layers={text.num_layers} "
                                  "(the reference builds num_hidden_layers // interval cross-attention blocks).")
        if c["alpha_type"] not in ("float", "vector"):
            raise CheckpointError(f"alpha_type={c['alpha_type']!r}; expected 'float' or 'vector'.")
        return cls(text=text, vision=vision_config(c.get("vision_config")),
                   perceiver=PerceiverConfig.from_dict(c.get("perceiver_config")) if c["use_resampler"] else None,
                   additional_vocab_size=c["additional_vocab_size"], cross_layer_interval=interval,
                   qk_layer_norms=bool(c["qk_layer_norms"]), alpha_type=c["alpha_type"],
                   max_context=c["max_position_embeddings"])


# ---------------------------------------------------------------------------------------------- vocabulary


class DecoupledEmbedding(nn.Module):
    """The Llama table (`weight`) and, for ids past it, the `additional_embedding` table."""

    def __init__(self, vocab: int, additional: int, dim: int):
        super().__init__()
        self.vocab = vocab
        self.weight = nn.Parameter(torch.empty(vocab, dim))
        self.additional_embedding = nn.Embedding(additional, dim) if additional else None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        total = self.vocab + (self.additional_embedding.num_embeddings if self.additional_embedding else 0)
        if ids.numel() and (int(ids.max()) >= total or int(ids.min()) < 0):
            raise InputError(f"Token id {int(ids.max())} is outside this model's {total} embeddings.")
        extra = ids >= self.vocab
        out = F.embedding(ids.masked_fill(extra, 0), self.weight)
        if self.additional_embedding is not None and bool(extra.any()):
            out[extra] = self.additional_embedding(ids[extra] - self.vocab)
        return out


class DecoupledLinear(nn.Module):
    """Logits of the Llama vocabulary (`base`) followed by those of the additional tokens (`additional_fc`)."""

    def __init__(self, dim: int, vocab: int, additional: int):
        super().__init__()
        self.base = nn.Linear(dim, vocab, bias=False)
        self.additional_fc = nn.Linear(dim, additional, bias=False) if additional else None
        self.fused: PackedLinear | None = None

    def fuse_projections(self) -> None:
        """Both tables as one packed matmul (see `pack_linears`) when the weights allow it."""
        if self.additional_fc is not None and packable(self.base, self.additional_fc):
            self.fused = PackedLinear(self.base, self.additional_fc, outputs=(2,))
            del self.base, self.additional_fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            return self.fused(x)
        if self.additional_fc is None:
            return self.base(x)
        return torch.cat([self.base(x), self.additional_fc(x)], dim=-1)


# ---------------------------------------------------------------------------------------------- images


@dataclass
class ImageContext:
    """What the cross-attention blocks read at every step of one request (`Embedded.extras["images"]`).

    `states` (images * per_image, Dv) are the hidden states of the request's images; `mask` (L, images) says
    which image each prompt token attends to (at most one); tokens after the prompt attend as its last
    token does. `kv` keeps each block's projected keys and values, computed at the first step.
    """

    states: torch.Tensor
    mask: torch.Tensor
    per_image: int
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def keys_seen(self, start: int, count: int) -> torch.Tensor:
        """(count, images * per_image): the keys each of `count` tokens from prompt position `start` sees."""
        cols = torch.arange(start, start + count, device=self.mask.device).clamp(max=self.mask.shape[0] - 1)
        return self.mask[cols].repeat_interleave(self.per_image, dim=-1)


class CrossAttention(nn.Module):
    """Text queries, image keys and values (of the vision width), optional RMSNorm on q and k; no rotary."""

    def __init__(self, dim: int, vision_dim: int, heads: int, qk_layer_norms: bool, eps: float):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(vision_dim, dim, bias=False)
        self.v_proj = nn.Linear(vision_dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        if qk_layer_norms:
            self.q_layer_norm = RMSNorm(self.head_dim, eps)
            self.k_layer_norm = RMSNorm(self.head_dim, eps)
        self.qk_layer_norms = qk_layer_norms

    def keys_values(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image states (T, Dv) -> keys, values (1, H, T, head_dim)."""
        k = self.k_proj(states).view(1, -1, self.heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(states).view(1, -1, self.heads, self.head_dim).transpose(1, 2)
        return (self.k_layer_norm(k) if self.qk_layer_norms else k), v

    def forward(self, x: torch.Tensor, views: list[tuple[int, int, ImageContext, torch.Tensor]],
                block: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x (1, N, D): every request's rows; `views` are (begin, end, context, keys seen) of the requests
        with images. -> (output (1, N, D), gate (1, N, 1): the rows that see an image)."""
        n = x.shape[1]
        q = self.q_proj(x).view(1, n, self.heads, self.head_dim).transpose(1, 2)
        if self.qk_layer_norms:
            q = self.q_layer_norm(q)
        out = torch.zeros_like(q)
        gate = torch.zeros(1, n, 1, dtype=torch.bool, device=x.device)
        for begin, end, context, seen in views:
            if block not in context.kv:
                context.kv[block] = self.keys_values(context.states)
            sees = seen.any(-1)  # a token that sees nothing attends anywhere; its output is zeroed
            mask = (seen | ~sees[:, None])[None, None]
            out[:, :, begin:end] = attention(q[:, :, begin:end], *context.kv[block], mask)
            gate[0, begin:end, 0] = sees
        return self.o_proj(out.transpose(1, 2).reshape(1, n, -1)), gate


class GatedCrossAttentionLayer(nn.Module):
    """x + tanh(alpha_cross_attn) * attention (zero where no image is seen), then x + tanh(alpha_dense) * MLP."""

    def __init__(self, cfg: IdeficsConfig):
        super().__init__()
        text = cfg.text
        self.cross_attn = CrossAttention(text.hidden_size, cfg.vision.hidden_size, text.num_heads, cfg.qk_layer_norms,
                                         text.rms_norm_eps)
        self.mlp = GatedMLP(text.hidden_size, text.intermediate_size, text.hidden_act)
        self.input_layernorm = RMSNorm(text.hidden_size, text.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(text.hidden_size, text.rms_norm_eps)
        shape = (1,) if cfg.alpha_type == "float" else (1, 1, text.hidden_size)
        self.alpha_cross_attn = nn.Parameter(torch.empty(shape))
        self.alpha_dense = nn.Parameter(torch.empty(shape))

    def forward(self, x: torch.Tensor, views: list[tuple[int, int, ImageContext, torch.Tensor]],
                block: int) -> torch.Tensor:
        if views:
            attended, gate = self.cross_attn(self.input_layernorm(x), views, block)
            x = x + torch.tanh(self.alpha_cross_attn) * attended.masked_fill(~gate, 0.0)
        return x + torch.tanh(self.alpha_dense) * self.mlp(self.post_attention_layernorm(x))


# ---------------------------------------------------------------------------------------------- model


class IdeficsDecoder(Decoder):
    """Hub prefix `model.`: embeddings, vision tower, resampler, decoder layers and gated cross-attention."""

    def __init__(self, cfg: IdeficsConfig):
        text = cfg.text
        super().__init__(text, Rotary(text.head_dim, text.rope["rope_theta"]))
        self.embed_tokens = DecoupledEmbedding(text.vocab_size, cfg.additional_vocab_size, text.hidden_size)
        self.vision_model = ClipVision(cfg.vision)
        self.perceiver_resampler = PerceiverResampler(cfg.vision.hidden_size, cfg.perceiver) if cfg.perceiver else None
        self.gated_cross_attn_layers = nn.ModuleList(GatedCrossAttentionLayer(cfg)
                                                     for _ in range(text.num_layers // cfg.cross_layer_interval))
        self.interval = cfg.cross_layer_interval

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (N, C, S, S) -> the states the cross-attention reads (N, per image, Dv)."""
        states = self.vision_model(pixels)
        return states if self.perceiver_resampler is None else self.perceiver_resampler(states)

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, rows: Rows) -> torch.Tensor:
        """embeds (N, D) and positions (1, N) of a step's rows (`rows` says whose) -> hidden states (N, D)."""
        cos, sin = self.rotary(positions[:, None], embeds.dtype)
        extras = rows.extras or [{}] * len(rows.caches)
        views = [(begin, end, e["images"], e["images"].keys_seen(cache.length, end - begin))
                 for cache, begin, end, e in zip(rows.caches, rows.offsets, rows.offsets[1:], extras) if "images" in e]
        x = embeds[None]
        for i, layer in enumerate(self.layers):
            if i % self.interval == 0:
                x = self.gated_cross_attn_layers[i // self.interval](x, views, i // self.interval)
            x = layer(x, cos, sin, rows)
        rows.commit()
        return self.norm(x)[0]


class Idefics(ChatModel):
    """IdeficsForVisionText2Text; module names are the hub's (`model.*`, `lm_head.*`, see WEIGHT_NAMES)."""

    language_modules = ("model.layers.", "model.gated_cross_attn_layers.", "lm_head")  # what quantization applies to

    def __init__(self, cfg: IdeficsConfig):
        super().__init__()
        self.cfg = cfg
        self.model = IdeficsDecoder(cfg)
        self.lm_head = DecoupledLinear(cfg.text.hidden_size, cfg.text.vocab_size, cfg.additional_vocab_size)

    def embed(self, inputs: Mapping[str, Any]) -> Embedded:
        """Token embeddings, and with images their states for the cross-attention (`extras["images"]`).

        An image's content id marks its first attending token (its `<image>` token): every token whose keys
        and values depend on the image comes after it, so a cached prefix is reused up to there only.

        `pixel_values` (1, images, C, S, S) and `image_attention_mask` (1, L, images) as the processor builds
        them; each image is encoded once (and not again in a later turn), only if some token sees it.
        """
        embedded = super().embed(inputs)
        if "pixel_values" not in inputs:
            return embedded
        pixels, mask = inputs["pixel_values"][0], inputs["image_attention_mask"][0].to(embedded.content.device).bool()
        if mask.shape != (embedded.content.shape[0], pixels.shape[0]) or bool((mask.sum(-1) > 1).any()):
            raise InputError(f"image_attention_mask {tuple(mask.shape)} does not match the prompt and pixel_values "
                             f"{tuple(pixels.shape)} (one image per token at most).")
        used = mask.any(0).nonzero()[:, 0].tolist()  # images some token sees
        items = [self.features.encode(self.model.encode_images, pixels[i:i + 1]) for i in used]
        mask = mask[:, used]
        embedded.content[mask.long().argmax(0)] = torch.tensor([content for _, content in items], device=mask.device)
        states = torch.cat([features[0] for features, _ in items])
        embedded.extras["images"] = ImageContext(states, mask, states.shape[0] // len(items))
        return embedded

    def encoder_modules(self) -> list[nn.Module]:
        """The vision tower and resampler: under the decoder's hub prefix (`model.`), but run by `embed` only."""
        towers = [self.model.vision_model, self.model.perceiver_resampler]
        return [module for tower in towers if tower is not None for module in tower.modules()]

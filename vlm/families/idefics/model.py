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
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ...caching import FeatureCache, content_key as hash_contents
from ...checkpoint import prefix_renamer, rope_config
from ...errors import CheckpointError, InputError
from ...layers.attention import KVCache, masked_attention
from ...layers.decoder import Decoder, DecoderConfig
from ...layers.linear import PackedLinear, packable
from ...layers.mlp import GatedMLP
from ...layers.norms import RMSNorm
from ...layers.rotary import Rotary
from .perceiver import PerceiverConfig, PerceiverResampler
from .vision import ClipVision, VisionConfig

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
    vision: VisionConfig
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
        return cls(text=text, vision=VisionConfig.from_dict(c.get("vision_config")),
                   perceiver=PerceiverConfig.from_dict(c.get("perceiver_config")) if c["use_resampler"] else None,
                   additional_vocab_size=c["additional_vocab_size"], cross_layer_interval=interval,
                   qk_layer_norms=bool(c["qk_layer_norms"]), alpha_type=c["alpha_type"],
                   max_context=c["max_position_embeddings"])

    @property
    def image_tokens(self) -> int:
        """Key/value vectors per image in the cross-attention."""
        return self.perceiver.latents if self.perceiver else self.vision.tokens


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
    """What the cross-attention blocks read, for every step of one batch of requests.

    `states` (B, images * per_image, Dv) are the images' hidden states (a row's missing images are zeros,
    never attended); `mask` (B, L, images) says which image each prompt token attends to (at most one);
    tokens after the prompt attend as its last token does. `kv` keeps each block's projected keys and values.
    """

    states: torch.Tensor
    mask: torch.Tensor
    per_image: int
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def rows(self, start: int, count: int) -> torch.Tensor:
        """mask of the `count` tokens from column `start` on (later columns repeat the last one): (B, count, images)."""
        cols = torch.arange(start, start + count, device=self.mask.device).clamp(max=self.mask.shape[1] - 1)
        return self.mask[:, cols]


class IdeficsCache(KVCache):
    """The decoder's KV cache, plus the image context of the requests it holds."""

    context: ImageContext | None = None


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
        """Image states (B, T, Dv) -> keys, values (B, H, T, head_dim): computed once per request."""
        b, t, _ = states.shape
        k = self.k_proj(states).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(states).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        return (self.k_layer_norm(k) if self.qk_layer_norms else k), v

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, L, D), mask (B, 1, L, T) -> (B, L, D)."""
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        if self.qk_layer_norms:
            q = self.q_layer_norm(q)
        return self.o_proj(masked_attention(q, k, v, mask).transpose(1, 2).reshape(b, n, -1))


class GatedCrossAttentionLayer(nn.Module):
    """x + tanh(alpha_cross_attn) * attention (zero where no image is seen), then x + tanh(alpha_dense) * MLP."""

    def __init__(self, cfg: IdeficsConfig):
        super().__init__()
        text = cfg.text
        self.cross_attn = CrossAttention(text.hidden_size, cfg.vision.embed_dim, text.num_heads, cfg.qk_layer_norms,
                                         text.rms_norm_eps)
        self.mlp = GatedMLP(text.hidden_size, text.intermediate_size, text.hidden_act)
        self.input_layernorm = RMSNorm(text.hidden_size, text.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(text.hidden_size, text.rms_norm_eps)
        shape = (1,) if cfg.alpha_type == "float" else (1, 1, text.hidden_size)
        self.alpha_cross_attn = nn.Parameter(torch.empty(shape))
        self.alpha_dense = nn.Parameter(torch.empty(shape))

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor] | None,
                mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, L, D); kv from `CrossAttention.keys_values`; mask (B, L, T) of the keys each token sees."""
        if kv is not None:
            gate = mask.any(-1, keepdim=True)  # (B, L, 1): tokens that see an image
            seen = (mask | ~gate)[:, None]  # a token that sees nothing attends anywhere; its output is zeroed
            attended = self.cross_attn(self.input_layernorm(x), *kv, seen).masked_fill(~gate, 0.0)
            x = x + torch.tanh(self.alpha_cross_attn) * attended
        return x + torch.tanh(self.alpha_dense) * self.mlp(self.post_attention_layernorm(x))


# ---------------------------------------------------------------------------------------------- model


class IdeficsDecoder(Decoder):
    """Hub prefix `model.`: embeddings, vision tower, resampler, decoder layers and gated cross-attention."""

    def __init__(self, cfg: IdeficsConfig):
        text = cfg.text
        super().__init__(text, Rotary(text.head_dim, text.rope["rope_theta"]))
        self.embed_tokens = DecoupledEmbedding(text.vocab_size, cfg.additional_vocab_size, text.hidden_size)
        self.vision_model = ClipVision(cfg.vision)
        self.perceiver_resampler = PerceiverResampler(cfg.vision.embed_dim, cfg.perceiver) if cfg.perceiver else None
        self.gated_cross_attn_layers = nn.ModuleList(GatedCrossAttentionLayer(cfg)
                                                     for _ in range(text.num_layers // cfg.cross_layer_interval))
        self.interval = cfg.cross_layer_interval

    def new_cache(self, batch: int, capacity: int) -> IdeficsCache:
        w = self.embed_tokens.weight
        return IdeficsCache(self.cfg.num_layers, batch, self.cfg.num_kv_heads, self.cfg.head_dim, capacity, w.dtype,
                            w.device)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (N, C, S, S) -> the states the cross-attention reads (N, per image, Dv)."""
        states = self.vision_model(pixels)
        return states if self.perceiver_resampler is None else self.perceiver_resampler(states)

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, cache: IdeficsCache,
                valid: torch.Tensor) -> torch.Tensor:
        """embeds (B, L, D), positions (1, B, L), valid (B, L) -> hidden states (B, L, D)."""
        context, start = cache.context, cache.length
        mask = cache.begin(valid)
        cos, sin = self.rotary(positions, embeds.dtype)
        image_mask = None
        if context is not None:  # which keys each token sees: every vector of its image
            image_mask = context.rows(start, embeds.shape[1]).repeat_interleave(context.per_image, dim=-1)
        x = embeds
        for i, layer in enumerate(self.layers):
            if i % self.interval == 0:
                block = i // self.interval
                kv = None
                if context is not None:
                    if block not in context.kv:
                        context.kv[block] = self.gated_cross_attn_layers[block].cross_attn.keys_values(context.states)
                    kv = context.kv[block]
                x = self.gated_cross_attn_layers[block](x, kv, image_mask)
            x = layer(x, cos, sin, cache, mask)
        cache.commit(embeds.shape[1])
        return self.norm(x)


class Idefics(nn.Module):
    """IdeficsForVisionText2Text; module names are the hub's (`model.*`, `lm_head.*`, see WEIGHT_NAMES)."""

    language_modules = ("model.layers.", "model.gated_cross_attn_layers.", "lm_head")  # what quantization applies to

    def __init__(self, cfg: IdeficsConfig):
        super().__init__()
        self.cfg = cfg
        self.model = IdeficsDecoder(cfg)
        self.lm_head = DecoupledLinear(cfg.text.hidden_size, cfg.text.vocab_size, cfg.additional_vocab_size)
        self.features = FeatureCache()

    def image_context(self, inputs: dict[str, Any]) -> ImageContext | None:
        """The images' states and which tokens see them; None for a text-only batch.

        `pixel_values` (B, images, C, S, S) hold each row's images, zero-padded; `image_attention_mask`
        (B, L, images) marks the image each token attends to. Only the images some token sees are encoded.
        """
        if "pixel_values" not in inputs:
            return None
        pixels = inputs["pixel_values"]
        mask = inputs["image_attention_mask"].to(pixels.device).bool()
        batch, images = pixels.shape[:2]
        if mask.shape[0] != batch or mask.shape[2] != images or bool((mask.sum(-1) > 1).any()):
            raise InputError(f"image_attention_mask {tuple(mask.shape)} does not match pixel_values "
                             f"{tuple(pixels.shape)} (one image per token at most).")
        used = mask.any(1)  # (B, images)
        encoded = self.features(self.model.encode_images, pixels[used])
        states = encoded.new_zeros(batch, images, *encoded.shape[1:])
        states[used] = encoded
        return ImageContext(states.flatten(1, 2), mask, encoded.shape[1])

    def visual_tokens(self, inputs: dict[str, Any]) -> int:
        """Image vectors the cross-attention reads for these inputs (images x latents or ViT tokens)."""
        return int(inputs["image_attention_mask"].any(1).sum()) * self.cfg.image_tokens

    def embed(self, inputs: dict[str, Any]) -> torch.Tensor:
        return self.model.embed_tokens(inputs["input_ids"])

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(ids)

    def new_cache(self, batch: int, capacity: int) -> IdeficsCache:
        return self.model.new_cache(batch, capacity)

    def content_key(self, inputs: dict[str, Any]) -> str | None:
        """The images a request's KV cache depends on (they are not in its input embeddings)."""
        return hash_contents(inputs["pixel_values"]) if "pixel_values" in inputs else None

    def bind(self, cache: IdeficsCache, inputs: dict[str, Any]) -> None:
        """Give `cache` the image context of `inputs`, read at every step of their generation."""
        cache.context = self.image_context(inputs)

    def forward(self, embeds, positions, cache, valid) -> torch.Tensor:
        return self.model(embeds, positions, cache, valid)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

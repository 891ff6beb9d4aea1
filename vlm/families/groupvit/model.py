"""GroupViT (Xu et al., 2022): a CLIP text tower and a vision tower that groups patches into segments.

The vision tower runs stages of transformer layers over [image tokens; group tokens]; a grouping block
ends a stage by assigning every token to one group (hard assignment at inference) and the groups become
the next stage's tokens. Chaining the stages' soft assignments maps every patch to a final group, and a
group's embedding compared with a label's text embedding gives per-pixel segmentation logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ...checkpoint import prefix_renamer, sub_config
from ...errors import CheckpointError
from ...layers.linear import mm
from ...layers.mlp import MLP, activation

# Checkpoint (hub) prefix -> module prefix; every other tensor keeps its hub name.
HUB_NAMES: list[tuple[str, str]] = [
    ("text_model.encoder.layers.", "text_model.layers."),
    ("vision_model.encoder.stages.", "vision_model.stages."),
]
# What a checkpoint may carry (first match wins): the hub's names, also under GroupViTModel's base-model
# prefix `groupvit.`, which transformers strips.
WEIGHT_NAMES = [*HUB_NAMES, *((f"groupvit.{hub}", module) for hub, module in HUB_NAMES), ("groupvit.", "")]
# Checkpoint tensors inference never reads: BatchNorm's step counter, and the text position ids that
# checkpoints written by transformers 4.2x (the hub's) store.
UNUSED_SUFFIXES = (".num_batches_tracked", "text_model.embeddings.position_ids")


# ---------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_positions: int
    hidden_act: str
    eps: float
    eos_token_id: int


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int
    intermediate_size: int
    depths: tuple[int, ...]
    num_group_tokens: tuple[int, ...]
    num_output_groups: tuple[int, ...]
    num_heads: int
    image_size: tuple[int, int]
    patch_size: tuple[int, int]
    num_channels: int
    hidden_act: str
    eps: float
    assign_eps: float
    assign_mlp_ratio: tuple[float, float]

    @property
    def grid(self) -> tuple[int, int]:
        """Patches per column and per row."""
        return self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1]


@dataclass(frozen=True)
class GroupViTConfig:
    text: TextConfig
    vision: VisionConfig
    projection_dim: int
    projection_intermediate_dim: int

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "GroupViTConfig":
        """Read config.json (nested `text_config` / `vision_config`, transformers defaults where absent)."""
        try:
            cfg = cls(_text_config(_nested(config, "text_config")), _vision_config(_nested(config, "vision_config")),
                      int(config.get("projection_dim", 256)), int(config.get("projection_intermediate_dim", 4096)))
            activation(cfg.text.hidden_act), activation(cfg.vision.hidden_act)  # unknown names fail here
            return cfg
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"config.json does not describe a GroupViT model: {exc}") from exc


def _nested(config: dict[str, Any], key: str) -> dict[str, Any]:
    """A sub-config; configs written by transformers 4.2x may hold it as `<key>_dict` instead."""
    return sub_config(config, key if isinstance(config.get(key), dict) else f"{key}_dict")


def _pair(value: Any) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (list, tuple)) else (int(value), int(value))


def _text_config(t: dict[str, Any]) -> TextConfig:
    return TextConfig(
        vocab_size=int(t.get("vocab_size", 49408)), hidden_size=int(t.get("hidden_size", 256)),
        intermediate_size=int(t.get("intermediate_size", 1024)), num_layers=int(t.get("num_hidden_layers", 12)),
        num_heads=int(t.get("num_attention_heads", 4)), max_positions=int(t.get("max_position_embeddings", 77)),
        hidden_act=t.get("hidden_act", "quick_gelu"), eps=float(t.get("layer_norm_eps", 1e-5)),
        eos_token_id=int(t.get("eos_token_id", 49407)),
    )


def _vision_config(v: dict[str, Any]) -> VisionConfig:
    ratio = v.get("assign_mlp_ratio", (0.5, 4))
    cfg = VisionConfig(
        hidden_size=int(v.get("hidden_size", 384)), intermediate_size=int(v.get("intermediate_size", 1536)),
        depths=tuple(v.get("depths", (6, 3, 3))), num_group_tokens=tuple(v.get("num_group_tokens", (64, 8, 0))),
        num_output_groups=tuple(v.get("num_output_groups", (64, 8, 8))),
        num_heads=int(v.get("num_attention_heads", 6)), image_size=_pair(v.get("image_size", 224)),
        patch_size=_pair(v.get("patch_size", 16)), num_channels=int(v.get("num_channels", 3)),
        hidden_act=v.get("hidden_act", "gelu"), eps=float(v.get("layer_norm_eps", 1e-5)),
        assign_eps=float(v.get("assign_eps", 1.0)),
        assign_mlp_ratio=tuple(ratio) if isinstance(ratio, (list, tuple)) else (ratio, ratio),
    )
    if not len(cfg.depths) == len(cfg.num_group_tokens) == len(cfg.num_output_groups):
        raise ValueError("depths, num_group_tokens and num_output_groups must have one entry per stage")
    if not any(cfg.num_group_tokens):
        raise ValueError("at least one stage must have group tokens")
    for i in range(1, len(cfg.depths)):  # a stage's group projector reads the previous stage's group tokens
        if cfg.num_group_tokens[i] and cfg.num_output_groups[i - 1] != cfg.num_group_tokens[i - 1]:
            raise ValueError(f"stage {i - 1} must output as many groups as it has group tokens")
    return cfg


# ---------------------------------------------------------------------------------------------- shared blocks


class Attention(nn.Module):
    """Multi-head attention; keys and values come from `context` when given (cross-attention)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        context = x if context is None else context
        b, n, d = x.shape
        q = self.q_proj(x).view(b, n, self.heads, -1).transpose(1, 2)
        k = self.k_proj(context).view(b, context.shape[1], self.heads, -1).transpose(1, 2)
        v = self.v_proj(context).view(b, context.shape[1], self.heads, -1).transpose(1, 2)
        # Written out in the reference's order (scaled queries) rather than fused: hard grouping
        # decisions downstream amplify rounding differences.
        scores = mm(q * q.shape[-1] ** -0.5, k.transpose(-1, -2))  # (B, H, N, M)
        if causal:
            scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
        out = mm(scores.softmax(-1), v)  # (B, H, N, D/H)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class EncoderLayer(nn.Module):
    """Pre-norm transformer layer (CLIP)."""

    def __init__(self, dim: int, heads: int, hidden: int, act: str, eps: float):
        super().__init__()
        self.self_attn = Attention(dim, heads)
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, hidden, act)
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), causal=causal)
        return x + self.mlp(self.layer_norm2(x))


class MixerMLP(MLP):
    """An MLP across tokens instead of channels: maps N tokens to M tokens."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class BatchNorm(nn.Module):
    """BatchNorm1d at inference (fixed running statistics) over the last dimension of any shape."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        flat = F.batch_norm(flat, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return flat.reshape(x.shape)


def projection_head(dim: int, hidden: int, out: int) -> nn.Sequential:
    """Linear -> BatchNorm -> ReLU -> Linear into the shared image-text space (hub names 0, 1, 3)."""
    return nn.Sequential(nn.Linear(dim, hidden), BatchNorm(hidden), nn.ReLU(), nn.Linear(hidden, out))


# ---------------------------------------------------------------------------------------------- text tower


class TextEmbeddings(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.hidden_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.token_embedding(ids) + self.position_embedding(positions)


class TextTransformer(nn.Module):
    """Causal transformer; a text is represented by its end-of-text token's state."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.eos_token_id = cfg.eos_token_id
        self.embeddings = TextEmbeddings(cfg)
        self.layers = nn.ModuleList(
            EncoderLayer(cfg.hidden_size, cfg.num_heads, cfg.intermediate_size, cfg.hidden_act, cfg.eps)
            for _ in range(cfg.num_layers)
        )
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.eps)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(N, S) token ids, each with an end-of-text token -> (N, C)."""
        x = self.embeddings(ids)
        for layer in self.layers:
            x = layer(x, causal=True)
        x = self.final_layer_norm(x)
        # Configs written before transformers#24773 say eos_token_id=2 and mean "the highest id" (CLIP's EOS).
        eos = ids.argmax(-1) if self.eos_token_id == 2 else (ids == self.eos_token_id).int().argmax(-1)
        return x[torch.arange(len(ids), device=ids.device), eos]


# ---------------------------------------------------------------------------------------------- vision tower


class PatchEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.projection = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.projection(pixels).flatten(2).transpose(1, 2)  # (B, N, C)


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_embeddings = PatchEmbeddings(cfg)
        self.position_embeddings = nn.Parameter(torch.zeros(1, cfg.grid[0] * cfg.grid[1], cfg.hidden_size))
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.layernorm(self.patch_embeddings(pixels)) + self.position_embeddings


class CrossAttentionLayer(nn.Module):
    """Groups attend to image tokens (post-norm)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.attn = Attention(cfg.hidden_size, cfg.num_heads)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)
        self.norm_post = nn.LayerNorm(cfg.hidden_size, eps=cfg.eps)

    def forward(self, groups: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        x = groups + self.attn(groups, context=tokens)
        return self.norm_post(x + self.mlp(self.norm2(x)))


class AssignAttention(nn.Module):
    """Single-head attention where each token goes to exactly one group: the argmax of its attention
    over groups (training adds gumbel noise to that choice; inference does not)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        dim = cfg.hidden_size
        self.scale = dim ** -0.5
        self.eps = cfg.assign_eps
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, groups: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> new group embeddings (B, G, C) and the soft assignment (B, G, N), a distribution over groups."""
        logits = mm(self.q_proj(groups), self.k_proj(tokens).transpose(1, 2)) * self.scale  # (B, G, N)
        soft = logits.softmax(dim=1)
        hard = F.one_hot(soft.argmax(dim=1), groups.shape[1]).transpose(1, 2).to(soft.dtype)
        hard = hard / (hard.sum(dim=-1, keepdim=True) + self.eps)  # mean of each group's tokens
        return self.proj(mm(hard, self.v_proj(tokens))), soft


class GroupingBlock(nn.Module):
    """Merges N image tokens into G output groups, seeded by the stage's group tokens."""

    def __init__(self, cfg: VisionConfig, num_group_tokens: int, num_output_groups: int):
        super().__init__()
        dim, eps = cfg.hidden_size, cfg.eps
        tokens_dim, channels_dim = (int(r * dim) for r in cfg.assign_mlp_ratio)
        self.norm_tokens = nn.LayerNorm(dim, eps=eps)
        self.mlp_inter = MixerMLP(num_group_tokens, tokens_dim, cfg.hidden_act, out_dim=num_output_groups)
        self.norm_post_tokens = nn.LayerNorm(dim, eps=eps)
        self.norm_x = nn.LayerNorm(dim, eps=eps)
        self.pre_assign_attn = CrossAttentionLayer(cfg)
        self.assign = AssignAttention(cfg)
        self.norm_new_x = nn.LayerNorm(dim, eps=eps)
        self.mlp_channels = MLP(dim, channels_dim, cfg.hidden_act)

    def forward(self, tokens: torch.Tensor, group_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.norm_x(tokens)
        groups = self.norm_post_tokens(self.mlp_inter(self.norm_tokens(group_tokens)))  # (B, G_out, C)
        groups = self.pre_assign_attn(groups, tokens)
        merged, soft = self.assign(groups, tokens)
        merged = merged + groups
        return merged + self.mlp_channels(self.norm_new_x(merged)), soft


class Stage(nn.Module):
    """Transformer layers over [tokens; group tokens], then (if the stage groups) a grouping block."""

    def __init__(self, cfg: VisionConfig, index: int):
        super().__init__()
        num_groups = cfg.num_group_tokens[index]
        num_prev = cfg.num_output_groups[index - 1] if index > 0 else 0
        self.num_groups = num_groups
        self.group_token = nn.Parameter(torch.zeros(1, num_groups, cfg.hidden_size)) if num_groups else None
        self.layers = nn.ModuleList(
            EncoderLayer(cfg.hidden_size, cfg.num_heads, cfg.intermediate_size, cfg.hidden_act, cfg.eps)
            for _ in range(cfg.depths[index])
        )
        self.downsample = GroupingBlock(cfg, num_groups, cfg.num_output_groups[index]) if num_groups else None
        # Carries the previous stage's groups into this stage's group tokens.
        self.group_projector = nn.Sequential(
            nn.LayerNorm(cfg.hidden_size, eps=cfg.eps),
            MixerMLP(num_prev, cfg.hidden_size // 2, cfg.hidden_act, out_dim=num_groups),
        ) if num_groups and num_prev else None

    def forward(self, x: torch.Tensor, prev_groups: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """-> (tokens for the next stage, this stage's group tokens, soft assignment (B, G, N) or None)."""
        if self.group_token is None:
            for layer in self.layers:
                x = layer(x)
            return x, None, None
        groups = self.group_token.expand(len(x), -1, -1)
        if self.group_projector is not None:
            groups = groups + self.group_projector(prev_groups)
        x = torch.cat([x, groups], dim=1)
        for layer in self.layers:
            x = layer(x)
        x, groups = x[:, :-self.num_groups], x[:, -self.num_groups:]
        x, assignment = self.downsample(x, groups)
        return x, groups, assignment


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embeddings = VisionEmbeddings(cfg)
        self.stages = nn.ModuleList(Stage(cfg, i) for i in range(len(cfg.depths)))
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.eps)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(B, 3, H, W) -> final group embeddings (B, G, C) and each grouping's soft assignment."""
        x, groups, assignments = self.embeddings(pixels), None, []
        for stage in self.stages:
            x, groups, assignment = stage(x, groups)
            if assignment is not None:
                assignments.append(assignment)
        return self.layernorm(x), assignments


# ---------------------------------------------------------------------------------------------- full model


@dataclass
class ImageFeatures:
    image_embeds: torch.Tensor  # (B, D) unit-norm embedding of the whole image
    group_embeds: torch.Tensor  # (B, G, D) unit-norm embedding of each final group
    grouping: torch.Tensor      # (B, G, H, W) share of each pixel that belongs to each group


class GroupViT(nn.Module):
    """Both towers and their projection heads into the shared space (hub module names where possible)."""

    def __init__(self, cfg: GroupViTConfig):
        super().__init__()
        self.config = cfg
        self.text_model = TextTransformer(cfg.text)
        self.vision_model = VisionTransformer(cfg.vision)
        self.visual_projection = projection_head(cfg.vision.hidden_size, cfg.projection_intermediate_dim,
                                                 cfg.projection_dim)
        self.text_projection = projection_head(cfg.text.hidden_size, cfg.projection_intermediate_dim,
                                               cfg.projection_dim)
        self.logit_scale = nn.Parameter(torch.tensor(2.6592))

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """(N, S) -> (N, D) text embeddings, not normalised."""
        return self.text_projection(self.text_model(ids))

    def encode_image(self, pixels: torch.Tensor) -> ImageFeatures:
        """(B, 3, H, W) -> features, in float32 whatever the model's dtype."""
        groups, assignments = self.vision_model(pixels)
        return ImageFeatures(
            image_embeds=F.normalize(self.visual_projection(groups.mean(dim=1)).float(), dim=-1),
            group_embeds=F.normalize(self.visual_projection(groups).float(), dim=-1),
            grouping=grouping_maps([a.float() for a in assignments], self.config.vision.grid, pixels.shape[-2:]),
        )

    def forward(self, ids: torch.Tensor, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> logits_per_image (B, N) and segmentation_logits (B, N, H, W), as transformers' GroupViTModel."""
        text = F.normalize(self.encode_text(ids).float(), dim=-1)
        image = self.encode_image(pixels)
        scale = self.logit_scale.exp().float()
        return scale * image.image_embeds @ text.T, segmentation_logits(image, text, scale)


def grouping_maps(assignments: list[torch.Tensor], grid: tuple[int, int], size) -> torch.Tensor:
    """Chain the stages' soft assignments (patch -> group -> group ...) and upsample to `size` pixels."""
    patch_to_group = assignments[0].transpose(1, 2)  # (B, N, G1)
    for assignment in assignments[1:]:
        patch_to_group = patch_to_group @ assignment.transpose(1, 2)  # (B, N, G_i)
    maps = patch_to_group.transpose(1, 2).unflatten(2, grid)  # (B, G, gh, gw)
    return F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)


def segmentation_logits(image: ImageFeatures, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(B, N, H, W): each pixel's groups' label logits weighted by its share in them, times the logit
    scale once more (as transformers computes it)."""
    group_logits = scale * image.group_embeds @ text.T  # (B, G, N)
    return scale * torch.einsum("bgn,bghw->bnhw", group_logits, image.grouping)


_to_module = prefix_renamer(WEIGHT_NAMES)
module_to_hub = prefix_renamer([(target, source) for source, target in HUB_NAMES])


def hub_to_module(key: str) -> str | None:
    """Checkpoint tensor name -> module tensor name (None for tensors inference does not use)."""
    return None if key.endswith(UNUSED_SUFFIXES) else _to_module(key)

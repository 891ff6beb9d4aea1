"""LLaVA-OneVision: SigLIP tower -> 2-layer projector -> Qwen2 decoder, with AnyRes image tiles and pooled
video frames, each followed by the learned `image_newline` embedding."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ...caching import FeatureCache
from ...checkpoint import prefix_renamer, sub_config
from ...errors import CheckpointError, InputError, UnsupportedModelError
from ...layers.attention import KVCache
from ...layers.decoder import Decoder, DecoderConfig
from ...layers.mlp import activation
from ...layers.rotary import Rotary
from .anyres import Size, limited_shape, max_tiles, tile_grid, unpadded_shape
from .siglip import SiglipConfig, SiglipVision

# Checkpoint prefix -> module prefix (first match wins): every layout transformers writes or reads. The
# modules carry the hub's names, listed first so the shorter prefixes below do not catch them.
WEIGHT_NAMES: list[tuple[str, str]] = [
    ("language_model.model.", "language_model.model."),  # the hub's
    ("language_model.lm_head.", "language_model.lm_head."),
    ("vision_tower.vision_model.", "vision_tower.vision_model."),
    ("model.language_model.", "language_model.model."),  # transformers 5 in memory (its state_dict)
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.vision_model.", "vision_tower.vision_model."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.image_newline", "image_newline"),
    ("vision_tower.", "vision_tower.vision_model."),  # transformers 5 save_pretrained of a model built from a config
    ("language_model.", "language_model.model."),  # LlavaOnevisionModel (no head) as transformers 5 saves it
]
UNUSED = ("vision_tower.vision_model.head.",)  # SigLIP's pooling head (vision_use_head), never used by LLaVA
TIED = {"language_model.lm_head.weight": "language_model.model.embed_tokens.weight"}

# Qwen2Config's defaults for fields a hub text_config leaves out.
QWEN2_DEFAULTS: dict[str, Any] = {
    "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
    "num_attention_heads": 32, "hidden_act": "silu", "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
}


_to_module_name = prefix_renamer(WEIGHT_NAMES)


def rename(key: str) -> str | None:
    """Checkpoint tensor name -> module name (None: a tensor the model does not use)."""
    name = _to_module_name(key)
    return None if name.startswith(UNUSED) else name


@dataclass
class LlavaOnevisionConfig:
    text: DecoderConfig
    vision: SiglipConfig
    image_token_id: int
    video_token_id: int
    feature_layers: list[int]
    select_strategy: str  # "full" keeps every patch, "default" drops the first
    pinpoints: list[Size]
    max_tiles: int
    projector_act: str = "gelu"
    projector_bias: bool = True
    max_context: int = 32768

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "LlavaOnevisionConfig":
        """Read config.json (hub or transformers 5 layout)."""
        text = {**QWEN2_DEFAULTS, **sub_config(config, "text_config")}
        decoder = DecoderConfig.from_dict(text)
        if decoder.rope.get("rope_type", "default") != "default":
            raise UnsupportedModelError(f"Rotary scaling {decoder.rope['rope_type']!r} is not supported.")
        layers = config.get("vision_feature_layer", -1)
        strategy = config.get("vision_feature_select_strategy", "full")
        if strategy not in ("full", "default"):
            raise CheckpointError(f"vision_feature_select_strategy={strategy!r}; expected 'full' or 'default'.")
        pinpoints = config.get("image_grid_pinpoints") or [[384 * a, 384 * b] for a in range(1, 7) for b in range(1, 7)]
        return cls(
            text=decoder, vision=SiglipConfig.from_dict(config.get("vision_config")),
            image_token_id=config.get("image_token_index", config.get("image_token_id", 151646)),
            video_token_id=config.get("video_token_index", config.get("video_token_id", 151647)),
            feature_layers=[layers] if isinstance(layers, int) else list(layers), select_strategy=strategy,
            pinpoints=[tuple(p) for p in pinpoints],
            max_tiles=max_tiles(config.get("vision_aspect_ratio", "anyres_max_9")),
            projector_act=config.get("projector_hidden_act", "gelu"),
            projector_bias=config.get("multimodal_projector_bias", True),
            max_context=text["max_position_embeddings"],
        )


class Projector(nn.Module):
    """Vision features (of every selected layer, concatenated) -> the decoder's width."""

    def __init__(self, vision_dim: int, text_dim: int, act: str, bias: bool):
        super().__init__()
        self.linear_1 = nn.Linear(vision_dim, text_dim, bias=bias)
        self.linear_2 = nn.Linear(text_dim, text_dim, bias=bias)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class CausalLM(nn.Module):
    """The Qwen2 decoder with its output head (hub prefix `language_model.`)."""

    def __init__(self, text: DecoderConfig):
        super().__init__()
        self.model = Decoder(text, Rotary(text.head_dim, text.rope["rope_theta"]))
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)


class VisionTower(nn.Module):
    """Hub prefix `vision_tower.vision_model.`."""

    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.vision_model = SiglipVision(cfg)


class LlavaOnevision(nn.Module):
    language_modules = ("language_model.",)  # what quantization applies to

    def __init__(self, cfg: LlavaOnevisionConfig):
        super().__init__()
        self.cfg = cfg
        text = cfg.text
        self.language_model = CausalLM(text)
        self.vision_tower = VisionTower(cfg.vision)
        self.multi_modal_projector = Projector(cfg.vision.hidden_size * len(cfg.feature_layers), text.hidden_size,
                                               cfg.projector_act, cfg.projector_bias)
        self.image_newline = nn.Parameter(torch.empty(text.hidden_size))
        self.features = FeatureCache()

    # ------------------------------------------------------------------------------------ vision

    def encode_tiles(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (N, C, S, S) -> projected patch features (N, patches, hidden)."""
        features = self.vision_tower.vision_model(pixels, self.cfg.feature_layers)
        if self.cfg.select_strategy == "default":
            features = features[:, 1:]
        return self.multi_modal_projector(features)

    def image_features(self, pixels: torch.Tensor, image_sizes: torch.Tensor,
                       batch_num_images: torch.Tensor | None = None) -> torch.Tensor:
        """pixels (images, max tiles, C, S, S) zero-padded, image_sizes (images, 2) as (H, W) -> (tokens, hidden).

        A conversation with one image gets AnyRes tiles; with several, each image is one base tile.
        """
        sizes = [tuple(s) for s in image_sizes.tolist()]
        per_row = batch_num_images.tolist() if batch_num_images is not None else [1] * len(sizes)
        anyres = [n == 1 for n in per_row for _ in range(n)]
        tile = self.cfg.vision.image_size
        counts = [math.prod(tile_grid(s, self.cfg.pinpoints, tile)) + 1 if a else 1 for s, a in zip(sizes, anyres)]
        if len(counts) != pixels.shape[0] or max(counts) > pixels.shape[1]:
            raise InputError(f"pixel_values {tuple(pixels.shape)} do not hold the tiles of images of sizes {sizes}.")
        tiles = torch.cat([p[:n] for p, n in zip(pixels, counts)])
        features = self.encode_tiles(tiles).split(counts)
        packed = [self.pack(f, s) if len(f) > 1 else self.end_with_newline(f[0]) for f, s in zip(features, sizes)]
        return torch.cat(packed)

    def pack(self, features: torch.Tensor, size: Size) -> torch.Tensor:
        """(1 + rows*cols tiles, grid^2, D) -> base tile, then the unpadded, limited map with a newline per row."""
        base, tiles = features[0], features[1:]
        grid, dim = self.cfg.vision.grid, features.shape[-1]
        if base.shape[0] != grid * grid:
            raise UnsupportedModelError("vision_feature_select_strategy='default' drops a patch, so AnyRes tiles "
                                        "cannot be laid out (the reference fails too); use 'full'.")
        rows, cols = tile_grid(size, self.cfg.pinpoints, self.cfg.vision.image_size)
        if rows * cols != tiles.shape[0]:
            raise InputError(f"An image of size {size} comes in {tiles.shape[0]} tiles; the config's pinpoints "
                             f"give {rows}x{cols}.")
        x = tiles.view(rows, cols, grid, grid, dim).permute(4, 0, 2, 1, 3).reshape(dim, rows * grid, cols * grid)
        h, w = unpadded_shape(size, (rows * grid, cols * grid))
        top, left = (rows * grid - h) // 2, (cols * grid - w) // 2
        x = x[:, top:top + h, left:left + w]  # the letterbox padding removed
        limited = limited_shape((h, w), grid, self.cfg.max_tiles)
        if limited != (h, w):
            x = F.interpolate(x[None], list(limited), mode="bilinear")[0]
        return torch.cat([base, self.newline_rows(x)])

    def newline_rows(self, x: torch.Tensor) -> torch.Tensor:
        """A (D, H, W) feature map -> (H * (W + 1), D) tokens, row by row, each row ended by the newline."""
        newline = self.image_newline.to(x.dtype)[:, None, None].expand(-1, x.shape[1], 1)
        return torch.cat([x, newline], dim=-1).flatten(1).transpose(0, 1)

    def end_with_newline(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) tokens -> (N + 1, D)."""
        return torch.cat([x, self.image_newline.to(x.dtype)[None]])

    def video_features(self, pixels: torch.Tensor, num_frames: torch.Tensor | None = None) -> torch.Tensor:
        """pixels (videos, max frames, C, S, S) -> per video: frames pooled 2x2 (bilinear), then one newline."""
        counts = num_frames.tolist() if num_frames is not None else [pixels.shape[1]] * pixels.shape[0]
        features = self.encode_tiles(torch.cat([v[:n] for v, n in zip(pixels, counts)]))
        grid = self.cfg.vision.grid
        if features.shape[1] != grid * grid:
            raise UnsupportedModelError("vision_feature_select_strategy='default' drops a patch, so video frames "
                                        "cannot be pooled (the reference fails too); use 'full'.")
        x = features.view(-1, grid, grid, features.shape[-1]).permute(0, 3, 1, 2)
        x = F.interpolate(x, size=[math.ceil(grid / 2)] * 2, mode="bilinear")
        x = x.permute(0, 2, 3, 1).flatten(1, 2)  # (frames, pooled patches, D)
        return torch.cat([self.end_with_newline(v.flatten(0, 1)) for v in x.split(counts)])

    # ------------------------------------------------------------------------------------ decoder

    def embed(self, inputs: dict[str, Any]) -> torch.Tensor:
        """Token embeddings with image/video features written over their placeholder tokens."""
        ids = inputs["input_ids"]
        embeds = self.embed_tokens(ids)
        if "pixel_values" in inputs:
            features = self.features(self.image_features, inputs["pixel_values"], inputs["image_sizes"],
                                     inputs.get("batch_num_images"))
            _scatter(embeds, ids == self.cfg.image_token_id, features, "image")
        if "pixel_values_videos" in inputs:
            features = self.features(self.video_features, inputs["pixel_values_videos"], inputs.get("video_num_frames"))
            _scatter(embeds, ids == self.cfg.video_token_id, features, "video")
        return embeds

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.model.embed_tokens(ids)

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        return self.language_model.model.new_cache(batch, capacity)

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                valid: torch.Tensor) -> torch.Tensor:
        return self.language_model.model(embeds, positions, cache, valid)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.lm_head(hidden)


def _scatter(embeds: torch.Tensor, slots: torch.Tensor, features: torch.Tensor, kind: str) -> None:
    """Write features over the placeholder slots in order; the counts must agree exactly."""
    if int(slots.sum()) != features.shape[0]:
        raise InputError(f"The prompt has {int(slots.sum())} {kind} placeholder tokens for {features.shape[0]} {kind} "
                         "features; the processor settings do not match the model config.")
    embeds[slots] = features.to(embeds.dtype)

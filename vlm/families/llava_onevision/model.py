"""LLaVA-OneVision: SigLIP tower -> 2-layer projector -> Qwen2 decoder, with AnyRes image tiles and pooled
video frames, each followed by the learned `image_newline` embedding."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ...checkpoint import prefix_renamer, sub_config
from ...errors import CheckpointError, InputError, UnsupportedModelError
from ...layers.decoder import Decoder, DecoderConfig
from ...layers.mlp import activation
from ...layers.rotary import Rotary
from ...layers.vit import ViTConfig
from ...model import ChatModel, Embedded, place_media, request_ids
from .anyres import Size, limited_shape, max_tiles, tile_grid, unpadded_shape
from .siglip import SiglipVision, siglip_config

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
    vision: ViTConfig
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
            text=decoder, vision=siglip_config(config.get("vision_config")),
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

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.vision_model = SiglipVision(cfg)


class LlavaOnevision(ChatModel):
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

    # ------------------------------------------------------------------------------------ vision

    def encode_tiles(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (N, C, S, S) -> projected patch features (N, patches, hidden)."""
        features = self.vision_tower.vision_model(pixels, self.cfg.feature_layers)
        if self.cfg.select_strategy == "default":
            features = features[:, 1:]
        return self.multi_modal_projector(features)

    def image_features(self, tiles: torch.Tensor, size: Size, anyres: bool) -> torch.Tensor:
        """One image's tiles (n, C, S, S), its size (H, W) -> (tokens, hidden): AnyRes tiles packed, or
        (a conversation with several images) one base tile."""
        features = self.encode_tiles(tiles)
        return self.pack(features, size) if anyres else self.end_with_newline(features[0])

    def image_tiles(self, pixels: torch.Tensor, sizes: list[Size]) -> list[tuple[torch.Tensor, Size, bool]]:
        """pixels (images, max tiles, C, S, S) zero-padded -> per image: its tiles, size and whether it is
        tiled (AnyRes applies when the conversation has one image)."""
        anyres = len(sizes) == 1
        tile = self.cfg.vision.image_size
        counts = [math.prod(tile_grid(s, self.cfg.pinpoints, tile)) + 1 if anyres else 1 for s in sizes]
        if len(counts) != pixels.shape[0] or max(counts) > pixels.shape[1]:
            raise InputError(f"pixel_values {tuple(pixels.shape)} do not hold the tiles of images of sizes {sizes}.")
        return [(p[:n], s, anyres) for p, n, s in zip(pixels, counts, sizes)]

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

    def video_features(self, frames: torch.Tensor) -> torch.Tensor:
        """One video's frames (n, C, S, S) -> its frames pooled 2x2 (bilinear), then one newline."""
        features = self.encode_tiles(frames)
        grid = self.cfg.vision.grid
        if features.shape[1] != grid * grid:
            raise UnsupportedModelError("vision_feature_select_strategy='default' drops a patch, so video frames "
                                        "cannot be pooled (the reference fails too); use 'full'.")
        x = features.view(-1, grid, grid, features.shape[-1]).permute(0, 3, 1, 2)
        x = F.interpolate(x, size=[math.ceil(grid / 2)] * 2, mode="bilinear")
        return self.end_with_newline(x.permute(0, 2, 3, 1).flatten(0, 2))  # (frames * pooled patches + 1, D)

    # ------------------------------------------------------------------------------------ decoder

    @property
    def decoder(self) -> Decoder:
        return self.language_model.model

    @property
    def head(self) -> nn.Linear:
        return self.language_model.lm_head

    def embed(self, inputs: dict[str, Any]) -> Embedded:
        """Token embeddings with each image's and video's features written over its placeholder tokens."""
        embedded = super().embed(inputs)
        ids = request_ids(inputs)
        if "pixel_values" in inputs:
            tiles = self.image_tiles(inputs["pixel_values"], [tuple(s) for s in inputs["image_sizes"].tolist()])
            items = [self.features.encode(self.image_features, *image) for image in tiles]
            place_media(embedded, ids == self.cfg.image_token_id, items, "image")
        if "pixel_values_videos" in inputs:
            videos = inputs["pixel_values_videos"]
            counts = inputs.get("video_num_frames", torch.full((len(videos),), videos.shape[1])).tolist()
            items = [self.features.encode(self.video_features, video[:n]) for video, n in zip(videos, counts)]
            place_media(embedded, ids == self.cfg.video_token_id, items, "video")
        return embedded

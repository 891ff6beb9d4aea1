"""Qwen2.5-VL family (Qwen/Qwen2.5-VL-3B-Instruct, 7B, 32B, 72B): images, several images, videos, and
grounding answers in pixels of the resized image."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ...checkpoint import sub_config
from ...layers.decoder import DecoderConfig
from ...layers.qwen_vl import load_pipeline
from ...pipeline import ChatPipeline
from .tiny import write_tiny
from .vision import VisionConfig, VisionTransformer

__all__ = ["load", "write_tiny"]


def load(directory: Path, config: dict[str, Any], device: torch.device, dtype: torch.dtype) -> ChatPipeline:
    """Build the model on the meta device, stream the weights in, and wrap it in a ChatPipeline."""
    text = DecoderConfig.from_dict(sub_config(config, "text_config"))
    text.head_dim = text.hidden_size // text.num_heads  # the reference ignores a head_dim field
    vision = VisionConfig.from_dict(config.get("vision_config") or {}, text.hidden_size)
    return load_pipeline("qwen2_5_vl", directory, config, device, dtype, text, lambda: VisionTransformer(vision),
                         vision.tokens_per_second, pixel_boxes=True)

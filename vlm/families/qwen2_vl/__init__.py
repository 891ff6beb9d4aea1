"""Qwen2-VL family (Qwen/Qwen2-VL-2B-Instruct, 7B, 72B)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ...boxes import MARKUP
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
    vision = VisionConfig.from_dict(config.get("vision_config") or {}, text.hidden_size)
    return load_pipeline("qwen2_vl", directory, config, device, dtype, text, lambda: VisionTransformer(vision),
                         markup=MARKUP)

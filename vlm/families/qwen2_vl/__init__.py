"""Qwen2-VL family (Qwen/Qwen2-VL-2B-Instruct, 7B, 72B)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ...boxes import MARKUP
from ...checkpoint import empty_weights, load_weights, prefix_renamer, read_generation_config, sub_config
from ...layers.decoder import DecoderConfig
from ...pipeline import ChatPipeline
from ...processing.qwen_vl import QwenVLInputs, VisionSettings, token_ids
from ...tokenizer import Tokenizer
from .model import TIED, WEIGHT_NAMES, Qwen2VL
from .tiny import write_tiny
from .vision import VisionConfig

__all__ = ["load", "write_tiny"]


def load(directory: Path, config: dict[str, Any], device: torch.device, dtype: torch.dtype) -> ChatPipeline:
    """Build the model on the meta device, stream the weights in, and wrap it in a ChatPipeline."""
    text_fields = sub_config(config, "text_config")
    text = DecoderConfig.from_dict(text_fields)
    vision = VisionConfig.from_dict(config.get("vision_config") or {}, text.hidden_size)
    tokenizer = Tokenizer(directory)
    generation = read_generation_config(directory)
    ids = token_ids(config, tokenizer, generation)
    with empty_weights():
        model = Qwen2VL(text, vision, ids.image, ids.video)
    load_weights(model, directory, prefix_renamer(WEIGHT_NAMES), dtype, device, tied=TIED)
    model.eval()
    build_inputs = QwenVLInputs(tokenizer, VisionSettings.from_dir(directory), ids)
    return ChatPipeline("qwen2_vl", model, tokenizer, build_inputs, generation, device, directory,
                        max_context=text_fields.get("max_position_embeddings", 32768), markup=MARKUP)

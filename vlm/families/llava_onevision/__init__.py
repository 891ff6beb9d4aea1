"""LLaVA-OneVision family (llava-hf/llava-onevision-qwen2-0.5b-ov-hf, 7B, 72B; -ov and -si)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ...checkpoint import empty_weights, load_weights, read_generation_config
from ...pipeline import ChatPipeline, pad_id
from ...tokenizer import Tokenizer
from .inputs import LlavaOnevisionInputs, TokenIds
from .model import TIED, LlavaOnevision, LlavaOnevisionConfig, rename
from .processor import ProcessorSettings
from .tiny import write_tiny

__all__ = ["load", "write_tiny"]


def load(directory: Path, config: dict[str, Any], device: torch.device, dtype: torch.dtype) -> ChatPipeline:
    """Build the model on the meta device, stream the weights in, and wrap it in a ChatPipeline."""
    cfg = LlavaOnevisionConfig.from_dict(config)
    tokenizer = Tokenizer(directory)
    generation = read_generation_config(directory)
    with empty_weights():
        model = LlavaOnevision(cfg)
    load_weights(model, directory, rename, dtype, device, tied=TIED)
    model.eval()
    ids = TokenIds(cfg.image_token_id, cfg.video_token_id, pad_id(generation, tokenizer))
    build_inputs = LlavaOnevisionInputs(tokenizer, ProcessorSettings.from_dir(directory), ids, cfg.vision.grid,
                                        cfg.max_context)
    return ChatPipeline("llava_onevision", model, tokenizer, build_inputs, generation, device, directory,
                        max_context=cfg.max_context)

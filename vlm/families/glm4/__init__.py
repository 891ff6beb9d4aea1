"""GLM-4 family (THUDM/GLM-4-9B-0414, GLM-4-32B-0414, GLM-Z1-*-0414): text chat."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ...checkpoint import empty_weights, load_weights, prefix_renamer, read_generation_config, sub_config
from ...layers.decoder import DecoderConfig
from ...pipeline import ChatPipeline, pad_id
from ...reasoning import ThinkingFormat
from ...tokenizer import Tokenizer
from .inputs import Glm4Inputs
from .model import TIED, WEIGHT_NAMES, Glm4
from .tiny import write_tiny

__all__ = ["load", "write_tiny", "THINKING"]

# GLM-Z1 templates open <think> in the prompt; GLM-4 itself answers directly (the parser then passes it through).
THINKING = ThinkingFormat()


def load(directory: Path, config: dict[str, Any], device: torch.device, dtype: torch.dtype) -> ChatPipeline:
    """Build the model on the meta device, stream the weights in, and wrap it in a ChatPipeline."""
    text = sub_config(config, "text_config")
    cfg = DecoderConfig.from_dict(text)
    tokenizer = Tokenizer(directory)
    generation = read_generation_config(directory)
    with empty_weights():
        model = Glm4(cfg, bool(text.get("attention_bias", True)))
    load_weights(model, directory, prefix_renamer(WEIGHT_NAMES), dtype, device,
                 tied=TIED if cfg.tie_word_embeddings else None)
    model.eval()
    return ChatPipeline("glm4", model, tokenizer, Glm4Inputs(tokenizer, pad_id(generation, tokenizer)), generation,
                        device, directory, max_context=text.get("max_position_embeddings", 32768), thinking=THINKING)

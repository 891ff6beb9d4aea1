"""GLM-4.1V family (THUDM/GLM-4.1V-9B-Thinking, GLM-4.1V-9B-Base): images, several images, or a video."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ...boxes import MARKUP
from ...checkpoint import empty_weights, load_weights, prefix_renamer, read_generation_config, sub_config
from ...errors import CheckpointError
from ...layers.decoder import DecoderConfig
from ...pipeline import ChatPipeline, pad_id
from ...reasoning import ThinkingFormat
from ...tokenizer import Tokenizer
from .inputs import Glm4vInputs, TokenIds
from .model import TIED, WEIGHT_NAMES, Glm4v
from .processor import VisionSettings
from .tiny import write_tiny
from .vision import VisionConfig

__all__ = ["load", "write_tiny", "THINKING"]

# GLM-4.1V-Thinking answers <think>reasoning</think><answer>answer</answer>.
THINKING = ThinkingFormat(answer_open="<answer>", answer_close="</answer>")


def load(directory: Path, config: dict[str, Any], device: torch.device, dtype: torch.dtype) -> ChatPipeline:
    """Build the model on the meta device, stream the weights in, and wrap it in a ChatPipeline."""
    text_fields = sub_config(config, "text_config")
    text = DecoderConfig.from_dict(text_fields)
    text.head_dim = text.hidden_size // text.num_heads  # GLM-4.1V ignores a head_dim field
    vision = VisionConfig.from_dict(config.get("vision_config") or {})
    tokenizer = Tokenizer(directory)
    generation = read_generation_config(directory)
    ids = TokenIds(image=_token(config, "image_token_id", tokenizer, "<|image|>"),
                   video=tokenizer.token_id("<|video|>"),
                   begin_image=_token(config, "image_start_token_id", tokenizer, "<|begin_of_image|>"),
                   end_image=_token(config, "image_end_token_id", tokenizer, "<|end_of_image|>"),
                   pad=pad_id(generation, tokenizer))
    with empty_weights():
        model = Glm4v(text, vision, ids.image)
    load_weights(model, directory, prefix_renamer(WEIGHT_NAMES), dtype, device,
                 tied=TIED if text.tie_word_embeddings else None)
    model.eval()
    build_inputs = Glm4vInputs(tokenizer, VisionSettings.from_dir(directory), ids)
    return ChatPipeline("glm4v", model, tokenizer, build_inputs, generation, device, directory,
                        max_context=text_fields.get("max_position_embeddings", 32768), thinking=THINKING,
                        markup=MARKUP)


def _token(config: dict[str, Any], key: str, tokenizer: Tokenizer, name: str) -> int:
    """A special token id from config.json, else from the tokenizer by name."""
    token = config.get(key, tokenizer.token_id(name))
    if token is None:
        raise CheckpointError(f"The checkpoint names no {name} token (config.json {key} / tokenizer).")
    return token

"""IDEFICS family (HuggingFaceM4/idefics-9b-instruct, idefics-9b, idefics-80b-instruct, idefics-80b)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ...checkpoint import empty_weights, load_weights, read_generation_config
from ...errors import CheckpointError
from ...pipeline import ChatPipeline, pad_id
from ...tokenizer import ChatTemplate, Tokenizer
from .inputs import CHAT_TEMPLATE, END_OF_UTTERANCE, FAKE_TOKEN, IMAGE_TOKEN, IdeficsInputs, TokenIds
from .model import TIED, Idefics, IdeficsConfig, rename
from .processor import ImageSettings
from .tiny import write_tiny

__all__ = ["load", "write_tiny"]


def load(directory: Path, config: dict[str, Any], device: torch.device, dtype: torch.dtype) -> ChatPipeline:
    """Build the model on the meta device, stream the weights in, and wrap it in a ChatPipeline.

    Prompts use the instruct format (see `inputs`), `<end_of_utterance>` ends an answer and the image
    tokens are never generated, as the model card's `generate` call asks.
    """
    cfg = IdeficsConfig.from_dict(config)
    settings = ImageSettings.from_dir(directory)
    if settings.image_size != cfg.vision.image_size:
        raise CheckpointError(f"{directory}: the image processor resizes to {settings.image_size} pixels, the vision "
                              f"tower takes {cfg.vision.image_size}.")
    tokenizer = Tokenizer(directory)
    tokenizer.template = ChatTemplate(CHAT_TEMPLATE, tokenizer.special_token_strings())
    generation = read_generation_config(directory)
    with empty_weights():
        model = Idefics(cfg)
    load_weights(model, directory, rename, dtype, device, tied=TIED if cfg.text.tie_word_embeddings else None)
    model.eval()
    ids = TokenIds(image=_token(tokenizer, IMAGE_TOKEN),
                   eos=tokenizer.token_id(tokenizer.special_token_strings().get("eos_token")),
                   pad=pad_id(generation, tokenizer))
    stop = [END_OF_UTTERANCE] if tokenizer.token_id(END_OF_UTTERANCE) is not None else []  # base models may lack it
    return ChatPipeline("idefics", model, tokenizer, IdeficsInputs(tokenizer, settings, ids), generation, device,
                        directory, max_context=cfg.max_context, stop_tokens=stop,
                        banned_tokens=(IMAGE_TOKEN, FAKE_TOKEN))


def _token(tokenizer: Tokenizer, name: str) -> int:
    token = tokenizer.token_id(name)
    if token is None:
        raise CheckpointError(f"The tokenizer has no {name} token; this is not an IDEFICS checkpoint.")
    return token

"""The model the Qwen VL families share (Qwen2-VL, Qwen2.5-VL): a Qwen2 decoder with M-RoPE and its head,
reading each image's and video's features, from the vision tower the family gives, over its placeholders;
and how a checkpoint of either is loaded into a pipeline (`load_pipeline`). The processor builds the M-RoPE
positions (Qwen2.5-VL's time-aligned ones included)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..checkpoint import empty_weights, load_weights, prefix_renamer, read_generation_config, sub_config
from ..model import ChatModel, Embedded, place_media, request_ids
from ..pipeline import ChatPipeline
from ..processing.qwen_vl import QwenVLInputs, VisionSettings, token_ids
from ..tokenizer import Tokenizer
from .decoder import Decoder, DecoderConfig
from .rotary import MRotary

# Checkpoint prefix -> module prefix (first match wins); hub checkpoints, and transformers 5's save_pretrained,
# already use the module names.
WEIGHT_NAMES = [
    ("model.language_model.", "model."),  # transformers 5 in memory (its state_dict)
    ("model.visual.", "visual."),
    ("language_model.", "model."),  # the model without a head (Qwen2VLModel...) as transformers 5 saves it
]
TIED = {"lm_head.weight": "model.embed_tokens.weight"}


class QwenVL(ChatModel):
    """`visual`: the family's vision tower, (pixels, grid (1, 3)) -> one feature per placeholder token."""

    language_modules = ("model.", "lm_head")  # what quantization applies to

    def __init__(self, text: DecoderConfig, visual: nn.Module, image_token_id: int, video_token_id: int):
        super().__init__()
        section = text.rope.get("mrope_section") or [16, 24, 24]
        self.model = Decoder(text, MRotary(text.head_dim, text.rope["rope_theta"], section))
        self.visual = visual
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        self.image_token_id, self.video_token_id = image_token_id, video_token_id

    def embed(self, inputs: dict[str, Any]) -> Embedded:
        """Token embeddings with each image's and video's features written over its placeholders."""
        embedded = super().embed(inputs)
        ids = request_ids(inputs)
        for token, pixels, grid, kind in ((self.image_token_id, "pixel_values", "image_grid_thw", "image"),
                                          (self.video_token_id, "pixel_values_videos", "video_grid_thw", "video")):
            if pixels in inputs:
                grids = inputs[grid]
                parts = inputs[pixels].to(embedded.embeds.device).split(grids.prod(-1).tolist())
                items = [self.features.encode(self.visual, part, g[None]) for part, g in zip(parts, grids)]
                place_media(embedded, ids == token, items, kind)
        return embedded


def load_pipeline(family: str, directory: Path, config: dict[str, Any], device: torch.device, dtype: torch.dtype,
                  text: DecoderConfig, tower: Callable[[], nn.Module], tokens_per_second: int | None = None,
                  markup: Sequence[str] = (), pixel_boxes: bool = False) -> ChatPipeline:
    """A Qwen VL checkpoint's pipeline: the model built on the meta device over the family's vision tower
    (`tower()`), the weights streamed in, the shared processor. `pixel_boxes`: the answers' boxes are in
    pixels of the resized image (Qwen2.5-VL), not in thousandths."""
    tokenizer = Tokenizer(directory)
    generation = read_generation_config(directory)
    ids = token_ids(config, tokenizer, generation)
    with empty_weights():
        model = QwenVL(text, tower(), ids.image, ids.video)
    load_weights(model, directory, prefix_renamer(WEIGHT_NAMES), dtype, device, tied=TIED)
    model.eval()
    build_inputs = QwenVLInputs(tokenizer, VisionSettings.from_dir(directory), ids, tokens_per_second)
    frame = {"box_frame": build_inputs.resized_size} if pixel_boxes else {}
    return ChatPipeline(family, model, tokenizer, build_inputs, generation, device, directory,
                        max_context=sub_config(config, "text_config").get("max_position_embeddings", 32768),
                        markup=markup, **frame)

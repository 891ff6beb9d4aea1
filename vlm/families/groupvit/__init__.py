"""GroupViT: zero-shot semantic segmentation from text labels (nvidia/groupvit-gcc-yfcc)."""

from __future__ import annotations

from pathlib import Path

import torch

from ...checkpoint import empty_weights, load_weights
from ...errors import CheckpointError
from .model import GroupViT, GroupViTConfig, hub_to_module
from .pipeline import DEFAULT_TEMPLATES, DEFAULT_THRESHOLD, GroupViTPipeline
from .processor import ClipTokenizer, ImageProcessor
from .segmentation import BACKGROUND, Segmentation
from .tiny import write_tiny

__all__ = ["BACKGROUND", "DEFAULT_TEMPLATES", "DEFAULT_THRESHOLD", "GroupViTPipeline", "Segmentation", "load",
           "write_tiny"]


def load(directory: Path, config: dict, device: torch.device, dtype: torch.dtype) -> GroupViTPipeline:
    """Build the model on the meta device, stream the checkpoint's weights in, read its processors."""
    cfg = GroupViTConfig.from_dict(config)
    processor = ImageProcessor.from_directory(directory)
    if processor.crop_size != cfg.vision.image_size or processor.shortest_edge < max(processor.crop_size):
        raise CheckpointError(f"{directory}: the preprocessor (shortest edge {processor.shortest_edge}, crop "
                              f"{processor.crop_size}) does not fit the model's {cfg.vision.image_size} input.")
    with empty_weights():
        model = GroupViT(cfg)
    load_weights(model, directory, hub_to_module, dtype, device)
    tokenizer = ClipTokenizer.from_directory(directory, max_length=cfg.text.max_positions)
    return GroupViTPipeline(model.eval(), tokenizer, processor, device, dtype)

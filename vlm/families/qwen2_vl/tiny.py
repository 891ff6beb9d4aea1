"""A tiny random Qwen2-VL checkpoint in the hub's layout (flat config.json, hub tensor names)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ... import tiny
from ...layers.decoder import DecoderConfig
from .model import Qwen2VL
from .vision import VisionConfig

TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            rms_norm_eps=1e-6, rope_theta=1000000.0, mrope_section=[2, 3, 3], max_position_embeddings=4096)
VISION = dict(depth=2, embed_dim=32, num_heads=4, mlp_ratio=2, patch_size=14, spatial_merge_size=2,
              temporal_patch_size=2, in_chans=3, hidden_act="quick_gelu")
PROCESSOR = dict(min_pixels=3136, max_pixels=28 * 28 * 36, image_mean=[0.48145466, 0.4578275, 0.40821073],
                 image_std=[0.26862954, 0.26130258, 0.27577711])
NAMES = dict(architecture="Qwen2VLForConditionalGeneration", model_type="qwen2_vl", processor_class="Qwen2VLProcessor")


def write_tiny(out_dir: Path, seed: int = 0, text: dict[str, Any] | None = None, vision: dict[str, Any] | None = None,
               processor: dict[str, Any] | None = None, generation: dict[str, Any] | None = None,
               tie_word_embeddings: bool = True, shard_bytes: int | None = None) -> Path:
    """Write config, weights, tokenizer, template, processor and generation config into `out_dir`."""
    text_cfg = {**TEXT, **(text or {})}
    vision_cfg = {**VISION, **(vision or {}), "hidden_size": text_cfg["hidden_size"]}

    def build(config: dict[str, Any], ids: dict[str, int]) -> Qwen2VL:
        decoder = DecoderConfig.from_dict(config)
        return Qwen2VL(decoder, VisionConfig.from_dict(vision_cfg, decoder.hidden_size), ids["<|image_pad|>"],
                       ids["<|video_pad|>"])

    return tiny.write_qwen_vl(out_dir, build, NAMES, text_cfg, vision_cfg, {**PROCESSOR, **(processor or {})},
                              generation, seed, tie_word_embeddings, shard_bytes)

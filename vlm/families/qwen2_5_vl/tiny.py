"""A tiny random Qwen2.5-VL checkpoint in the layout of Qwen/Qwen2.5-VL-3B-Instruct (flat config.json, hub
tensor names): windows of 2x2 merged tokens so images span several, full attention in the first block."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ... import tiny
from ...layers.decoder import DecoderConfig
from .model import Qwen2_5_VL
from .vision import VisionConfig

# Qwen2.5's added tokens after the Qwen2-VL ones (151657...).
EXTRA_TOKENS = ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
                "<|repo_name|>", "<|file_sep|>")
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            rms_norm_eps=1e-6, rope_theta=1000000.0, mrope_section=[2, 3, 3], max_position_embeddings=4096)
VISION = dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=14, spatial_merge_size=2,
              temporal_patch_size=2, in_chans=3, hidden_act="silu", window_size=56, fullatt_block_indexes=[0],
              tokens_per_second=2)
PROCESSOR = dict(min_pixels=3136, max_pixels=28 * 28 * 36, image_mean=[0.48145466, 0.4578275, 0.40821073],
                 image_std=[0.26862954, 0.26130258, 0.27577711])
NAMES = dict(architecture="Qwen2_5_VLForConditionalGeneration", model_type="qwen2_5_vl",
             processor_class="Qwen2_5_VLProcessor")


def write_tiny(out_dir: Path, seed: int = 0, text: dict[str, Any] | None = None, vision: dict[str, Any] | None = None,
               processor: dict[str, Any] | None = None, generation: dict[str, Any] | None = None,
               tie_word_embeddings: bool = True, shard_bytes: int | None = None) -> Path:
    """Write config, weights, tokenizer, template, processor and generation config into `out_dir`."""
    text_cfg = {**TEXT, **(text or {})}
    vision_cfg = {**VISION, **(vision or {}), "out_hidden_size": text_cfg["hidden_size"]}

    def build(config: dict[str, Any], ids: dict[str, int]) -> Qwen2_5_VL:
        decoder = DecoderConfig.from_dict(config)
        return Qwen2_5_VL(decoder, VisionConfig.from_dict(vision_cfg, decoder.hidden_size), ids["<|image_pad|>"],
                          ids["<|video_pad|>"])

    return tiny.write_qwen_vl(out_dir, build, NAMES, text_cfg, vision_cfg, {**PROCESSOR, **(processor or {})},
                              generation, seed, tie_word_embeddings, shard_bytes, EXTRA_TOKENS)

"""A tiny random Qwen2-VL checkpoint in the hub's layout (flat config.json, hub tensor names)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ... import tiny
from ...layers.decoder import DecoderConfig
from .model import Qwen2VL
from .vision import VisionConfig

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
]

# The hub template of Qwen/Qwen2-VL-2B-Instruct (chat_template.json).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)

TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            rms_norm_eps=1e-6, rope_theta=1000000.0, mrope_section=[2, 3, 3], max_position_embeddings=4096)
VISION = dict(depth=2, embed_dim=32, num_heads=4, mlp_ratio=2, patch_size=14, spatial_merge_size=2,
              temporal_patch_size=2, in_chans=3, hidden_act="quick_gelu")
PROCESSOR = dict(min_pixels=3136, max_pixels=28 * 28 * 36, image_mean=[0.48145466, 0.4578275, 0.40821073],
                 image_std=[0.26862954, 0.26130258, 0.27577711])


def write_tiny(out_dir: Path, seed: int = 0, text: dict[str, Any] | None = None, vision: dict[str, Any] | None = None,
               processor: dict[str, Any] | None = None, generation: dict[str, Any] | None = None,
               tie_word_embeddings: bool = True, shard_bytes: int | None = None) -> Path:
    """Write config, weights, tokenizer, template, processor and generation config into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = tiny.train_bpe(SPECIAL_TOKENS)
    tok.save(str(out_dir / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    text_cfg = {**TEXT, **(text or {})}
    vision_cfg = {**VISION, **(vision or {}), "hidden_size": text_cfg["hidden_size"]}
    config = _config(text_cfg, vision_cfg, ids, tok.get_vocab_size(), tie_word_embeddings)
    tiny.write_json(out_dir / "config.json", config)

    decoder = DecoderConfig.from_dict(config)
    model = Qwen2VL(decoder, VisionConfig.from_dict(vision_cfg, decoder.hidden_size), ids["<|image_pad|>"],
                    ids["<|video_pad|>"])
    tiny.randomize(model, seed)
    tiny.save_weights(model, out_dir, skip=("lm_head.weight",) if tie_word_embeddings else (), shard_bytes=shard_bytes)

    tiny.write_json(out_dir / "tokenizer_config.json", {
        "tokenizer_class": "Qwen2Tokenizer", "model_max_length": text_cfg["max_position_embeddings"],
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
        "errors": "replace", "split_special_tokens": False, "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": tiny.added_tokens_decoder(tok),
    })
    tiny.write_json(out_dir / "chat_template.json", {"chat_template": CHAT_TEMPLATE})
    tiny.write_json(out_dir / "preprocessor_config.json", {
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor",
        "patch_size": vision_cfg["patch_size"], "temporal_patch_size": vision_cfg["temporal_patch_size"],
        "merge_size": vision_cfg["spatial_merge_size"], **PROCESSOR, **(processor or {}),
    })
    tiny.write_json(out_dir / "generation_config.json", {
        "bos_token_id": ids["<|endoftext|>"], "pad_token_id": ids["<|endoftext|>"], "do_sample": False,
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]], **(generation or {}),
    })
    return out_dir


def _config(text: dict[str, Any], vision: dict[str, Any], ids: dict[str, int], vocab: int, tie: bool) -> dict[str, Any]:
    """config.json in the hub's flat layout (text fields at top level, rope_scaling with mrope)."""
    text = dict(text)
    section = text.pop("mrope_section")
    vocab = max(vocab, text.pop("vocab_size", vocab))  # a larger embedding than the tokenizer, as on the hub
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl", **text,
        "hidden_act": "silu", "vocab_size": vocab, "tie_word_embeddings": tie, "torch_dtype": "float32",
        "rope_scaling": {"type": "mrope", "mrope_section": section}, "use_sliding_window": False,
        "sliding_window": text["max_position_embeddings"], "max_window_layers": text["num_hidden_layers"],
        "attention_dropout": 0.0, "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"], "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"], "vision_config": vision,
    }

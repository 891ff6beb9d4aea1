"""A tiny random LLaVA-OneVision checkpoint in the hub's layout (as llava-hf/llava-onevision-qwen2-0.5b-ov-hf:
nested config.json with `torch_dtype`, hub tensor names, preprocessor_config.json, chat_template.json)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ... import tiny
from .model import LlavaOnevision, LlavaOnevisionConfig
from .processor import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]

# The hub template of llava-hf/llava-onevision-qwen2-*-hf (chat_template.json).
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\\n' + content['text'] }}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=4096)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
              patch_size=8)
TOP = dict(vision_feature_layer=-1, vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
           projector_hidden_act="gelu")


def write_tiny(out_dir: Path, seed: int = 0, text: dict[str, Any] | None = None, vision: dict[str, Any] | None = None,
               top: dict[str, Any] | None = None, processor: dict[str, Any] | None = None,
               generation: dict[str, Any] | None = None, tie_word_embeddings: bool = True,
               shard_bytes: int | None = None) -> Path:
    """Write config, weights, tokenizer, template, processor and generation config into `out_dir`.

    `text`, `vision` and `top` override the text, vision and top-level config fields; the grid pinpoints
    are the hub's 1..6 x 1..6 tiles, scaled to the tiny tile size.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = tiny.train_bpe(SPECIAL_TOKENS)
    tok.save(str(out_dir / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    vision_cfg = {**VISION, **(vision or {})}
    tile = vision_cfg["image_size"]
    pinpoints = [[tile * a, tile * b] for a in range(1, 7) for b in range(1, 7)]
    config = _config({**TEXT, **(text or {})}, vision_cfg, {**TOP, **(top or {})}, pinpoints, ids,
                     tok.get_vocab_size(), tie_word_embeddings)
    tiny.write_json(out_dir / "config.json", config)

    cfg = LlavaOnevisionConfig.from_dict(config)
    model = LlavaOnevision(cfg)
    tiny.randomize(model, seed)
    with torch.no_grad():  # transformers' own init scale for the newline embedding
        model.image_newline.normal_(0, 1 / math.sqrt(cfg.text.hidden_size),
                                    generator=torch.Generator().manual_seed(seed + 1))
    tiny.save_weights(model, out_dir, skip=("language_model.lm_head.weight",) if tie_word_embeddings else (),
                      shard_bytes=shard_bytes)

    tiny.write_json(out_dir / "tokenizer_config.json", {
        "tokenizer_class": "Qwen2Tokenizer", "model_max_length": cfg.max_context,
        "processor_class": "LlavaOnevisionProcessor",
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
        "errors": "replace", "split_special_tokens": False, "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": tiny.added_tokens_decoder(tok),
    })
    tiny.write_json(out_dir / "chat_template.json", {"chat_template": CHAT_TEMPLATE})
    pixels = {"do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
              "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD), "resample": 3,
              "rescale_factor": 1 / 255, "size": {"height": tile, "width": tile}, **(processor or {})}
    tiny.write_json(out_dir / "preprocessor_config.json", {
        **pixels, "do_pad": True, "image_grid_pinpoints": pinpoints,
        "image_processor_type": "LlavaOnevisionImageProcessor", "processor_class": "LlavaOnevisionProcessor"})
    tiny.write_json(out_dir / "video_preprocessor_config.json", {
        **pixels, "video_processor_type": "LlavaOnevisionVideoProcessor", "processor_class": "LlavaOnevisionProcessor"})
    tiny.write_json(out_dir / "processor_config.json", {
        "processor_class": "LlavaOnevisionProcessor", "image_token": "<image>", "video_token": "<video>",
        "num_image_tokens": cfg.vision.grid**2, "vision_aspect_ratio": config["vision_aspect_ratio"],
        "vision_feature_select_strategy": config["vision_feature_select_strategy"]})
    tiny.write_json(out_dir / "generation_config.json", {
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"],
        **(generation or {})})
    return out_dir


def _config(text: dict[str, Any], vision: dict[str, Any], top: dict[str, Any], pinpoints: list[list[int]],
            ids: dict[str, int], vocab: int, tie: bool) -> dict[str, Any]:
    """config.json as the hub writes it (text and vision sub-configs, `torch_dtype`, `rope_theta` in text_config)."""
    text = dict(text)
    vocab = max(vocab, text.pop("vocab_size", vocab))  # a larger embedding than the tokenizer, as on the hub
    return {
        "architectures": ["LlavaOnevisionForConditionalGeneration"], "model_type": "llava_onevision",
        "image_token_index": ids["<image>"], "video_token_index": ids["<video>"], "image_grid_pinpoints": pinpoints,
        "tie_word_embeddings": tie, "torch_dtype": "float32", "use_image_newline_parameter": True, **top,
        "text_config": {
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **text, "vocab_size": vocab,
            "tie_word_embeddings": tie, "use_sliding_window": False, "max_window_layers": text["num_hidden_layers"],
            "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"], "torch_dtype": "bfloat16",
        },
        "vision_config": {"model_type": "siglip_vision_model", "vision_use_head": False, **vision},
    }

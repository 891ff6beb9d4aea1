"""A tiny random GLM-4.1V checkpoint in the layout of THUDM/GLM-4.1V-9B-Thinking (hub key names)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ... import tiny
from ...layers.decoder import DecoderConfig
from ..glm4.tiny import GLM_PRETOKENIZE
from ..glm4.tiny import SPECIAL_TOKENS as GLM4_SPECIAL_TOKENS
from .model import Glm4v
from ...processing.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from .vision import VisionConfig

# GLM-4's added tokens, then GLM-4.1V's (<|image|> = 151343, <|video|> = 151344, </answer> = 151348).
SPECIAL_TOKENS = GLM4_SPECIAL_TOKENS + [
    "<|image|>", "<|video|>", "<|begin_of_transcription|>", "<|end_of_transcription|>", "<answer>", "</answer>",
    "<think>", "</think>", "<|begin_of_box|>", "<|end_of_box|>",
]

# The chat template of THUDM/GLM-4.1V-9B-Thinking (chat_template.jinja).
CHAT_TEMPLATE = """[gMASK]<sop>
{%- for msg in messages %}
    {%- if msg.role == 'system' %}
<|system|>
{{ msg.content }}
    {%- elif msg.role == 'user' %}
<|user|>{{ '\\n' }}

        {%- if msg.content is string %}
{{ msg.content }}
        {%- else %}
            {%- for item in msg.content %}
                {%- if item.type == 'video' or 'video' in item %}
<|begin_of_video|><|video|><|end_of_video|>
                {%- elif item.type == 'image' or 'image' in item %}
<|begin_of_image|><|image|><|end_of_image|>
                {%- elif item.type == 'text' %}
{{ item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
    {%- elif msg.role == 'assistant' %}
        {%- if msg.metadata %}
<|assistant|>{{ msg.metadata }}
{{ msg.content }}
        {%- else %}
<|assistant|>
{{ msg.content }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{% if add_generation_prompt %}<|assistant|>
{% endif %}"""

TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            partial_rotary_factor=0.5, rms_norm_eps=1e-5, rope_theta=10000.0, mrope_section=[2, 3, 3],
            max_position_embeddings=4096)
VISION = dict(hidden_size=32, depth=2, num_heads=2, intermediate_size=64, patch_size=14, image_size=84,
              spatial_merge_size=2, temporal_patch_size=2, rms_norm_eps=1e-5, hidden_act="silu", attention_bias=False,
              in_channels=3)
# size = {shortest_edge, longest_edge}: pixel counts that include the temporal patch (images) or all frames (videos).
IMAGE_SIZE = dict(shortest_edge=2 * 56 * 56, longest_edge=2 * 28 * 28 * 20)
VIDEO_SIZE = dict(shortest_edge=2 * 56 * 56, longest_edge=200_000)


def write_tiny(out_dir: Path, seed: int = 0, text: dict[str, Any] | None = None, vision: dict[str, Any] | None = None,
               image_size: dict[str, int] | None = None, video_size: dict[str, int] | None = None,
               video: dict[str, Any] | None = None, generation: dict[str, Any] | None = None,
               flat: bool = False, shard_bytes: int | None = None) -> Path:
    """Write config, weights, tokenizer, template, processor and generation configs into `out_dir`.

    The config is nested (`text_config`, `vision_config`) with the hub's key names (`rope_scaling`,
    `rope_theta`, `torch_dtype`); `flat=True` puts the text fields at the top level instead.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = tiny.train_bpe(SPECIAL_TOKENS, pattern=GLM_PRETOKENIZE)
    tok.save(str(out_dir / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    eos = [ids["<|endoftext|>"], ids["<|user|>"], ids["<|observation|>"], ids["</answer>"]]
    text_cfg = {**TEXT, **(text or {})}
    vision_cfg = {**VISION, **(vision or {}), "out_hidden_size": text_cfg["hidden_size"]}
    config = _config(text_cfg, vision_cfg, ids, eos, tok.get_vocab_size(), flat)
    tiny.write_json(out_dir / "config.json", config)

    model = Glm4v(DecoderConfig.from_dict({**text_cfg, "vocab_size": tok.get_vocab_size(),
                                           "rope_scaling": {"mrope_section": text_cfg["mrope_section"]}}),
                  VisionConfig.from_dict(vision_cfg), ids["<|image|>"])
    tiny.randomize(model, seed)
    tiny.save_weights(model, out_dir, shard_bytes=shard_bytes)

    tiny.write_json(out_dir / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": text_cfg["max_position_embeddings"],
        "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "padding_side": "left",
        "clean_up_tokenization_spaces": False, "do_lower_case": False, "remove_space": False,
        "model_input_names": ["input_ids", "attention_mask"], "added_tokens_decoder": tiny.added_tokens_decoder(tok),
    })
    (out_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    shared = {"do_rescale": True, "do_normalize": True, "patch_size": vision_cfg["patch_size"],
              "temporal_patch_size": vision_cfg["temporal_patch_size"], "merge_size": vision_cfg["spatial_merge_size"],
              "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD), "resample": 3,
              "processor_class": "Glm4vProcessor"}
    tiny.write_json(out_dir / "preprocessor_config.json", {
        **shared, "image_processor_type": "Glm4vImageProcessor", "size": {**IMAGE_SIZE, **(image_size or {})}})
    tiny.write_json(out_dir / "video_preprocessor_config.json", {
        **shared, "video_processor_type": "Glm4vVideoProcessor", "size": {**VIDEO_SIZE, **(video_size or {})},
        "do_sample_frames": True, "fps": 2, "max_duration": 300, **(video or {})})
    tiny.write_json(out_dir / "generation_config.json", {
        "eos_token_id": eos, "pad_token_id": ids["<|endoftext|>"], "do_sample": True, "top_k": 2, "top_p": 0.6,
        "repetition_penalty": 1.1, **(generation or {}),
    })
    return out_dir


def _config(text: dict[str, Any], vision: dict[str, Any], ids: dict[str, int], eos: list[int], vocab: int,
            flat: bool) -> dict[str, Any]:
    text = dict(text)
    section = text.pop("mrope_section")
    text_fields = {
        **text, "vocab_size": vocab, "hidden_act": "silu", "attention_dropout": 0.0, "initializer_range": 0.02,
        "use_cache": True, "torch_dtype": "float32", "rope_scaling": {"type": "default", "mrope_section": section},
        "pad_token_id": ids["<|endoftext|>"], "eos_token_id": eos, "image_token_id": ids["<|image|>"],
        "tie_word_embeddings": False,
    }
    top = {
        "architectures": ["Glm4vForConditionalGeneration"], "model_type": "glm4v", "torch_dtype": "float32",
        "image_token_id": ids["<|image|>"], "video_token_id": ids["<|video|>"],
        "image_start_token_id": ids["<|begin_of_image|>"], "image_end_token_id": ids["<|end_of_image|>"],
        "video_start_token_id": ids["<|begin_of_video|>"], "video_end_token_id": ids["<|end_of_video|>"],
        "tie_word_embeddings": False, "vision_config": {"model_type": "glm4v_vision", **vision},
    }
    if flat:
        return {**text_fields, **top}
    return {**top, "text_config": {"model_type": "glm4v_text", **text_fields}}

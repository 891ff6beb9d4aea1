"""A tiny random GLM-4 checkpoint in the layout of THUDM/GLM-4-9B-0414 (flat config, hub tensor names)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ... import tiny
from ...layers.decoder import DecoderConfig
from .model import Glm4

# The added tokens of GLM-4-0414, in the hub's order (ids 151329...).
SPECIAL_TOKENS = [
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>", "<|assistant|>",
    "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>",
]

# GLM-4's pre-tokenizer: numbers in groups of up to three digits.
GLM_PRETOKENIZE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

# The chat template of THUDM/GLM-4-9B-0414 (tokenizer_config.json).
CHAT_TEMPLATE = """[gMASK]<sop>
{%- if tools -%}
<|system|>
你是一个名为 ChatGLM 的人工智能助手。你是基于智谱 AI 公司训练的语言模型 GLM-4 模型开发的，你的任务是针对用户的问题和要求提供适当的答复和支持。

# 可用工具
{%- for tool in tools %}
    {%- set function = tool.function if tool.get("function") else tool %}

## {{ function.name }}

{{ function | tojson(indent=4, ensure_ascii=False) }}
在调用上述函数时，请使用 Json 格式表示调用的参数。
{%- endfor %}
{%- endif -%}

{%- for msg in messages %}
    {%- if msg.role == 'system' %}
<|system|>
{{ msg.content }}
    {%- endif %}
{%- endfor %}

{%- for message in messages if message.role != 'system' %}
    {%- set role = message['role'] %}
    {%- set content = message['content'] %}
    {%- set meta = message.get("metadata", "") %}

    {%- if role == 'user' %}
<|user|>
{{ content }}
    {%- elif role == 'assistant' and not meta %}
<|assistant|>
{{ content }}
    {%- elif role == 'assistant' and meta %}
<|assistant|>{{ meta }}
{{ content }}
    {%- elif role == 'observation' %}
<|observation|>
{{ content }}
    {%- endif %}
{%- endfor %}
{% if add_generation_prompt %}<|assistant|>{% endif %}"""
# GLM-Z1's template: as GLM-4's, but the generation prompt opens the reasoning (tests of thinking models).
Z1_CHAT_TEMPLATE = CHAT_TEMPLATE.replace("{% if add_generation_prompt %}<|assistant|>{% endif %}",
                                         "{% if add_generation_prompt %}<|assistant|>\n<think>{% endif %}")

TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, partial_rotary_factor=0.5, rms_norm_eps=1e-5, rope_theta=10000.0, attention_bias=True,
            max_position_embeddings=4096)


def write_tiny(out_dir: Path, seed: int = 0, text: dict[str, Any] | None = None,
               generation: dict[str, Any] | None = None, chat_template: str = CHAT_TEMPLATE,
               shard_bytes: int | None = None) -> Path:
    """Write config, weights, tokenizer, template and generation config into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = tiny.train_bpe(SPECIAL_TOKENS, pattern=GLM_PRETOKENIZE)
    tok.save(str(out_dir / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    eos = [ids["<|endoftext|>"], ids["<|user|>"], ids["<|observation|>"]]
    config = {
        "architectures": ["Glm4ForCausalLM"], "model_type": "glm4", **TEXT, **(text or {}), "hidden_act": "silu",
        "vocab_size": tok.get_vocab_size(), "tie_word_embeddings": False, "attention_dropout": 0.0,
        "initializer_range": 0.02, "use_cache": True, "torch_dtype": "float32", "pad_token_id": ids["<|endoftext|>"],
        "eos_token_id": eos,
    }
    tiny.write_json(out_dir / "config.json", config)
    model = Glm4(DecoderConfig.from_dict(config), config["attention_bias"])
    tiny.randomize(model, seed)
    tiny.save_weights(model, out_dir, shard_bytes=shard_bytes)
    tiny.write_json(out_dir / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": config["max_position_embeddings"],
        "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "padding_side": "left",
        "clean_up_tokenization_spaces": False, "do_lower_case": False, "remove_space": False,
        "model_input_names": ["input_ids", "attention_mask"], "added_tokens_decoder": tiny.added_tokens_decoder(tok),
        "chat_template": chat_template,
    })
    tiny.write_json(out_dir / "generation_config.json", {
        "eos_token_id": eos, "pad_token_id": ids["<|endoftext|>"], "do_sample": True, "temperature": 0.8,
        "top_p": 0.8, **(generation or {}),
    })
    return out_dir

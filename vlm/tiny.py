"""Tiny random checkpoints in the hub's layout, for tests and for the offline demo.

`write(family, out_dir)` dispatches to the family's `write_tiny`. The helpers here train a small
byte-level BPE tokenizer locally and draw random weights that make tests able to fail (every bias
and norm weight drawn, q/k scaled up so attention is sharp).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file
from torch import nn

CORPUS = """\
A cat sits on a red sofa next to a window. Two dogs run across the green grass in the park.
The picture shows a man ironing clothes on the back of a yellow taxi in a busy street.
What is in this image? Describe the video. How many people are there? The answer is 42.
A person flips a pancake in a frying pan; the kitchen is bright and the stove is on.
Mountains, rivers, lakes, trees, clouds, the sky, the sun, the moon and the stars at night.
Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000, boxes (12,34),(56,78) and coordinates [0.5, 0.25].
Ünïcödé, café, naïve, 日本語, 中文, 한국어, emoji 😀🎉👍, math ∑ ∫ √ ≤ ≥, quotes “like this”.
"""

QWEN2_PRETOKENIZE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def train_bpe(special_tokens: list[str], vocab_size: int = 400, pattern: str = QWEN2_PRETOKENIZE):
    """A byte-level BPE tokenizer (Qwen2/GPT style) trained on a small built-in corpus.

    Special tokens are appended after the learned vocabulary, as on the hub.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS.splitlines() * 4, trainer)
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    return tok


def added_tokens_decoder(tok) -> dict[str, Any]:
    """The `added_tokens_decoder` block of tokenizer_config.json."""
    return {
        str(i): {"content": t.content, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": t.special}
        for i, t in sorted(tok.get_added_tokens_decoder().items())
    }


def randomize(model: nn.Module, seed: int, qk_scale: float = 2.5, embed_std: float = 0.1) -> None:
    """Draw every parameter: weights ~ N(0, 1/fan_in), biases and norm offsets non-zero, q/k sharpened."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if p.ndim == 1 and leaf == "weight":  # norm scales
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 1:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name or name.endswith("lm_head.weight"):
                p.copy_(embed_std * torch.randn(p.shape, generator=gen))
            else:
                fan_in = math.prod(p.shape[1:])
                scale = qk_scale if any(k in name for k in ("q_proj", "k_proj", "attn.qkv")) else 1.0
                p.copy_(scale * torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))


def save_weights(model: nn.Module, out_dir: Path, skip: tuple[str, ...] = (), shard_bytes: int | None = None) -> None:
    """Save the state dict under hub names; shard into an index + files when `shard_bytes` is set."""
    tensors = {k: v.contiguous() for k, v in model.state_dict().items() if k not in skip}
    if not shard_bytes:
        save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        return
    shards, current, size = [], {}, 0
    for key, value in tensors.items():
        if current and size + value.numel() * value.element_size() > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = value
        size += value.numel() * value.element_size()
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    write_json(out_dir / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


QWEN_VL_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
]

# The hub template of Qwen/Qwen2-VL-2B-Instruct and Qwen/Qwen2.5-VL-3B-Instruct (chat_template.json).
QWEN_VL_CHAT_TEMPLATE = (
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



def write_qwen_vl(out_dir: Path, build: Callable[[dict[str, Any], dict[str, int]], nn.Module], names: dict[str, str],
                  text: dict[str, Any], vision: dict[str, Any], processor: dict[str, Any],
                  generation: dict[str, Any] | None, seed: int, tie_word_embeddings: bool, shard_bytes: int | None,
                  extra_tokens: tuple[str, ...] = ()) -> Path:
    """A tiny Qwen2-VL / Qwen2.5-VL checkpoint as the hub has them: flat config.json, hub tensor names,
    tokenizer, chat_template.json, preprocessor and generation configs.

    `build(config, token ids)` makes the model; `names` gives its "architecture", "model_type" and
    "processor_class"; `extra_tokens` are special tokens after the shared ones.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = train_bpe(QWEN_VL_SPECIAL_TOKENS + list(extra_tokens))
    tok.save(str(out_dir / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in QWEN_VL_SPECIAL_TOKENS}
    config = _qwen_vl_config(names, text, vision, ids, tok.get_vocab_size(), tie_word_embeddings)
    write_json(out_dir / "config.json", config)
    model = build(config, ids)
    randomize(model, seed)
    save_weights(model, out_dir, skip=("lm_head.weight",) if tie_word_embeddings else (), shard_bytes=shard_bytes)
    write_json(out_dir / "tokenizer_config.json", {
        "tokenizer_class": "Qwen2Tokenizer", "model_max_length": text["max_position_embeddings"],
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
        "errors": "replace", "split_special_tokens": False, "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": added_tokens_decoder(tok),
    })
    write_json(out_dir / "chat_template.json", {"chat_template": QWEN_VL_CHAT_TEMPLATE})
    write_json(out_dir / "preprocessor_config.json", {
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": names["processor_class"],
        "patch_size": vision["patch_size"], "temporal_patch_size": vision["temporal_patch_size"],
        "merge_size": vision["spatial_merge_size"], **processor,
    })
    write_json(out_dir / "generation_config.json", {
        "bos_token_id": ids["<|endoftext|>"], "pad_token_id": ids["<|endoftext|>"], "do_sample": False,
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]], **(generation or {}),
    })
    return out_dir


def _qwen_vl_config(names: dict[str, str], text: dict[str, Any], vision: dict[str, Any], ids: dict[str, int],
                    vocab: int, tie: bool) -> dict[str, Any]:
    """config.json in the hub's flat layout (text fields at top level, rope_scaling with mrope)."""
    text = dict(text)
    section = text.pop("mrope_section")
    vocab = max(vocab, text.pop("vocab_size", vocab))  # a larger embedding than the tokenizer, as on the hub
    return {
        "architectures": [names["architecture"]], "model_type": names["model_type"], **text,
        "hidden_act": "silu", "vocab_size": vocab, "tie_word_embeddings": tie, "torch_dtype": "float32",
        "rope_scaling": {"type": "mrope", "mrope_section": section}, "use_sliding_window": False,
        "sliding_window": text["max_position_embeddings"], "max_window_layers": text["num_hidden_layers"],
        "attention_dropout": 0.0, "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"], "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"], "vision_config": vision,
    }


def write(family: str, out_dir: str | Path, **overrides: Any) -> Path:
    """Write a tiny random checkpoint of `family` into `out_dir` and return the directory."""
    from .families import get_family

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return get_family(family).write_tiny(out, **overrides)

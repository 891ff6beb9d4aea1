"""A tiny random IDEFICS checkpoint in the hub's layout (as HuggingFaceM4/idefics-9b-instruct: flat text config
with nested `vision_config` / `perceiver_config`, hub tensor names, a Llama tokenizer with the image tokens
after its vocabulary, preprocessor_config.json with `image_size`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ... import tiny
from .inputs import END_OF_UTTERANCE, FAKE_TOKEN, IMAGE_TOKEN
from .model import WEIGHT_NAMES, Idefics, IdeficsConfig
from .processor import IDEFICS_STANDARD_MEAN, IDEFICS_STANDARD_STD

TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, rms_norm_eps=1e-6,
            max_position_embeddings=2048, cross_layer_interval=2, qk_layer_norms=True, alpha_type="float",
            alpha_initializer="zeros", use_resampler=True, tie_word_embeddings=False)
VISION = dict(embed_dim=32, image_size=30, patch_size=6, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, hidden_act="gelu", layer_norm_eps=1e-5)
PERCEIVER = dict(resampler_depth=2, resampler_n_heads=2, resampler_head_dim=16, resampler_n_latents=8,
                 qk_layer_norms_perceiver=True)
# Which added tokens get rows in the additional tables: all three, or the image tokens only, with
# <end_of_utterance> inside `vocab_size` (the decoupled lookups must split the ids at either place).
LAYOUTS = {"additional": [FAKE_TOKEN, IMAGE_TOKEN, END_OF_UTTERANCE],
           "end_of_utterance_in_vocab": [END_OF_UTTERANCE, FAKE_TOKEN, IMAGE_TOKEN]}


def write_tiny(out_dir: Path, seed: int = 0, text: dict[str, Any] | None = None, vision: dict[str, Any] | None = None,
               perceiver: dict[str, Any] | None = None, layout: str = "additional",
               shard_bytes: int | None = None) -> Path:
    """Write config, weights, tokenizer, processor and generation config into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    added = LAYOUTS[layout]
    tok = tiny.train_llama_bpe(added)
    tok.save(str(out_dir / "tokenizer.json"))
    additional = 3 if layout == "additional" else 2
    config = {
        "architectures": ["IdeficsForVisionText2Text"], "model_type": "idefics", **TEXT, **(text or {}),
        "hidden_act": "silu", "vocab_size": tok.get_vocab_size() - additional, "additional_vocab_size": additional,
        "dropout": 0.0, "initializer_range": 0.02, "alphas_initializer_range": 0.0, "freeze_text_layers": True,
        "freeze_text_module_exceptions": [], "freeze_lm_head": True, "freeze_vision_layers": True,
        "freeze_vision_module_exceptions": [], "use_cache": True, "torch_dtype": "float32",
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
        "vision_config": {"model_type": "idefics_vision", **VISION, **(vision or {})},
        "perceiver_config": {"model_type": "idefics_perciever", **PERCEIVER, **(perceiver or {})},
    }
    config["perceiver_config"]["use_resampler"] = config["use_resampler"]
    tiny.write_json(out_dir / "config.json", config)

    cfg = IdeficsConfig.from_dict(config)
    model = Idefics(cfg)
    tiny.randomize(model, seed)
    _draw_gates_and_latents(model, seed)
    tied = ("lm_head.base.weight", "lm_head.additional_fc.weight") if cfg.text.tie_word_embeddings else ()
    to_hub = {module: hub for hub, module in WEIGHT_NAMES}
    tiny.save_weights(model, out_dir, skip=tied, shard_bytes=shard_bytes, hub_names=lambda n: to_hub.get(n, n))

    tiny.write_json(out_dir / "tokenizer_config.json", {
        "tokenizer_class": "LlamaTokenizer", "model_max_length": config["max_position_embeddings"], "legacy": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>", "add_bos_token": True,
        "add_eos_token": False, "clean_up_tokenization_spaces": False, "padding_side": "right",
        "additional_special_tokens": added, "added_tokens_decoder": tiny.added_tokens_decoder(tok),
    })
    tiny.write_json(out_dir / "preprocessor_config.json", {
        "image_processor_type": "IdeficsImageProcessor", "processor_class": "IdeficsProcessor",
        "image_size": config["vision_config"]["image_size"], "image_num_channels": 3,
        "image_mean": list(IDEFICS_STANDARD_MEAN), "image_std": list(IDEFICS_STANDARD_STD),
    })
    tiny.write_json(out_dir / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0})
    return out_dir


def _draw_gates_and_latents(model: Idefics, seed: int) -> None:
    """Gates of +-0.5..1.5 (tanh ~ 0.5-0.9: the images matter) and latents ~ N(0, 1), as the reference draws them."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.rsplit(".", 1)[-1].startswith("alpha_"):
                sign = torch.randint(0, 2, p.shape, generator=gen) * 2 - 1
                p.copy_(sign * (0.5 + torch.rand(p.shape, generator=gen)))
            elif name.endswith("latents") or name.endswith("class_embedding"):
                p.copy_(torch.randn(p.shape, generator=gen))

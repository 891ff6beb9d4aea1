"""A tiny random GroupViT checkpoint in the hub layout of nvidia/groupvit-gcc-yfcc (tests, offline demo)."""

from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from tokenizers import decoders, processors

from .model import GroupViT, GroupViTConfig, module_to_hub
from .processor import BOS, END_OF_WORD, EOS, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ClipTokenizer

# config.json as the hub has it (nested sub-configs, pre-transformers#24773 special ids), small sizes.
HUB_CONFIG: dict[str, Any] = {
    "architectures": ["GroupViTModel"],
    "model_type": "groupvit",
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "logit_scale_init_value": 2.6592,
    "output_segmentation": False,
    "projection_dim": 32,
    "projection_intermediate_dim": 64,
    "torch_dtype": "float32",
    "transformers_version": "4.21.0.dev0",
    "text_config": {
        "model_type": "groupvit_text_model", "hidden_act": "quick_gelu", "hidden_size": 32,
        "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "max_position_embeddings": 77,
        "layer_norm_eps": 1e-05, "dropout": 0.0, "attention_dropout": 0.0, "bos_token_id": 0, "eos_token_id": 2,
        "pad_token_id": 1,
    },
    "vision_config": {
        "model_type": "groupvit_vision_model", "hidden_act": "gelu", "hidden_size": 32, "intermediate_size": 64,
        "num_attention_heads": 4, "num_hidden_layers": 3, "depths": [1, 1, 1], "num_group_tokens": [16, 8, 0],
        "num_output_groups": [16, 8, 8], "image_size": 224, "patch_size": 16, "num_channels": 3,
        "layer_norm_eps": 1e-05, "dropout": 0.0, "attention_dropout": 0.0, "assign_eps": 1.0,
        "assign_mlp_ratio": [0.5, 4],
    },
}
PREPROCESSOR_CONFIG: dict[str, Any] = {
    "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(OPENAI_CLIP_MEAN),
    "image_std": list(OPENAI_CLIP_STD), "resample": 3, "size": 224,
}
# Text the tiny BPE learns its merges from: prompt templates and everyday segmentation labels.
CORPUS = """a photo of a {}. a bad photo of a {}. itap of a {}. a origami {}. a photo of the large {}.
a {} in a video game. art of the {}. a photo of the small {}. there is a {} in the scene.
background aeroplane bicycle bird boat bottle bus car cat chair cow dining table dog horse motorbike person
potted plant sheep sofa train tv monitor sky grass tree road building water wall floor ceiling mountain
snow sand sea river bridge window door people man woman child food pizza cake flower field street house
"""


def write_tiny(out_dir: Path, seed: int = 0, **overrides: Any) -> Path:
    """Write a random GroupViT checkpoint to `out_dir` and return it.

    `overrides` replace top-level config.json fields; `text_config` / `vision_config` dicts are merged
    into the nested ones (e.g. `vision_config={"depths": [2, 1]}`).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = train_tokenizer()
    write_tokenizer_files(out, vocab, merges)
    config = copy.deepcopy(HUB_CONFIG)
    config["text_config"]["vocab_size"] = len(vocab)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key].update(value)
        else:
            config[key] = value
    (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2), encoding="utf-8")
    save_weights(random_model(GroupViTConfig.from_dict(config), seed), out / "model.safetensors")
    return out


def random_model(cfg: GroupViTConfig, seed: int) -> GroupViT:
    """A GroupViT whose every tensor (biases, norms, BatchNorm statistics included) is drawn at random."""
    generator = torch.Generator().manual_seed(seed)
    model = GroupViT(cfg)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            noise = torch.randn(tensor.shape, generator=generator)
            if name.endswith("running_var"):
                tensor.copy_(noise.abs() + 0.5)
            elif name.endswith("logit_scale"):
                tensor.fill_(2.6592)
            elif tensor.dim() == 1 and name.endswith("weight"):  # norm scales
                tensor.copy_(1 + 0.1 * noise)
            elif tensor.dim() >= 2 and "embedding" not in name and "group_token" not in name:
                tensor.copy_(noise / tensor[0].numel() ** 0.5)  # variance-preserving for layers
            else:
                tensor.copy_(0.1 * noise)
    return model.eval()


def save_weights(model: GroupViT, path: Path) -> None:
    """model.safetensors with the hub's tensor names, including the tensors inference does not read
    that the hub's checkpoint holds (BatchNorm step counters, text position ids)."""
    from safetensors.torch import save_file

    tensors = {module_to_hub(name): t.contiguous() for name, t in model.state_dict().items()}
    for name in list(tensors):
        if name.endswith(".running_mean"):
            tensors[name.replace(".running_mean", ".num_batches_tracked")] = torch.tensor(0)
    tensors["text_model.embeddings.position_ids"] = torch.arange(model.config.text.max_positions)[None]
    save_file(tensors, str(path), metadata={"format": "pt"})


def train_tokenizer(max_merges: int = 500) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A small CLIP-layout BPE vocabulary learnt from CORPUS: the 256 byte symbols, the same with `</w>`,
    the merges, then <|startoftext|> and <|endoftext|> as the two highest ids (as CLIP's 49406, 49407).
    Words are cut by CLIP's own normaliser and pre-tokeniser; the most frequent pair is merged first,
    ties broken by the pair itself, so the result is the same on every run."""
    backend = ClipTokenizer({BOS: 0, EOS: 1}, []).backend
    words = Counter(word for word, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(CORPUS)))
    pieces = Counter({(*word[:-1], word[-1] + END_OF_WORD): n for word, n in words.items()})
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs = Counter()
        for word, n in pieces.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = max(pairs, key=lambda pair: (pairs[pair], pair))
        merges.append(best)
        pieces = Counter({_merge_pair(word, best): n for word, n in pieces.items()})
    symbols = byte_symbols()
    tokens = symbols + [s + END_OF_WORD for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    return {token: i for i, token in enumerate(dict.fromkeys(tokens))}, merges


def _merge_pair(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    for piece in word:
        if out and (out[-1], piece) == pair:
            out[-1] += piece
        else:
            out.append(piece)
    return tuple(out)


def byte_symbols() -> list[str]:
    """GPT-2/CLIP's printable stand-in for each byte, in CLIP's vocabulary order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def write_tokenizer_files(directory: Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    """vocab.json, merges.txt, tokenizer.json and the special-token configs, in the hub's layout."""
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    backend = ClipTokenizer(vocab, merges).backend
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.RobertaProcessing((EOS, vocab[EOS]), (BOS, vocab[BOS]),
                                                          trim_offsets=False, add_prefix_space=False)
    backend.save(str(directory / "tokenizer.json"))
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (directory / "special_tokens_map.json").write_text(json.dumps(specials, indent=2), encoding="utf-8")
    config = {**specials, "model_max_length": 77, "tokenizer_class": "CLIPTokenizer", "do_lower_case": True}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")

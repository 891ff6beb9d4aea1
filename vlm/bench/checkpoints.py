"""Random-weight checkpoints with the published shapes of real models (configs written from their sizes)."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..checkpoint import read_safetensors_header, read_safetensors_tensor, weight_files
from ..tiny import write as write_tiny


@dataclass(frozen=True)
class ModelSpec:
    family: str
    overrides: dict[str, Any] = field(default_factory=dict)


MODELS = {
    # the tests' tiny config: checks the benchmark itself in seconds
    "qwen2_vl_tiny": ModelSpec("qwen2_vl"),
    "qwen2_5_vl_tiny": ModelSpec("qwen2_5_vl"),
    # Qwen/Qwen2-VL-2B-Instruct
    "qwen2_vl_2b": ModelSpec("qwen2_vl", dict(
        text=dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, mrope_section=[16, 24, 24], vocab_size=151936, max_position_embeddings=32768),
        vision=dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, patch_size=14, spatial_merge_size=2),
        processor=dict(min_pixels=3136, max_pixels=12845056))),
    # Qwen/Qwen2.5-VL-3B-Instruct
    "qwen2_5_vl_3b": ModelSpec("qwen2_5_vl", dict(
        text=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                  num_key_value_heads=2, mrope_section=[16, 24, 24], vocab_size=151936, max_position_embeddings=128000),
        vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                    spatial_merge_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2),
        processor=dict(min_pixels=3136, max_pixels=12845056))),
    # llava-hf/llava-onevision-qwen2-0.5b-ov-hf (SigLIP so400m + Qwen2-0.5B)
    "llava_onevision_0.5b": ModelSpec("llava_onevision", dict(
        text=dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768),
        vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
                    image_size=384, patch_size=14))),
    # decoders of other shapes (tiny vision tower and vocabulary), so a kernel fast on one shape and slow on
    # another shows: a TinyLlama-like width with full multi-head attention, and two layers of Qwen2-7B (its
    # widest matrices)
    "decoder_2048x5632x6": ModelSpec("qwen2_vl", dict(text=dict(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=6, num_attention_heads=16,
        num_key_value_heads=16, mrope_section=[16, 24, 24]))),
    "decoder_3584x18944x2": ModelSpec("qwen2_vl", dict(text=dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=2, num_attention_heads=28,
        num_key_value_heads=4, mrope_section=[16, 24, 24]))),
}

def build_checkpoint(name: str, cache: Path, dtype: str) -> Path:
    """The checkpoint of `name` in `dtype`, written once into `cache` (random weights, real shapes)."""
    target, spec = cache / f"{name}-{dtype}", MODELS[name]
    marker, stamp = target / ".complete", json.dumps(asdict(spec), sort_keys=True)
    if marker.exists() and marker.read_text() == stamp:
        return target
    shutil.rmtree(target, ignore_errors=True)  # absent, unfinished, or written from another spec
    print(f"writing a random {name} checkpoint into {target} (once) ...", flush=True)
    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))  # built in the stored dtype: a 3B model in float32 is 15 GB
    try:
        write_tiny(spec.family, target, **spec.overrides)
    finally:
        torch.set_default_dtype(default)
    if dtype != "float32":
        _convert(target, getattr(torch, dtype))
    marker.write_text(stamp)
    return target


def _convert(directory: Path, dtype: torch.dtype) -> None:
    """Rewrite the weights in `dtype` (as hub checkpoints are stored), recording it in config.json."""
    for file in weight_files(directory):
        header = read_safetensors_header(file)
        tensors = {key: read_safetensors_tensor(file, key, info, dtype) for key, info in header.items()}
        save_file(tensors, str(file), metadata={"format": "pt"})
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    config_path.write_text(json.dumps(config, indent=2))


def weight_bytes(directory: Path) -> int:
    """Bytes of all stored tensors."""
    return sum(_nbytes(info) for file in weight_files(directory) for info in read_safetensors_header(file).values())


def _nbytes(info: dict[str, Any]) -> int:
    begin, end = info["data_offsets"]
    return end - begin

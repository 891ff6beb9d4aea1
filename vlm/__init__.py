"""vlm: vision-language models in plain PyTorch (Qwen2-VL, LLaVA-OneVision, GLM-4.1V, GLM-4, IDEFICS, GroupViT)."""

from __future__ import annotations

import os
from typing import Any

from . import errors
from .generation import GenerationOutput, Sampling

__all__ = ["load", "errors", "GenerationOutput", "Sampling"]


def load(model: str | os.PathLike, device: str = "auto", dtype: Any = "auto", quantization: str | None = None,
         revision: str | None = None):
    """Load a checkpoint (local directory or hub repo id); the family is read from its config.json.

    Returns a ChatPipeline (chat families) or a segmentation pipeline (GroupViT). `quantization` stores the
    language model's linear weights in fewer bits: "int8" (per channel) or "int4" (CPU, groups of 32),
    which read less memory per decoded token, or bitsandbytes' "bnb-nf4" / "bnb-int8" (nf4 also decodes
    faster on CPUs with AVX512-BF16; bnb-int8 only saves memory there). On CPU, float32/bfloat16 linears
    run through this project's kernels (`vlm.kernels`, built on first use) on their plain weights, or where
    those cannot run are packed for oneDNN; either on first use.
    """
    from .checkpoint import config_error, read_config, resolve_device, resolve_dtype
    from .families import detect_family
    from .hub import resolve
    from .layers.linear import fuse_linears, pack_linears
    from .quantize import check_method, quantize

    torch_device = resolve_device(device)
    check_method(quantization, torch_device)
    directory = resolve(model, revision)
    config = read_config(directory)
    family = detect_family(config)
    torch_dtype = resolve_dtype(dtype, torch_device)
    try:
        pipe = family.load(directory, config, torch_device, torch_dtype)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, ZeroDivisionError, OverflowError,
            RecursionError) as exc:  # a field the family reads is missing or malformed
        raise config_error(directory, exc) from exc
    fuse_linears(pipe.model)  # before quantizing, so fused projections are quantized (and run) as one
    if quantization is not None:
        quantize(pipe.model, quantization)
        pipe.clear_caches()
    pack_linears(pipe.model)
    return pipe

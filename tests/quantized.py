"""How far a quantized tiny model lands from bf16, in units of bf16's own distance from fp32."""

from __future__ import annotations

from pathlib import Path

import torch

import vlm
from vlm.model import run_prompt


def teacher_forced_logits(pipe, ids: torch.Tensor) -> torch.Tensor:
    """Logits at every position of `ids` (one forward over the whole sequence), in float32."""
    model = pipe.model
    with torch.inference_mode():
        positions = torch.arange(ids.shape[1])[None].expand(3, -1)
        return model.logits(run_prompt(model, model.embed_tokens(ids[0]), positions)).float()


def closeness_to_bf16(tiny_dir: Path, methods: list[str]) -> dict[str, tuple[float, float]]:
    """method -> (logit RMS error vs bf16 / bf16's vs fp32, top-1 agreement with bf16), teacher-forced over a
    prompt and the fp32 model's greedy answer."""
    f32, b16 = vlm.load(tiny_dir, dtype="float32"), vlm.load(tiny_dir, dtype="bfloat16")
    conv = [{"role": "user", "content": "Describe the picture in detail."}]
    answer = f32.generate(conv, max_new_tokens=64, do_sample=False, repetition_penalty=1.0)[0]
    ids = torch.tensor([f32.tokenizer.encode("A cat sits on a red sofa next to a window. " * 3) + answer.token_ids])
    exact, half = teacher_forced_logits(f32, ids), teacher_forced_logits(b16, ids)
    rms = lambda a, b: (a - b).pow(2).mean().sqrt().item()
    out = {}
    for method in methods:
        quant = teacher_forced_logits(vlm.load(tiny_dir, dtype="bfloat16", quantization=method), ids)
        out[method] = rms(quant, half) / rms(half, exact), (quant.argmax(-1) == half.argmax(-1)).float().mean().item()
    return out

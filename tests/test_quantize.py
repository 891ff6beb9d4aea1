"""Weight-only int8: the language model's linears are swapped, greedy decoding stays close to bf16."""

from __future__ import annotations

import pytest
import torch

import vlm
import vlm.tiny
from vlm.errors import InputError
from vlm.quantize import Int8Linear

STEPS = 24


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return vlm.tiny.write("qwen2_vl", tmp_path_factory.mktemp("q"), text=dict(
        hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
        mrope_section=[8, 12, 12]))


def _teacher_forced_logits(pipe, ids: torch.Tensor) -> torch.Tensor:
    """Logits at every position of `ids` (one forward over the whole sequence), in float32."""
    model = pipe.model
    with torch.inference_mode():
        cache = model.new_cache(1, ids.shape[1])
        positions = torch.arange(ids.shape[1])[None, None].expand(3, 1, -1)
        hidden = model.forward(model.embed_tokens(ids), positions, cache, torch.ones_like(ids, dtype=torch.bool))
        return model.logits(hidden).float()[0]


def test_int8_swaps_only_the_language_model(tiny_dir):
    pipe = vlm.load(tiny_dir, dtype="bfloat16", quantization="int8")
    kinds = {name: type(m) for name, m in pipe.model.named_modules()}
    assert kinds["model.layers.0.self_attn.q_proj"] is Int8Linear and kinds["lm_head"] is Int8Linear
    assert kinds["visual.blocks.0.attn.qkv"] is not Int8Linear  # the vision tower keeps its dtype


def test_int8_stays_close_to_bf16(tiny_dir):
    """Random tiny models are chaotic (bf16 itself agrees with fp32 on only ~93% of top-1 picks here), so
    int8 is held to the size of that noise: logit error at most 3x bf16's, top-1 agreement >= 80%."""
    f32, b16 = vlm.load(tiny_dir, dtype="float32"), vlm.load(tiny_dir, dtype="bfloat16")
    q8 = vlm.load(tiny_dir, dtype="bfloat16", quantization="int8")
    conv = [{"role": "user", "content": "Describe the picture in detail."}]
    answer = f32.generate(conv, max_new_tokens=64, do_sample=False, repetition_penalty=1.0)[0]
    ids = torch.tensor([f32.tokenizer.encode("A cat sits on a red sofa next to a window. " * 3) + answer.token_ids])
    exact, half, quant = (_teacher_forced_logits(p, ids) for p in (f32, b16, q8))
    rms = lambda a, b: (a - b).pow(2).mean().sqrt()
    assert rms(quant, half) <= 3 * rms(half, exact)
    assert (quant.argmax(-1) == half.argmax(-1)).float().mean() >= 0.8
    out = q8.generate(conv, max_new_tokens=STEPS, do_sample=False, repetition_penalty=1.0)[0]
    assert out.finish_reason in ("stop", "length") and out.token_ids


def test_unknown_quantization_and_segmentation_models_are_refused(tiny_dir, tmp_path):
    with pytest.raises(InputError, match="int8"):
        vlm.load(tiny_dir, quantization="int3")
    with pytest.raises(InputError, match="chat models"):
        vlm.load(vlm.tiny.write("groupvit", tmp_path / "g"), quantization="int8")

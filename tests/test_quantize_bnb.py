"""bitsandbytes quantization ("bnb-nf4", "bnb-int8"): the language model's linears are swapped, logits stay
close to bf16, and a missing bitsandbytes is reported as an InputError."""

from __future__ import annotations

import sys

import pytest
import torch

import vlm
import vlm.tiny
from vlm.errors import InputError
from vlm.layers.linear import PackedLinear
from vlm.quantize_bnb import bnb_linear

bnb = pytest.importorskip("bitsandbytes")

METHODS = ("bnb-nf4", "bnb-int8")
LAYERS = {"bnb-nf4": bnb.nn.Linear4bit, "bnb-int8": bnb.nn.Linear8bitLt}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    # hidden and intermediate sizes in whole tiles of bitsandbytes' CPU nf4 kernel (32 outputs x 64 inputs)
    return vlm.tiny.write("qwen2_vl", tmp_path_factory.mktemp("bnb"), text=dict(
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


@pytest.mark.parametrize("method", METHODS)
def test_bnb_swaps_only_the_language_model_and_generates(tiny_dir, method):
    pipe = vlm.load(tiny_dir, dtype="bfloat16", quantization=method)
    kinds = {name: type(m) for name, m in pipe.model.named_modules()}
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"):
        assert kinds[name] is LAYERS[method]
    # the tiny vocabulary (414) is no multiple of 32: bitsandbytes' CPU nf4 kernel cannot hold lm_head
    assert kinds["lm_head"] is (PackedLinear if method == "bnb-nf4" else LAYERS[method])
    assert not any(isinstance(m, LAYERS[method]) for name, m in pipe.model.named_modules()
                   if name.startswith("visual."))  # the vision tower keeps plain/packed linears
    conv = [{"role": "user", "content": "Describe the picture."}]
    out = pipe.generate(conv, max_new_tokens=8, do_sample=False)[0]
    assert out.token_ids and out.finish_reason in ("stop", "length")


def test_bnb_stays_close_to_bf16(tiny_dir):
    """Teacher-forced logit RMS error vs bf16, in units of bf16's own error vs fp32 (random tiny models are
    chaotic, so bf16's noise is the yardstick). Measured here: nf4 16.0x (top-1 agreement with bf16 31%;
    vlm's own int4 gives 13.5x, 40%), int8 2.3x (82%); the bounds leave 1.5x of room."""
    f32, b16 = vlm.load(tiny_dir, dtype="float32"), vlm.load(tiny_dir, dtype="bfloat16")
    conv = [{"role": "user", "content": "Describe the picture in detail."}]
    answer = f32.generate(conv, max_new_tokens=64, do_sample=False, repetition_penalty=1.0)[0]
    ids = torch.tensor([f32.tokenizer.encode("A cat sits on a red sofa next to a window. " * 3) + answer.token_ids])
    exact, half = _teacher_forced_logits(f32, ids), _teacher_forced_logits(b16, ids)
    rms = lambda a, b: (a - b).pow(2).mean().sqrt()
    for method, bound in (("bnb-nf4", 24), ("bnb-int8", 3.5)):
        quant = _teacher_forced_logits(vlm.load(tiny_dir, dtype="bfloat16", quantization=method), ids)
        assert rms(quant, half) <= bound * rms(half, exact), method


def test_missing_bitsandbytes_is_an_input_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    with pytest.raises(InputError, match="pip install bitsandbytes"):
        bnb_linear(torch.nn.Linear(64, 64), "nf4")

"""The VNNI kernels' int8 and int4 layers (vlm/kernels, vlm/quantize_vnni.py): exact arithmetic, packing,
the dequantized path for long inputs, and the fallback to PyTorch's kernels where they cannot be built."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import vlm
import vlm.quantize_vnni
import vlm.tiny
from vlm import kernels
from vlm.layers.linear import matmul, native_bf16_matmul
from vlm.quantize import Int4Linear, Int8Linear
from vlm.quantize_vnni import KERNEL_ROWS, Int4VnniLinear, Int8VnniLinear

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="the VNNI kernels cannot be built or run here")
CLASSES = [Int8VnniLinear, Int4VnniLinear]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _exact(layer, x: torch.Tensor) -> torch.Tensor:
    """What the kernel computes: x rounded to int8 with a scale per 32 inputs (in float32, half to even, as
    the kernel), times the dequantized weight, plus the bias, in float64."""
    blocks = x.float().view(x.shape[0], -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    inverse = torch.full_like(amax, 127).div(amax)  # a true division (127 / tensor takes a reciprocal)
    codes = torch.where(amax > 0, blocks * inverse, 0).round()  # in float32, as the kernel rounds
    activations = (codes.double() * (amax / 127).double()).view(x.shape)
    out = activations @ layer.dequantized(torch.float64).t()
    return out if layer.bias is None else out + layer.bias.double()


def _reference_weight(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Each block of 32 inputs quantized on its own, written plainly: int8 symmetric, int4 with a min."""
    blocks = weight.float().view(weight.shape[0], -1, 32)
    if bits == 8:
        scale = (blocks.abs().amax(-1, keepdim=True) / 127).half().float()
        return ((blocks / scale).round().clamp(-127, 127) * scale).view(weight.shape)
    low = blocks.amin(-1, keepdim=True).half().float()
    scale = ((blocks.amax(-1, keepdim=True) - low) / 15).half().float()
    return (((blocks - low) / scale).round().clamp(0, 15) * scale + low).view(weight.shape)


@needs_kernels
@pytest.mark.parametrize("cls, bits", [(Int8VnniLinear, 8), (Int4VnniLinear, 4)])
@pytest.mark.parametrize("out_features, in_features", [(200, 96), (64, 32), (896, 4864)])
def test_packing_keeps_each_blocks_codes_and_scales(cls, bits, out_features, in_features):
    """Dequantizing the interleaved layout gives back every block's own quantization (rows not a multiple of
    16 included); the weight error is the format's (measured: int8 0.4%, int4 6%)."""
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features)
    layer = cls(linear)
    weight = layer.dequantized(torch.float32)
    assert weight.shape == linear.weight.shape
    torch.testing.assert_close(weight, _reference_weight(linear.weight.detach(), bits), rtol=1e-6, atol=1e-7)
    assert _rel(weight, linear.weight) < (0.005 if bits == 8 else 0.07)


@pytest.mark.parametrize("cls", CLASSES)
def test_chunked_packing_equals_the_whole_matrix(monkeypatch, cls):
    torch.manual_seed(0)
    linear = nn.Linear(64, 200, bias=False)
    whole = cls(linear)
    monkeypatch.setattr(vlm.quantize_vnni, "CHUNK", 64 * 48)  # 48 rows a chunk, the last one partial
    chunked = cls(linear)
    assert torch.equal(whole.codes, chunked.codes) and torch.equal(whole.scales, chunked.scales)


@needs_kernels
@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("rows", [1, 3, 8, 9, KERNEL_ROWS])
@pytest.mark.parametrize("bias", [False, True])
def test_kernel_computes_int8_activations_times_the_codes(cls, rows, bias):
    """float32 inputs: the kernel equals the exact arithmetic to float32 rounding (measured <= 4e-7); bfloat16
    inputs: to the output's bfloat16 rounding. Rows beyond a tile of 8 and output rows beyond a group of 16
    (200 = 12 x 16 + 8) are covered."""
    torch.manual_seed(rows)
    layer = cls(nn.Linear(4864, 200, bias=bias))
    x = torch.randn(rows, 4864)
    with torch.inference_mode():
        assert _rel(layer(x), _exact(layer, x)) < 2e-6
        half = x.bfloat16()
        out = layer(half)
        assert out.dtype == torch.bfloat16 and _rel(out, _exact(layer, half.float())) < 4e-3


@needs_kernels
@pytest.mark.parametrize("cls", CLASSES)
def test_threads_split_rows_without_changing_results(cls):
    torch.manual_seed(0)
    layer, x = cls(nn.Linear(512, 4096)), torch.randn(2, 512)
    op = getattr(torch.ops.vlm_kernels, layer.op_name)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        one, two = (op(x, layer.codes, layer.scales, layer.kernel_bias, layer.out_features, parallel)
                    for parallel in (False, True))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two) and torch.equal(layer(x), one)


@needs_kernels
@pytest.mark.parametrize("cls", CLASSES)
def test_inputs_longer_than_the_kernel_rows_take_the_dequantized_matmul_where_bf16_is_native(cls):
    """Where oneDNN multiplies bfloat16 (AVX512); elsewhere (AVX2) the kernel takes every input."""
    torch.manual_seed(0)
    layer = cls(nn.Linear(256, 96).to(torch.bfloat16))
    with torch.inference_mode():
        long, short = torch.randn(KERNEL_ROWS + 1, 256, dtype=torch.bfloat16), torch.randn(4, KERNEL_ROWS, 256)
        dequantized = torch.equal(layer(long), matmul(long, layer.dequantized(torch.bfloat16), layer.bias))
        assert dequantized == native_bf16_matmul()
        if not dequantized:
            assert _rel(layer(long), _exact(layer, long)) < 4e-3  # the kernel: bf16 rounding of its exact result
        out = layer(short.bfloat16())  # (4, 32, 256): 128 rows in all, flattened before the choice
        assert torch.equal(out, matmul(short.bfloat16(), layer.dequantized(torch.bfloat16), layer.bias)) == dequantized


@pytest.mark.parametrize("flags, chosen", [
    ({"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx2", "fma", "f16c"}, "avx512"),
    ({"avx512f", "avx512bw", "avx512vl", "avx2", "fma", "f16c"}, "avx2"),  # AVX512 without VNNI (Skylake)
    ({"avx2", "fma", "f16c", "sse4_2"}, "avx2"),  # e.g. AMD Zen 3
    ({"avx", "sse4_2"}, None),
])
def test_the_build_takes_the_best_instruction_set_the_cpu_has(monkeypatch, flags, chosen):
    monkeypatch.setattr(kernels, "_cpu_flags", lambda: flags)
    assert kernels.instruction_set() == chosen and kernels.cpu_supported() == (chosen is not None)
    if chosen is not None:
        compiler_flags = kernels.compile_flags()
        assert "-mavx2" in compiler_flags and ("-mavx512vnni" in compiler_flags) == (chosen == "avx512")


def test_without_the_kernels_quantization_uses_pytorchs(monkeypatch, tmp_path):
    """No compiler (the build raises) or VLM_KERNELS=0: available() is False and int8/int4 take aten's layers."""
    from torch.utils import cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setattr(kernels, "cpu_supported", lambda: True)
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    assert not kernels.available()
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setenv("VLM_KERNELS", "0")
    assert not kernels.available()
    directory = vlm.tiny.write("qwen2_vl", tmp_path / "q", text=dict(hidden_size=128, intermediate_size=256,
                                                                      num_attention_heads=2, num_key_value_heads=1,
                                                                      mrope_section=[8, 12, 12], vocab_size=448))
    for method, cls in (("int8", Int8Linear), ("int4", Int4Linear)):
        pipe = vlm.load(directory, dtype="bfloat16", quantization=method)
        assert type(pipe.model.get_submodule("model.layers.0.mlp.down_proj")) is cls
        out = pipe.generate([{"role": "user", "content": "Hi"}], max_new_tokens=4, do_sample=False)[0]
        assert out.token_ids

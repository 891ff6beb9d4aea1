"""PackedLinear: same results as nn.Linear, on the plain weight through the kernels where they run (a few
rows) or F.linear, else packed for oneDNN on first use; skipped where neither is supported."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vlm.layers.linear import (KERNEL_ROWS, PackedLinear, fuse_linears, kernels_take, pack_linears, packing_supported,
                               supported)

pytestmark = pytest.mark.skipif(not packing_supported(torch.float32, torch.device("cpu")),
                                reason="this torch build has no oneDNN")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, KERNEL_ROWS, KERNEL_ROWS + 1, 257])  # the kernels up to KERNEL_ROWS
@pytest.mark.parametrize("bias", [True, False])
# 37: a part of a vector after the whole ones; the rest cross the bounds on rows x row bytes (4 KiB on AVX2, 16 KiB
# on AVX512) under which weight rows are read one at a time: rows of 2085 (bf16 4170 bytes, float32 8340), 4100
# (8200, 16400), 8197 (16394, 32788)
@pytest.mark.parametrize("inputs", [96, 37, 2085, 4100, 8197])
def test_packed_matches_linear(dtype, rows, bias, inputs):
    if not supported(dtype, torch.device("cpu")):
        pytest.skip(f"neither oneDNN nor the kernels take {dtype} here")
    torch.manual_seed(0)
    linear = nn.Linear(inputs, 200, bias=bias).to(dtype)
    x = torch.randn(1, rows, inputs, dtype=dtype)
    expected = linear(x)
    packed = PackedLinear(linear)
    with torch.inference_mode():
        got = packed(x)
    assert got.shape == expected.shape and got.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)
    assert packed.sources == []  # the weights are joined (or packed) once
    if kernels_take(dtype, torch.device("cpu")):
        assert packed.packed is None and packed.weight.data_ptr() == linear.weight.data_ptr()  # no copy
    else:
        assert packed.weight is None and packed.packed is not None


@pytest.mark.parametrize("biases", [(True, True, True), (False, True, False), (False, False, False)])
def test_fused_projections_match_separate_linears(biases):
    torch.manual_seed(1)
    linears = [nn.Linear(32, n, bias=b) for n, b in zip((48, 16, 16), biases)]
    x = torch.randn(3, 5, 32)
    with torch.inference_mode():
        outs = PackedLinear(*linears)(x)
        assert len(outs) == 3
        for out, linear in zip(outs, linears):
            torch.testing.assert_close(out, linear(x), rtol=1e-5, atol=1e-5)
        joined, last = PackedLinear(*linears, outputs=(2, 1))(x)
        torch.testing.assert_close(joined, torch.cat([linears[0](x), linears[1](x)], -1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(last, linears[2](x), rtol=1e-5, atol=1e-5)


def test_attention_and_mlp_fuse_their_projections():
    from vlm.layers.attention import SelfAttention
    from vlm.layers.mlp import GatedMLP

    attention, mlp = SelfAttention(64, 4, 2, 16, layer=0), GatedMLP(64, 96)
    x = torch.randn(1, 3, 64)
    with torch.inference_mode():
        expected = mlp(x), attention.project(x)
        for module in (attention, mlp):
            fuse_linears(module), pack_linears(module)
        assert not hasattr(attention, "q_proj") and isinstance(attention.qkv_proj, PackedLinear)
        assert not hasattr(mlp, "gate_proj") and isinstance(mlp.gate_up_proj, PackedLinear)
        assert isinstance(attention.o_proj, PackedLinear) and isinstance(mlp.down_proj, PackedLinear)
        torch.testing.assert_close(mlp(x), expected[0], rtol=1e-5, atol=1e-5)
        qk, v = attention.project(x)
        assert qk.shape[-1] == (4 + 2) * 16  # queries and keys side by side, rotated together
        for got, want in zip((qk, v), expected[1]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_pack_linears_swaps_only_supported_layers():
    model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 8).to(torch.float16)), nn.LayerNorm(8))
    pack_linears(model)
    assert isinstance(model[0], PackedLinear)
    assert type(model[1][0]) is nn.Linear  # float16: oneDNN packing is not used
    assert isinstance(model[2], nn.LayerNorm)


def test_tied_weights_survive_packing():
    embed = nn.Embedding(50, 16)
    head = nn.Linear(16, 50, bias=False)
    head.weight = embed.weight
    model = nn.ModuleDict({"embed": embed, "head": head})
    pack_linears(model)
    ids = torch.tensor([[3, 7, 9]])
    with torch.inference_mode():
        hidden = model["embed"](ids)
        logits = model["head"](hidden)
        torch.testing.assert_close(logits, hidden @ embed.weight.T)
    assert model["embed"].weight.shape == (50, 16)  # the embedding still holds its table


def test_packing_is_only_for_cpu_float32_and_bfloat16():
    assert not packing_supported(torch.float16, torch.device("cpu"))
    assert not packing_supported(torch.float32, torch.device("meta"))

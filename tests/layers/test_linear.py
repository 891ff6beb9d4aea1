"""Packed (oneDNN) linear layers: same results as nn.Linear, packed on first use, skipped where unsupported."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vlm.layers.linear import PackedLinear, pack_linears, packing_supported

pytestmark = pytest.mark.skipif(not packing_supported(torch.float32, torch.device("cpu")),
                                reason="this torch build has no oneDNN")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 257])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_matches_linear(dtype, rows, bias):
    if not packing_supported(dtype, torch.device("cpu")):
        pytest.skip(f"oneDNN cannot pack {dtype} here")
    torch.manual_seed(0)
    linear = nn.Linear(96, 200, bias=bias).to(dtype)
    x = torch.randn(2, rows, 96, dtype=dtype)
    expected = linear(x)
    packed = PackedLinear(linear)
    with torch.inference_mode():
        got = packed(x)
    assert got.shape == expected.shape and got.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)
    assert packed.weight is None and packed.packed is not None  # the plain weight is released once packed


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

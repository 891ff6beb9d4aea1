"""RMSNorm equals the reference's (transformers' Qwen2RMSNorm) bit for bit, in float32 and bfloat16."""

from __future__ import annotations

import pytest
import torch
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from vlm.layers.norms import RMSNorm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 896), (2, 37, 64), (5, 1536)])
def test_rms_norm_equals_reference(dtype, shape):
    torch.manual_seed(0)
    ours, theirs = RMSNorm(shape[-1], eps=1e-5).to(dtype), Qwen2RMSNorm(shape[-1], eps=1e-5).to(dtype)
    with torch.no_grad():
        ours.weight.normal_()
        theirs.weight.copy_(ours.weight)
        x = (torch.randn(shape) * 4).to(dtype)
        assert torch.equal(ours(x), theirs(x))

"""A decoder layer's step over a few rows (decoding tokens, short prompt chunks) as one compiled call
(`vlm/kernels/decode_layer.cpp`).

Eagerly, a decode step issues some 60 small PyTorch ops per layer (norms, rotary, cache writes, softmax,
masks); at batch 1 on a CPU they cost as much time as reading the weights. The kernel does the whole layer
in one pass over the same weights (plain float32/bfloat16 ones as `PackedLinear` keeps them, or the VNNI
int8/int4 ones), the threads splitting each matrix's rows where that is faster (`vlm.kernels.threads`). It
applies where the layer is exactly the Qwen2-style one (half-split rotary, SiLU MLP, q/k/v and gate/up fused)
on a CPU, without autograd; elsewhere `decode_step` returns None and the eager layer runs.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .attention import Rows, SelfAttention
from .linear import PackedLinear, SplitOutputs, kernels_take
from .mlp import GatedMLP
from .norms import RMSNorm
from ..kernels.threads import ThreadChoice
from ..quantize_vnni import KERNEL_ROWS as QUANTIZED_ROWS
from ..quantize_vnni import Int4VnniLinear, Int8VnniLinear

DENSE, INT8, INT4 = 0, 1, 2  # the kernel's weight formats (vlm/kernels/matvec.h)
# Most rows a dense layer's kernel call takes: the dense kernel reads the weight again for every 4 rows, so
# beyond some rows oneDNN's matmuls (AMX) plus the eager ops win. A whole step of llava_onevision_0.5b (bf16,
# kernel vs eager): 8 rows 93 vs 158 ms, 32 rows 262 vs 319; of qwen2_vl_2b: 8 rows 255 vs 284, 16 rows 412 vs 337.
DENSE_ROWS = 8
@dataclass
class Compiled:
    """A layer's kernel, the most rows it takes, and how it is threaded."""

    kernel: Any
    max_rows: int
    threads: ThreadChoice = field(default_factory=ThreadChoice)


_compiled: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layer -> (dtype and modules, Compiled | None)


def decode_step(layer: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                rows: Rows) -> torch.Tensor | None:
    """The layer's output for the N rows x (1, N, D) of a step through the kernel (each row's k and v written to
    its request's cache), or None where the kernel does not apply. A request's rows are consecutive positions
    of its cache (one when it decodes, a chunk of its prompt otherwise): the kernel writes every row's keys
    before any row attends, so each row sees its request's keys up to itself."""
    count = x.shape[1]
    if x.device.type != "cpu" or torch.is_grad_enabled():
        return None
    compiled = compiled_layer(layer, x.dtype)
    if compiled is None or count > compiled.max_rows or rows.caches[0].data.dtype != x.dtype:
        return None
    index = layer.self_attn.layer
    keys, values, positions = [], [], []
    for cache, n in zip(rows.caches, rows.counts):
        keys += [cache.data[0, index]] * n
        values += [cache.data[1, index]] * n
        positions += range(cache.length, cache.length + n)
    x, cos, sin = (t.reshape(count, 1, t.shape[-1]).contiguous() for t in (x, cos, sin))
    out = compiled.threads.run(lambda parallel: compiled.kernel.forward(x, cos, sin, keys, values, positions, None,
                                                                       parallel))
    return out.view(1, count, -1)


def compiled_layer(layer: nn.Module, dtype: torch.dtype) -> Compiled | None:
    """The layer's kernel form for inputs of `dtype`, built once (again if any of its modules is replaced);
    None where the kernel does not cover the layer."""
    parts = (dtype, *_parts(layer))
    cached = _compiled.get(layer)
    if cached is None or len(cached[0]) != len(parts) or any(a is not b for a, b in zip(cached[0], parts)):
        cached = _compiled[layer] = (parts, _build(layer, dtype))
    return cached[1]


def _parts(layer: nn.Module) -> tuple:
    """The modules the kernel is built from (read from `_modules`: this runs at every step)."""
    modules = layer._modules
    attention, mlp = modules.get("self_attn"), modules.get("mlp")
    inner = {**getattr(attention, "_modules", {}), **getattr(mlp, "_modules", {})}
    return (attention, mlp, modules.get("input_layernorm"), modules.get("post_attention_layernorm"),
            inner.get("qkv_proj"), inner.get("o_proj"), inner.get("gate_up_proj"), inner.get("down_proj"))


def _build(layer: nn.Module, dtype: torch.dtype) -> Compiled | None:
    attention, mlp, input_norm, post_norm, *projections = _parts(layer)
    if (type(attention) is not SelfAttention or type(mlp) is not GatedMLP or mlp.act is not F.silu
            or type(input_norm) is not RMSNorm or type(post_norm) is not RMSNorm or input_norm.eps != post_norm.eps
            or input_norm.weight.dtype != dtype or post_norm.weight.dtype != dtype
            or not kernels_take(dtype, input_norm.weight.device)):
        return None
    linears = [_linear(module, dtype) for module in projections]
    if any(linear is None for linear in linears) or mlp.down_proj.in_features % 16:
        return None
    kernel = torch.classes.vlm_kernels.DecodeLayer(input_norm.weight.detach(), post_norm.weight.detach(),
                                                   input_norm.eps, attention.heads, attention.kv_heads,
                                                   attention.head_dim, *linears)
    quantized = any(isinstance(_unsplit(module), (Int8VnniLinear, Int4VnniLinear)) for module in projections)
    return Compiled(kernel, QUANTIZED_ROWS if quantized else DENSE_ROWS)


def _linear(module: nn.Module | None, dtype: torch.dtype):
    """The kernel's form of a projection: a plain weight of `dtype` or VNNI int8/int4 codes (None: neither)."""
    module = _unsplit(module)
    if isinstance(module, PackedLinear):
        module.prepare()
        weight, bias = module.weight, module.bias
    elif type(module) is nn.Linear:
        weight, bias = module.weight.detach().contiguous(), module.bias
    elif isinstance(module, (Int8VnniLinear, Int4VnniLinear)):
        form = INT8 if isinstance(module, Int8VnniLinear) else INT4
        return torch.classes.vlm_kernels.Linear(form, module.codes, module.scales, module.kernel_bias,
                                                module.out_features)
    else:
        return None
    if weight is None or weight.dtype != dtype:
        return None
    bias = None if bias is None else bias.detach()
    return torch.classes.vlm_kernels.Linear(DENSE, weight, None, bias, weight.shape[0])


def _unsplit(module: nn.Module | None) -> nn.Module | None:
    return module.inner if isinstance(module, SplitOutputs) else module

"""Linear layers whose weights are reordered once into oneDNN's blocked layout (CPU only).

On x86 CPUs, `F.linear` with a plain row-major weight reaches about half the memory bandwidth at batch 1
(decoding) because oneDNN reorders the weight on every call; a weight packed once is read at close to
full speed (about 2x faster decode, and faster prompts too), with the same results. Projections that
read the same input (q/k/v, gate/up) are packed as one matrix, so a layer makes fewer, larger calls.
"""

from __future__ import annotations

import itertools
import threading

import torch
from torch import nn

_PACKING = threading.Lock()


def packing_supported(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether oneDNN can pack weights of `dtype` on `device` (CPU, float32 or bfloat16 with native support)."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def packable(*modules: nn.Module) -> bool:
    """Whether these modules are plain linears over one input that oneDNN can pack together."""
    return all(type(m) is nn.Linear and packing_supported(m.weight.dtype, m.weight.device)
               and m.in_features == modules[0].in_features for m in modules)


class PackedLinear(nn.Module):
    """y = x W^T + b through oneDNN, with W packed on first use (so loading stays a memory map).

    Built from several linears, it runs them as one matmul and returns their outputs as a tuple; `outputs`
    groups neighbouring linears into one output (e.g. (2, 1): q and k together, then v).
    """

    def __init__(self, *linears: nn.Linear, outputs: tuple[int, ...] | None = None):
        super().__init__()
        self.in_features = linears[0].in_features
        bounds = [0, *itertools.accumulate(outputs or [1] * len(linears))]
        self.sizes = [sum(linear.out_features for linear in linears[a:b]) for a, b in zip(bounds, bounds[1:])]
        self.sources = [linear.weight for linear in linears]  # released once packed
        biases = [linear.bias for linear in linears]
        if all(b is None for b in biases):
            self.bias = None
        else:
            weight = linears[0].weight
            self.bias = nn.Parameter(torch.cat([torch.zeros(linear.out_features, dtype=weight.dtype) if b is None
                                                else b.detach() for b, linear in zip(biases, linears)]),
                                     requires_grad=False)
        self.packed: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if self.packed is None:
            with _PACKING:  # two streams may reach a fresh model at once
                if self.packed is None:
                    weight = torch.cat(self.sources) if len(self.sources) > 1 else self.sources[0]
                    self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)
                    self.sources = []  # a tied embedding keeps its own reference
        flat = x.reshape(-1, self.in_features)
        out = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
        out = out.reshape(*x.shape[:-1], out.shape[-1])
        return out if len(self.sizes) == 1 else out.split(self.sizes, dim=-1)


    def as_linear(self) -> nn.Linear:
        """The unpacked linears as one nn.Linear (concatenated outputs), e.g. to quantize them together."""
        if self.packed is not None:
            raise ValueError("as_linear() needs the weights before packing")
        weight = torch.cat(self.sources) if len(self.sources) > 1 else self.sources[0]
        linear = nn.Linear(self.in_features, weight.shape[0], bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(weight.detach(), requires_grad=False)
        if self.bias is not None:
            linear.bias = self.bias
        return linear


class SplitOutputs(nn.Module):
    """Runs `inner` and splits its output into `sizes` (what a fused PackedLinear returns), e.g. quantized q/k/v."""

    def __init__(self, inner: nn.Module, sizes: list[int]):
        super().__init__()
        self.inner, self.sizes = inner, sizes

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.inner(x).split(self.sizes, dim=-1)


def fuse_linears(model: nn.Module) -> None:
    """Let modules with `fuse_projections` fuse theirs (q/k/v, gate/up) where dtype and device allow."""
    for module in list(model.modules()):
        if hasattr(module, "fuse_projections"):
            module.fuse_projections()


def pack_linears(model: nn.Module) -> None:
    """Pack `model`'s remaining plain linears where dtype and device allow (after `fuse_linears`)."""
    targets = [name for name, module in model.named_modules() if packable(module)]
    for name in targets:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, PackedLinear(getattr(parent, leaf)))

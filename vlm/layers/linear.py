"""Linear layers for CPU decoding: this project's kernels on the plain weight, else oneDNN's packed layout.

On x86 CPUs, `F.linear` with a plain row-major weight reaches about half the memory bandwidth at batch 1
(decoding). Where this project's kernels run (`vlm/kernels`: AVX512, with AVX512-BF16 for bfloat16, or AVX2),
a few input rows go through them and longer inputs through `matmul`, both on the plain weight (no second copy,
and the decoder layer's fused decode step reads the same tensor). Elsewhere the weight is reordered once into
oneDNN's blocked layout, which is read at close to full speed (about 2x faster decode, faster prompts too).
Projections that read the same input (q/k/v, gate/up) are joined as one matrix, so a layer makes fewer,
larger calls.
"""

from __future__ import annotations

import functools
import itertools
import threading

import torch
from torch import nn
from torch.nn import functional as F

from .. import hugepages
from ..kernels.threads import ThreadChoice

_PACKING = threading.Lock()
KERNEL_ROWS = 4  # up to this many input rows the kernels beat F.linear (above, oneDNN with AMX is faster)
# ... and for bfloat16 where `matmul` widens it (AVX2; measured on an AMD EPYC: the kernel 2-7x faster at 1-64 rows,
# level at 256)
WIDE_KERNEL_ROWS = 128
WIDE_CHUNK = 1 << 22  # bfloat16 weights widened to float32 at a time by `matmul` (16 MiB)


@functools.cache
def native_bf16_matmul() -> bool:
    """Whether oneDNN multiplies bfloat16 on this CPU (AVX512 and newer); elsewhere PyTorch's own kernel does."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def kernel_rows(dtype: torch.dtype) -> int:
    """Most input rows a dense weight of `dtype` multiplies through the kernels (more go to `matmul`)."""
    return WIDE_KERNEL_ROWS if dtype == torch.bfloat16 and not native_bf16_matmul() else KERNEL_ROWS


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b (attention's scores and mixing); bfloat16 on a CPU without oneDNN's bfloat16 runs in float32 and is
    rounded once, as `matmul` (PyTorch's own bfloat16 matmul there made a 512-token prompt of a 0.5B model 10x
    slower)."""
    if a.dtype != torch.bfloat16 or a.device.type != "cpu" or native_bf16_matmul():
        return a @ b
    return (a.float() @ b.float()).to(a.dtype)


def matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear over many rows. bfloat16 on a CPU without oneDNN's bfloat16 (AVX2) runs in float32, a slice of the
    weight widened at a time, and is rounded once: PyTorch's own bfloat16 matmul there is 5x slower (measured on an
    AMD EPYC with AVX2: 6 vs 30 GFLOP/s at 256 rows)."""
    if x.dtype != torch.bfloat16 or x.device.type != "cpu" or native_bf16_matmul():
        return F.linear(x, weight, bias)
    wide = x.float()
    out = torch.empty(*x.shape[:-1], weight.shape[0], dtype=x.dtype)
    step = max(1, WIDE_CHUNK // weight.shape[1])
    for start in range(0, weight.shape[0], step):
        rows = slice(start, start + step)
        out[..., rows] = F.linear(wide, weight[rows].float(), None if bias is None else bias[rows].float())
    return out


def packing_supported(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether oneDNN can pack weights of `dtype` on `device` (CPU, float32 or bfloat16 with native support)."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def kernels_take(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether this project's kernels multiply dense weights of `dtype` on `device` (built on first use)."""
    from .. import kernels

    if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16) or not kernels.available():
        return False
    return dtype == torch.float32 or kernels.bf16_supported()


def supported(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a `PackedLinear` runs weights of `dtype` on `device` (oneDNN packs them or the kernels take them)."""
    return packing_supported(dtype, device) or kernels_take(dtype, device)


def packable(*modules: nn.Module) -> bool:
    """Whether these modules are plain linears over one input that a `PackedLinear` can run together."""
    return all(type(m) is nn.Linear and supported(m.weight.dtype, m.weight.device)
               and m.in_features == modules[0].in_features for m in modules)


class PackedLinear(nn.Module):
    """y = x W^T + b through the kernels or oneDNN (see the module), prepared on first use (so loading stays
    a memory map): `weight` is then the plain weight, or `packed` oneDNN's.

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
        self.weight: torch.Tensor | None = None
        self.packed: torch.Tensor | None = None
        self.threads = ThreadChoice()

    def prepare(self) -> None:
        """Join the weights (once): on huge pages for the kernels (see `vlm.hugepages`), else packed for oneDNN."""
        if self.weight is not None or self.packed is not None:
            return
        with _PACKING:  # two streams may reach a fresh model at once
            if self.weight is None and self.packed is None:
                first = self.sources[0]
                if kernels_take(first.dtype, first.device):
                    self.weight = self._joined_on_huge_pages()
                else:
                    weight = torch.cat(self.sources) if len(self.sources) > 1 else first
                    self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)
                self.sources = []  # a tied embedding keeps its own reference

    def _joined_on_huge_pages(self) -> torch.Tensor:
        """The weights as one matrix on huge pages. A single weight that is a parameter (e.g. an embedding tied to
        this head) moves there itself, so both read one copy and the original (a memory map) is freed."""
        with torch.inference_mode(False), torch.no_grad():  # a plain tensor, even on a first call in inference
            rows = sum(source.shape[0] for source in self.sources)
            weight = hugepages.empty((rows, self.in_features), self.sources[0].dtype)
            torch.cat([source.detach() for source in self.sources], out=weight)
            if len(self.sources) == 1 and isinstance(self.sources[0], nn.Parameter):
                self.sources[0].data = weight
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        self.prepare()
        flat = x.reshape(-1, self.in_features)
        if self.weight is None:
            out = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
        elif flat.shape[0] <= kernel_rows(flat.dtype):
            flat = flat.contiguous()
            out = self.threads.run(lambda parallel: torch.ops.vlm_kernels.dense_linear(flat, self.weight, self.bias,
                                                                                   parallel))
        else:
            out = matmul(flat, self.weight, self.bias)
        out = out.reshape(*x.shape[:-1], out.shape[-1])
        return out if len(self.sizes) == 1 else out.split(self.sizes, dim=-1)

    def as_linear(self) -> nn.Linear:
        """The unpacked linears as one nn.Linear (concatenated outputs), e.g. to quantize them together."""
        if not self.sources:
            raise ValueError("as_linear() needs the weights before their first use")
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

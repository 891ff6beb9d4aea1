"""Weight-only quantization of a language model's linear layers.

Decoding reads every weight once per token, so fewer bytes per weight mean more tokens/s on a
memory-bound CPU, and less memory. Where this project's kernels build (`vlm/kernels`: AVX512-VNNI or AVX2;
`vlm/quantize_vnni.py`), int8 and int4 use them: a float16 scale per 32 inputs (int4 also a min),
activations rounded to int8 per 32 inputs and integer dot products, as llama.cpp does. Elsewhere PyTorch's
kernels multiply bf16 activations by the codes directly (`torch.ops.aten._weight_int8pack_mm`,
`_weight_int4pack_mm_for_cpu`) in the formats below. The kernels' cost grows with the rows, so longer inputs
(prompts) dequantize the weight once and use the bf16 matmul instead, except with the AVX2 kernels, which
beat that at any length (see `vlm/quantize_vnni.py`).

- "int8": symmetric; PyTorch's path has one scale per output channel (error ~0.5% of a weight row; 0.4%
  with the VNNI kernels' scale per 32 inputs).
- "int4" (CPU only): asymmetric (scale and zero point) per group of 32 inputs, like llama.cpp's Q4_1
  (error ~6% of a weight row); the output head keeps 8 bits. On PyTorch's path, layers whose sizes do not
  fit the kernel's groups and row blocks keep their dtype, and the kernel's packed layout depends on the
  CPU; it is found once by packing a probe.

Fused projections (q/k/v, gate/up; `fuse_linears`) are quantized as one matrix.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable, Iterator

import torch
from torch import nn
from torch.nn import functional as F

from .errors import InputError
from .layers.linear import PackedLinear, SplitOutputs

# Up to this many rows the kernel is faster than dequantize-then-bf16-matmul (Qwen2-VL-sized matrices,
# 2 AVX512 cores: the crossover is at ~20-32 rows for int8, ~64-96 for int4).
INT8_KERNEL_ROWS = 24
INT4_KERNEL_ROWS = 64
# The int8 kernel crashes (segfault, torch 2.14 CPU) for 2, 4, 8... rows when the inputs are not a multiple of
# 16 (IDEFICS' cross-attention reads a vision width that may not be); such layers take the dequantized matmul.
INT8_KERNEL_INPUTS = 16
INT4_GROUP = 32
CHUNK = 1 << 20  # weights quantized at a time: their float32 temporaries (4 MiB) stay in cache


def _kernel_applies(x: torch.Tensor, dtype: torch.dtype, max_rows: int) -> bool:
    return x.shape[0] <= max_rows and x.dtype == dtype == torch.bfloat16 and x.device.type == "cpu"


def _row_chunks(weight: torch.Tensor, multiple: int = 1) -> Iterator[tuple[slice, torch.Tensor]]:
    """(rows, float32 copy of those rows) over `weight`, about CHUNK weights at a time, in whole `multiple`s."""
    rows = max(1, CHUNK // weight.shape[1] // multiple) * multiple
    for start in range(0, weight.shape[0], rows):
        part = slice(start, start + rows)
        yield part, weight[part].to(torch.float32, copy=True)


class Int8Linear(nn.Module):
    """y = x W^T + b with W stored as int8 rows times a per-row scale."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach()
        codes = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
        scales = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
        for rows, chunk in _row_chunks(weight):
            scales[rows] = chunk.abs().amax(dim=1).clamp_(min=1e-8).div_(127.0)
            codes[rows] = chunk.div_(scales[rows, None]).round_().clamp_(-127, 127)
        self.register_buffer("weight_int8", codes)
        self.register_buffer("scales", scales.to(weight.dtype))
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return self.weight_int8.to(dtype).mul_(self.scales[:, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if _kernel_applies(flat, self.scales.dtype, INT8_KERNEL_ROWS) and self.in_features % INT8_KERNEL_INPUTS == 0:
            out = torch.ops.aten._weight_int8pack_mm(flat.contiguous(), self.weight_int8, self.scales)
            out = out if self.bias is None else out + self.bias
        else:
            out = F.linear(flat, self.dequantized(x.dtype), self.bias)
        return out.reshape(*x.shape[:-1], self.out_features)


def _unpack_int4_t(packed: torch.Tensor, block: int, interleaved: bool) -> torch.Tensor:
    """(N, K/2) bytes packed in blocks of `block` rows, each laid out (K, block/2) -> (K, N) codes, transposed.

    A byte holds rows (j, j + block/2) of its block, or (2j, 2j + 1) when `interleaved`."""
    n, k = packed.shape[0], packed.shape[1] * 2
    blocks = packed.view(n // block, k, block // 2).transpose(0, 1).contiguous()  # (K, blocks, block/2)
    return torch.stack([blocks & 15, blocks >> 4], 3 if interleaved else 2).view(k, n)


@lru_cache(maxsize=1)
def _int4_layout() -> tuple[int, bool]:
    """(block, interleaved) of `_convert_weight_to_int4pack_for_cpu` on this CPU, found by packing a probe.

    aten's int4mm_kernel.cpp packs blocks of 64 rows with AVX512, 32 with AVX2, pairs without vectors."""
    codes = torch.randint(0, 16, (128, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    for layout in ((64, False), (32, False), (32, True)):
        if packed.shape == (128, 32) and torch.equal(_unpack_int4_t(packed, *layout), codes.t().to(torch.uint8)):
            return layout
    raise InputError("quantization='int4': this PyTorch build packs int4 weights in an unknown layout; "
                     "use quantization='int8'.")


class Int4Linear(nn.Module):
    """y = x W^T + b with W stored as 4-bit codes, a scale and a zero point per group of 32 inputs."""

    def __init__(self, linear: nn.Linear, group: int = INT4_GROUP):
        super().__init__()
        out_features, in_features = linear.weight.shape
        self.block, self.interleaved = _int4_layout()
        if in_features % group or out_features % self.block:
            raise InputError(f"Int4Linear needs in_features % {group} == 0 and out_features % {self.block} == 0, "
                             f"not {in_features} and {out_features}.")
        weight = linear.weight.detach()
        packed = torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=weight.device)
        # the kernel computes (code - 8) * scale + zero, so zero = low + 8 * scale; layout (groups, out, 2)
        scales_zeros = torch.empty(in_features // group, out_features, 2, dtype=torch.bfloat16, device=weight.device)
        for rows, chunk in _row_chunks(weight, self.block):
            groups = chunk.view(chunk.shape[0], -1, group)
            low, high = groups.amin(-1), groups.amax(-1)
            scales = (high - low).clamp_(min=1e-8).div_(15)
            codes = groups.sub_(low[..., None]).div_(scales[..., None]).round_().clamp_(0, 15)
            packed[rows] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                codes.view(chunk.shape).to(torch.int32), 1)
            scales_zeros[:, rows] = torch.stack([scales, low + 8 * scales], -1).transpose(0, 1)
        self.register_buffer("weight_int4", packed)
        self.register_buffer("scales_zeros", scales_zeros)
        self.bias = linear.bias
        self.group, self.in_features, self.out_features = group, in_features, out_features

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The (out, in) weight the kernel multiplies by, (code - 8) * scale + zero, rounded once to `dtype`;
        a transposed view (the packing is blocked by output rows, so W^T is the cheap layout)."""
        codes = _unpack_int4_t(self.weight_int4, self.block, self.interleaved).view(torch.int8).sub_(8).to(dtype)
        scales_zeros = self.scales_zeros.to(dtype)
        scales, zeros = scales_zeros[:, None, :, 0].contiguous(), scales_zeros[:, None, :, 1].contiguous()
        weight_t = codes.view(-1, self.group, self.out_features)  # (groups, group, out)
        return torch.addcmul(zeros, weight_t, scales, out=weight_t).view(self.in_features, self.out_features).t()

    def _kernel(self, flat: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(flat.contiguous(), self.weight_int4, self.group,
                                                          self.scales_zeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if _kernel_applies(flat, torch.bfloat16, INT4_KERNEL_ROWS):
            out = self._kernel(flat)
            out = out if self.bias is None else out + self.bias
        else:
            out = F.linear(flat, self.dequantized(x.dtype), self.bias)
        return out.reshape(*x.shape[:-1], self.out_features)


def _vnni(linear: nn.Linear) -> bool:
    """Whether this project's kernels (VNNI or AVX2) take `linear` (built on first use; see vlm/kernels)."""
    from . import kernels
    from .quantize_vnni import fits

    return linear.weight.device.type == "cpu" and fits(linear) and kernels.available()


def _int8(linear: nn.Linear) -> nn.Module:
    if _vnni(linear):
        from .quantize_vnni import Int8VnniLinear

        return Int8VnniLinear(linear)
    return Int8Linear(linear)


def _int4(linear: nn.Linear) -> nn.Module:
    if _vnni(linear):
        from .quantize_vnni import Int4VnniLinear

        return Int4VnniLinear(linear)
    if linear.in_features % INT4_GROUP or linear.out_features % _int4_layout()[0]:
        return linear  # no whole groups or row blocks: the layer keeps its dtype
    return Int4Linear(linear)


def _bitsandbytes(method: str) -> Callable[[nn.Linear], nn.Module]:
    def make(linear: nn.Linear) -> nn.Module:
        from .quantize_bnb import bnb_linear  # bitsandbytes is imported only when asked for

        return bnb_linear(linear, method)

    return make


METHODS: dict[str, Callable[[nn.Linear], nn.Module]] = {
    "int8": _int8, "int4": _int4, "bnb-int8": _bitsandbytes("int8"), "bnb-nf4": _bitsandbytes("nf4"),
}


HEAD_METHODS = {"int4": "int8"}  # method -> the output head's


def check_method(method: str | None, device: torch.device | None = None) -> None:
    if method is not None and method not in METHODS:
        raise InputError(f"quantization={method!r} is not supported; use one of {', '.join(METHODS)} or None.")
    if method == "int4" and device is not None and device.type != "cpu":
        raise InputError("quantization='int4' runs on CPU only; on a GPU use bnb-nf4 or bnb-int8.")
    if method == "int4":
        from . import kernels

        if not kernels.available():
            _int4_layout()  # refuses early when this build's packing is unknown


def quantize(model: nn.Module, method: str) -> None:
    """Replace the language model's linears (names under `model.language_modules`), fused ones (q/k/v,
    gate/up) as one matrix. With "int4" the output head keeps 8 bits, as llama.cpp's 4-bit formats do: it is
    the largest matrix of a small model and its errors go straight into the logits."""
    check_method(method)
    prefixes = getattr(model, "language_modules", None)
    if prefixes is None:
        raise InputError(f"quantization applies to chat models, not to {type(model).__name__}.")
    targets = [name for name, module in model.named_modules()
               if isinstance(module, (nn.Linear, PackedLinear)) and name.startswith(prefixes)]
    for name in targets:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        module = getattr(parent, leaf)
        linear = module.as_linear() if isinstance(module, PackedLinear) else module
        quantized = METHODS[HEAD_METHODS.get(method, method) if leaf == "lm_head" else method](linear)
        if quantized is linear:
            continue  # the layer keeps its dtype
        if isinstance(module, PackedLinear) and len(module.sizes) > 1:
            quantized = SplitOutputs(quantized, module.sizes)
        setattr(parent, leaf, quantized)

"""int8 and int4 weights in the layout of this project's kernels (`vlm/kernels`: VNNI, or AVX2 on the same
layout), used when they build.

Both keep a float16 scale per 32 inputs of a row (int4 also a min: w = scale * code + min), like llama.cpp's
Q8_0 and Q4_1, and are stored 16 rows interleaved (see vlm/kernels/matvec.h), the codes on huge pages. Up to
`KERNEL_ROWS` input rows (decoding, a batch of decode rows) the kernel multiplies int8-quantized activations by
the codes; longer inputs (prompts) dequantize the weight (in C++, per call) and use the float matmul, except
where oneDNN has no bfloat16 matmul (AVX2): there the kernel takes every input (measured on an AMD EPYC, 256 to
1024 rows: 78-119 GFLOP/s, dequantize-then-matmul 35-63).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from . import hugepages
from .kernels.threads import ThreadChoice
from .layers.linear import matmul, native_bf16_matmul

BLOCK = 32  # inputs per scale
ROWS = 16  # rows interleaved
KERNEL_ROWS = 32  # up to this many input rows the kernel beats dequantize-then-matmul (2 AVX512 cores)
CHUNK = 1 << 20  # weights quantized at a time


def fits(linear: nn.Linear) -> bool:
    return linear.in_features % BLOCK == 0


def _row_chunks(weight: torch.Tensor):
    """(start, float32 rows padded to a multiple of ROWS) over `weight`, about CHUNK weights at a time."""
    rows = max(1, CHUNK // weight.shape[1] // ROWS) * ROWS
    for start in range(0, weight.shape[0], rows):
        chunk = weight[start:start + rows].to(torch.float32, copy=True)
        pad = -chunk.shape[0] % ROWS
        yield start, F.pad(chunk, (0, 0, 0, pad))


def _divisor(scales: torch.Tensor) -> torch.Tensor:
    """float16 scales as float32 divisors for their blocks (1 where a block is constant: any code then works)."""
    return torch.where(scales > 0, scales.float(), 1)[..., None]


class _VnniLinear(nn.Module):
    """Common part: the (padded) row groups, bias in float32 for the kernel, the kernel or dequantized path."""

    op_name = ""
    bytes_per_weight = 1.0

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        if not fits(linear):
            raise ValueError(f"in_features must be a multiple of {BLOCK}, not {linear.in_features}")
        groups, blocks = -(-self.out_features // ROWS), self.in_features // BLOCK
        weight = linear.weight.detach()
        codes = hugepages.empty((groups, int(self.in_features * ROWS * self.bytes_per_weight)), torch.uint8)
        scales = torch.empty(groups, blocks, self.scale_planes * ROWS, dtype=torch.float16)
        for start, chunk in _row_chunks(weight):
            part = slice(start // ROWS, start // ROWS + chunk.shape[0] // ROWS)
            codes[part], scales[part] = self.pack(chunk.view(-1, ROWS, blocks, BLOCK))
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)
        self.bias = linear.bias
        self.kernel_bias = None if linear.bias is None else linear.bias.detach().float()
        self.threads = ThreadChoice()

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight (out_features, in_features) in `dtype`: each value in float32 (int8: (code - 128) * scale,
        int4: code * scale + min), then rounded once to bfloat16 or widened."""
        exact = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
        op = getattr(torch.ops.vlm_kernels, self.op_name.replace("linear", "dequantize"))
        return op(self.codes, self.scales, self.out_features, exact).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if x.device.type == "cpu" and (flat.shape[0] <= KERNEL_ROWS or not native_bf16_matmul()):
            op = getattr(torch.ops.vlm_kernels, self.op_name)
            flat = flat.contiguous()
            out = self.threads.run(lambda parallel: op(flat, self.codes, self.scales, self.kernel_bias,
                                                    self.out_features, parallel))
        else:
            out = matmul(flat, self.dequantized(x.dtype), self.bias)
        return out.reshape(*x.shape[:-1], self.out_features)


class Int8VnniLinear(_VnniLinear):
    """y = x W^T + b, W as int8 codes and a float16 scale per 32 inputs (Q8_0's format)."""

    op_name, bytes_per_weight, scale_planes = "int8_linear", 1.0, 1

    @staticmethod
    def pack(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(groups, ROWS, blocks, BLOCK) float32 -> codes (groups, K * ROWS), scales (groups, blocks, ROWS)."""
        scales = (blocks.abs().amax(-1) / 127).half()
        codes = (blocks / _divisor(scales)).round_().clamp_(-127, 127).add_(128).to(torch.uint8)
        codes = codes.view(codes.shape[0], ROWS, -1, 4).transpose(1, 2)  # (groups, K/4, ROWS, 4)
        return codes.reshape(codes.shape[0], -1), scales.transpose(1, 2)


class Int4VnniLinear(_VnniLinear):
    """y = x W^T + b, W as 4-bit codes with a float16 scale and min per 32 inputs (Q4_1's format)."""

    op_name, bytes_per_weight, scale_planes = "int4_linear", 0.5, 2

    @staticmethod
    def pack(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(groups, ROWS, blocks, BLOCK) float32 -> codes (groups, K * ROWS / 2), scales (groups, blocks, 2 ROWS)."""
        low = blocks.amin(-1).half()
        scales = ((blocks.amax(-1) - low.float()) / 15).half()
        codes = ((blocks - low.float()[..., None]) / _divisor(scales)).round_().clamp_(0, 15).to(torch.uint8)
        codes = codes.view(codes.shape[0], ROWS, -1, 2, 4).permute(0, 2, 1, 3, 4)  # (groups, K/8, ROWS, 2, 4)
        packed = codes[..., 0, :] | codes[..., 1, :] << 4
        return packed.reshape(packed.shape[0], -1), torch.cat([scales, low], 1).transpose(1, 2)

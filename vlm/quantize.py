"""Weight-only int8 quantization of a language model's linear layers (per output channel, symmetric).

Decoding reads every weight once per token, so halving the bytes of bf16 weights nearly doubles
tokens/s on a memory-bound CPU; `torch.ops.aten._weight_int8pack_mm` multiplies int8 weights by
bf16 activations directly. Prompts (many rows at once) dequantize and use the bf16 matmul instead.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .errors import InputError

METHODS = ("int8",)
DECODE_ROWS = 8  # up to this many rows, the int8 kernel beats dequantize-then-matmul


class Int8Linear(nn.Module):
    """y = x W^T + b with W stored as int8 rows times a per-row scale."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        scales = weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        self.register_buffer("weight_int8", (weight / scales[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(linear.weight.dtype))
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if flat.shape[0] <= DECODE_ROWS and flat.dtype == self.scales.dtype == torch.bfloat16 \
                and flat.device.type == "cpu":
            out = torch.ops.aten._weight_int8pack_mm(flat.contiguous(), self.weight_int8, self.scales)
            out = out if self.bias is None else out + self.bias
        else:
            weight = self.weight_int8.to(x.dtype) * self.scales[:, None].to(x.dtype)
            out = F.linear(flat, weight, self.bias)
        return out.reshape(*x.shape[:-1], self.out_features)


def check_method(method: str | None) -> None:
    if method is not None and method not in METHODS:
        raise InputError(f"quantization={method!r} is not supported; use one of {', '.join(METHODS)} or None.")


def quantize(model: nn.Module, method: str) -> None:
    """Replace the language model's nn.Linear modules (names under `model.language_modules`)."""
    check_method(method)
    prefixes = getattr(model, "language_modules", None)
    if prefixes is None:
        raise InputError(f"quantization applies to chat models, not to {type(model).__name__}.")
    targets = [name for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and name.startswith(prefixes)]
    for name in targets:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, Int8Linear(getattr(parent, leaf)))

"""bitsandbytes quantization of the language model's linears (`vlm.load(..., quantization="bnb-nf4" | "bnb-int8")`).

- "nf4": 4-bit NormalFloat codes with one scale per block of 64 weights (QLoRA's format, scales double
  quantized), computed in the layer's dtype. About 0.53 byte per weight on CPU, where bitsandbytes repacks
  the weight for an AVX512-BF16 kernel on first use (and undoes the double quantization); a layer whose
  shape has no whole 32 x 64 tiles keeps its dtype there. Logit error on a random tiny model: ~16x bf16's.
- "int8": LLM.int8(), int8 weights with one scale per output row, 1 byte per weight. Activations are cast
  to float16 and quantized per row, except input columns holding a value above 6.0 (transformers'
  default outlier threshold, which works on CPU too), multiplied in float16. Logit error: ~2.3x bf16's.

On CPU both save memory; only nf4 is also faster, and only when decoding on a CPU with AVX512-BF16.
Per call, bf16 activations, weights read from memory (24 distinct layers, as in decoding), on 2 cores
of an AMD EPYC with AVX512-BF16:

    layer (out x in), rows     packed bf16   bnb nf4   bnb int8
    4864 x 896, 1              0.34 ms       0.14 ms   0.44 ms
    896 x 4864, 1              0.35 ms       0.14 ms   0.34 ms
    1536 x 1536, 1             0.22 ms       0.11 ms   0.30 ms
    4864 x 896, 64 (prompt)    1.5 ms        2.2 ms    1.7 ms

A layer left in training mode takes bitsandbytes' dequantizing paths (4864 x 896, 1 row: nf4 0.8 ms,
int8 2.7 ms), so the layers are returned in eval mode. On a GPU the weight is quantized as it moves to
the device, bitsandbytes' documented path (not tested here).
"""

from __future__ import annotations

import logging
from types import ModuleType

from torch import nn

from .errors import InputError

INT8_THRESHOLD = 6.0
NF4_CPU_TILE = (32, 64)  # bitsandbytes' CPU kernel packs nf4 weights in tiles of 32 outputs x 64 inputs


def _not_cast_notice(record: logging.LogRecord) -> bool:
    """Drops bitsandbytes' notice, logged on every int8 matmul, that bf16 inputs are cast to float16."""
    return not record.getMessage().startswith("MatMul8bitLt: inputs will be cast")


def _import_bnb() -> ModuleType:
    try:
        import bitsandbytes
    except Exception as error:  # missing, or a broken install (wrong CUDA libraries, ...)
        raise InputError(f"quantization='bnb-...' needs bitsandbytes, which could not be imported ({error}); "
                         "install it with `pip install bitsandbytes`, or use quantization='int8' or 'int4'.") from error
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(_not_cast_notice)  # added once
    return bitsandbytes


def bnb_linear(linear: nn.Linear, method: str) -> nn.Module:
    """A bitsandbytes layer computing `linear` with its weight quantized ("nf4" or "int8"), in eval mode."""
    bnb = _import_bnb()
    # bitsandbytes quantizes a CPU weight as it moves to `device` (Int8Params only when it starts on CPU)
    weight, device = linear.weight.detach().cpu(), linear.weight.device
    has_bias = linear.bias is not None
    if method == "nf4":
        if device.type == "cpu" and (linear.out_features % NF4_CPU_TILE[0] or linear.in_features % NF4_CPU_TILE[1]):
            return linear  # no whole tiles (bitsandbytes would fail an assertion on first use): keep the dtype
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, has_bias, compute_dtype=weight.dtype,
                                  compress_statistics=True, quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                         module=layer).to(device)
    elif method == "int8":
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, has_bias, has_fp16_weights=False,
                                    threshold=INT8_THRESHOLD, device="meta")
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False).to(device)
    else:
        raise InputError(f"bitsandbytes method {method!r} is not supported; use 'nf4' or 'int8'.")
    layer.bias = linear.bias
    return layer.eval()

"""The decoder layer's compiled decode step (vlm/layers/fused_decode.py) equals the eager layer: outputs and
the keys and values it writes, in float32, bfloat16 and the VNNI int8/int4 formats, for requests of different
lengths decoding together and long caches; layers it does not cover run eagerly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vlm import kernels
from vlm.layers import decoder, fused_decode
from vlm.layers.attention import CacheSpec, Rows, SelfAttention
from vlm.layers.decoder import DecoderConfig, DecoderLayer
from vlm.layers.linear import PackedLinear, SplitOutputs, fuse_linears, pack_linears
from vlm.layers.rotary import Rotary
from vlm.quantize import METHODS

pytestmark = pytest.mark.skipif(not kernels.available(), reason="the kernels cannot be built or run here")

CFG = DecoderConfig(vocab_size=100, hidden_size=128, intermediate_size=192, num_layers=1, num_heads=4, num_kv_heads=2,
                    head_dim=32, rms_norm_eps=1e-6, rope={}, tie_word_embeddings=False)
PROJECTIONS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


def _layer(dtype: torch.dtype, quantization: str | None = None) -> DecoderLayer:
    """A layer with random weights (std 0.2), fused and packed as `vlm.load` prepares it."""
    torch.manual_seed(0)
    layer = DecoderLayer(CFG, 0)
    for parameter in layer.parameters():
        parameter.data.normal_(0, 0.2)
    layer = layer.to(dtype)
    fuse_linears(layer)
    if quantization:
        for name in PROJECTIONS:
            _replace(layer, name, lambda module: METHODS[quantization](
                module.as_linear() if isinstance(module, PackedLinear) else module))
    pack_linears(layer)
    return layer


def _replace(layer: nn.Module, name: str, make) -> None:
    parent, leaf = name.rsplit(".", 1)
    module = layer.get_submodule(name)
    new = make(module)
    if isinstance(module, PackedLinear) and len(module.sizes) > 1:
        new = SplitOutputs(new, module.sizes)
    setattr(layer.get_submodule(parent), leaf, new)


def _decode(layer: DecoderLayer, dtype: torch.dtype, batch: int, prefix: int, steps: int = 4):
    """`batch` requests with prompts of different lengths (`prefix`, then 2 fewer each; eager, each request
    on its own), then `steps` steps where every request decodes one token together: their outputs and caches."""
    rotary = Rotary(CFG.head_dim, 10000.0)
    spec = CacheSpec(1, CFG.num_kv_heads, CFG.head_dim, dtype, torch.device("cpu"))
    lengths = [max(1, prefix - 2 * i) for i in range(batch)]
    caches = [spec.new(length + steps) for length in lengths]
    generator = torch.Generator().manual_seed(1)
    outs = []
    with torch.inference_mode():
        for cache, length in zip(caches, lengths):
            x = torch.randn(1, length, CFG.hidden_size, generator=generator).to(dtype)
            _step(layer, rotary, x, torch.arange(length)[None], [cache], [length], dtype)
        for _ in range(steps):
            x = torch.randn(1, batch, CFG.hidden_size, generator=generator).to(dtype)
            positions = torch.tensor([[cache.length for cache in caches]])
            outs.append(_step(layer, rotary, x, positions, caches, [1] * batch, dtype))
    return torch.cat(outs, 1), caches


def _step(layer, rotary, x, positions, caches, counts, dtype):
    """One step of `counts` rows per cache through the layer, as `Decoder.forward` runs it."""
    rows = Rows(caches, counts)
    out = layer(x, *rotary(positions[:, None], dtype), rows)
    rows.commit()
    return out


def _filled(caches) -> torch.Tensor:
    """Every cache's filled keys and values, side by side."""
    return torch.cat([cache.data[..., :cache.length, :].flatten() for cache in caches])


def _eager(monkeypatch, *args):
    with monkeypatch.context() as patch:
        patch.setattr(decoder, "decode_step", lambda *args: None)
        return _decode(*args)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("quantization", [None, "int8", "int4"])
@pytest.mark.parametrize("batch", [1, 3])
def test_decode_step_matches_the_eager_layer(monkeypatch, dtype, quantization, batch):
    """float32: to float32 rounding (measured ~1e-7); bfloat16: to its rounding (measured 3e-3 to 5e-3)."""
    if dtype == torch.bfloat16 and not kernels.bf16_supported():
        pytest.skip("the kernels take no bfloat16 weights here")
    layer = _layer(dtype, quantization)
    fused, fused_cache = _decode(layer, dtype, batch, prefix=7)
    assert fused_decode.compiled_layer(layer, dtype) is not None
    eager, eager_cache = _eager(monkeypatch, layer, dtype, batch, 7)
    tolerance = 1e-5 if dtype == torch.float32 else 1.5e-2
    assert fused.dtype == dtype and _rel(fused, eager) < tolerance
    assert _rel(_filled(fused_cache), _filled(eager_cache)) < tolerance


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("quantization", [None, "int8"])
def test_a_step_of_decodes_and_prompt_chunks_matches_the_eager_layer(monkeypatch, dtype, quantization):
    """As the engine mixes them: two requests decode while a third's prompt is read 3 rows a step."""
    if dtype == torch.bfloat16 and not kernels.bf16_supported():
        pytest.skip("the kernels take no bfloat16 weights here")
    layer = _layer(dtype, quantization)

    def run():
        rotary = Rotary(CFG.head_dim, 10000.0)
        spec = CacheSpec(1, CFG.num_kv_heads, CFG.head_dim, dtype, torch.device("cpu"))
        generator = torch.Generator().manual_seed(2)
        caches, outs = [spec.new(16) for _ in range(3)], []
        with torch.inference_mode():
            for cache, length in zip(caches[:2], (5, 2)):
                x = torch.randn(1, length, CFG.hidden_size, generator=generator).to(dtype)
                _step(layer, rotary, x, torch.arange(length)[None], [cache], [length], dtype)
            for _ in range(3):
                x = torch.randn(1, 5, CFG.hidden_size, generator=generator).to(dtype)
                positions = torch.cat([torch.tensor([caches[0].length, caches[1].length]),
                                       torch.arange(caches[2].length, caches[2].length + 3)])[None]
                outs.append(_step(layer, rotary, x, positions, caches, [1, 1, 3], dtype))
        return torch.cat(outs, 1), caches

    through_kernel = []
    with monkeypatch.context() as patch:
        patch.setattr(decoder, "decode_step",
                      lambda *args: through_kernel.append(fused_decode.decode_step(*args)) or through_kernel[-1])
        fused, fused_caches = run()
    assert len(through_kernel) == 5 and all(out is not None for out in through_kernel)  # 2 prompts, 3 mixed steps
    with monkeypatch.context() as patch:
        patch.setattr(decoder, "decode_step", lambda *args: None)
        eager, eager_caches = run()
    tolerance = 1e-5 if dtype == torch.float32 else 1.5e-2
    assert _rel(fused, eager) < tolerance and _rel(_filled(fused_caches), _filled(eager_caches)) < tolerance


@pytest.mark.parametrize("prefix", [7, 2800])  # 2800: attention too is split (heads x rows x keys > 2^15)
def test_threads_split_the_work_without_changing_results(monkeypatch, prefix):
    layer = _layer(torch.float32)
    threads = torch.get_num_threads()
    outs = {}
    try:
        torch.set_num_threads(2)
        for parallel in (True, False):
            monkeypatch.setattr(fused_decode.ThreadChoice, "choose", lambda self, parallel=parallel: parallel)
            outs[parallel], _ = _decode(layer, torch.float32, 3, prefix)
        eager, _ = _eager(monkeypatch, layer, torch.float32, 3, prefix)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[True], outs[False]) and _rel(outs[True], eager) < 1e-5


class RotatedTwice(SelfAttention):
    def rotate(self, x, cos, sin):
        return super().rotate(super().rotate(x, cos, sin), cos, sin)


def test_layers_the_kernel_does_not_cover_run_eagerly():
    layer = _layer(torch.float32)
    spec = CacheSpec(1, CFG.num_kv_heads, CFG.head_dim, torch.float32, torch.device("cpu"))
    cache = spec.new(8)
    x, cos, sin = torch.randn(1, 1, CFG.hidden_size), torch.ones(1, 1, CFG.head_dim), torch.zeros(1, 1, CFG.head_dim)
    assert fused_decode.decode_step(layer, x, cos, sin, Rows([cache], [1])) is None  # autograd on
    with torch.inference_mode():
        two = x.expand(1, 2, -1), cos.expand(1, 2, -1), sin.expand(1, 2, -1)
        assert fused_decode.decode_step(layer, *two, Rows([cache], [2])) is not None  # a request's two new rows
        many = (t.expand(1, fused_decode.DENSE_ROWS + 1, -1) for t in (x, cos, sin))
        assert fused_decode.decode_step(layer, *many, Rows([cache], [fused_decode.DENSE_ROWS + 1])) is None
        assert fused_decode.decode_step(layer, *two, Rows([cache, spec.new(8)], [1, 1])) is not None
        assert fused_decode.decode_step(layer, x, cos, sin, Rows([cache], [1])) is not None
        assert fused_decode.compiled_layer(layer, torch.bfloat16) is None  # float32 weights, bfloat16 inputs
        other = RotatedTwice(CFG.hidden_size, CFG.num_heads, CFG.num_kv_heads, CFG.head_dim, 0)
        other.fuse_projections()
        layer.self_attn = other  # a family's own rotary
        assert fused_decode.decode_step(layer, x, cos, sin, Rows([cache], [1])) is None


@pytest.mark.parametrize("quantization, fused", [(None, False), ("int8", True)])
def test_dense_layers_leave_more_rows_than_their_kernel_takes_to_oneDNN(quantization, fused):
    """Dense weights: up to DENSE_ROWS rows (beyond, oneDNN's matmuls win); quantized ones: up to
    quantize_vnni.KERNEL_ROWS."""
    rows = fused_decode.DENSE_ROWS + 1
    layer = _layer(torch.float32, quantization)
    spec = CacheSpec(1, CFG.num_kv_heads, CFG.head_dim, torch.float32, torch.device("cpu"))
    x = torch.randn(1, rows, CFG.hidden_size)
    cos, sin = torch.ones(1, rows, CFG.head_dim), torch.zeros(1, rows, CFG.head_dim)
    with torch.inference_mode():
        step = fused_decode.decode_step(layer, x, cos, sin, Rows([spec.new(8) for _ in range(rows)], [1] * rows))
        assert (step is not None) == fused

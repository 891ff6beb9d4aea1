"""Decode attention (a few queries over a long cache) equals SDPA, with GQA, masks and left padding; so does
the CPU path of unmasked (vision) attention."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from vlm.layers import attention
from vlm.layers.attention import SPAN_STEP, KVCache, SelfAttention, cpu_attention, segment_attention


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 4, 16), (14, 2, 64), (6, 3, 32)])
@pytest.mark.parametrize("queries", [1, 3])
def test_cpu_attention_matches_sdpa_with_a_mask(heads, kv_heads, head_dim, queries):
    torch.manual_seed(0)
    batch, length = 2, 37
    q = torch.randn(batch, heads, queries, head_dim)
    k, v = torch.randn(batch, kv_heads, length, head_dim), torch.randn(batch, kv_heads, length, head_dim)
    mask = torch.rand(batch, 1, queries, length) > 0.3
    mask[..., -1] = True  # every query sees at least itself, as KVCache.begin guarantees
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=heads != kv_heads)
    torch.testing.assert_close(cpu_attention(q, k, v, mask), expected, rtol=1e-5, atol=1e-5)


def test_cpu_attention_reads_a_strided_cache_slice():
    """The cache is preallocated, so keys arrive as a slice of a longer buffer."""
    torch.manual_seed(1)
    cache = KVCache(layers=1, batch=2, kv_heads=2, head_dim=8, capacity=300, dtype=torch.float32, device="cpu")
    valid = torch.ones(2, 11, dtype=torch.bool)
    valid[1, :4] = False  # the second row is left-padded
    cache.begin(valid)
    cache.update(0, torch.randn(2, 2, 11, 8), torch.randn(2, 2, 11, 8))
    cache.commit(11)
    mask = cache.begin(torch.ones(2, 1, dtype=torch.bool))
    k, v = cache.update(0, torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8))
    assert not k.is_contiguous() and k.shape[2] == mask.shape[-1] == SPAN_STEP  # 12 keys, then masked slots
    q = torch.randn(2, 6, 1, 8)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(cpu_attention(q, k, v, mask), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads,kv_heads", [(3, 3), (6, 2)])
@pytest.mark.parametrize("causal", [False, True])
def test_cpu_attention_matches_sdpa_across_query_chunks(monkeypatch, heads, kv_heads, causal):
    monkeypatch.setattr(attention, "SCORE_ROWS", 24)  # 8-24 queries per chunk of 50: several and a partial one
    torch.manual_seed(2)
    q, k, v = torch.randn(2, heads, 50, 16), torch.randn(2, kv_heads, 50, 16), torch.randn(2, kv_heads, 50, 16)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    torch.testing.assert_close(cpu_attention(q, k, v, causal=causal), expected, rtol=1e-5, atol=1e-5)


def test_segment_attention_keeps_segments_apart_in_bfloat16():
    """Packed (N, H, D) segments, as the ViTs pass them; bf16 as the reference's eager path computes it."""
    torch.manual_seed(3)
    lengths = [30, 20]
    q, k, v = (torch.randn(sum(lengths), 4, 16, dtype=torch.bfloat16) for _ in range(3))
    out = segment_attention(q, k, v, lengths)
    for segment, start in zip(lengths, (0, lengths[0])):
        qs, ks, vs = (t[start:start + segment].transpose(0, 1) for t in (q, k, v))
        scores = (qs @ ks.transpose(1, 2)) * 16 ** -0.5
        eager = scores.softmax(-1, dtype=torch.float32).to(torch.bfloat16) @ vs
        torch.testing.assert_close(out[start:start + segment], eager.transpose(0, 1), rtol=0.02, atol=0.02)


def test_fresh_unpadded_prompt_runs_plain_causal_attention():
    """A first prompt without padding skips the mask (SDPA's causal path); it must equal the masked path,
    here reached by feeding the same tokens in two chunks."""
    torch.manual_seed(4)
    attn = SelfAttention(dim=32, heads=4, kv_heads=2, head_dim=8, layer=0).eval()
    x, cos, sin = torch.randn(1, 20, 32), torch.randn(1, 20, 8), torch.randn(1, 20, 8)

    def run(chunks):
        cache, outs = KVCache(1, 1, 2, 8, 64, torch.float32, "cpu"), []
        for part in torch.arange(20).split(chunks):
            mask = cache.begin(torch.ones(1, len(part), dtype=torch.bool))
            assert (mask is None) == (part[0] == 0)
            outs.append(attn(x[:, part], cos[:, part], sin[:, part], cache, mask))
            cache.commit(len(part))
        return torch.cat(outs, dim=1)

    with torch.no_grad():
        torch.testing.assert_close(run(20), run(10), rtol=1e-5, atol=1e-5)

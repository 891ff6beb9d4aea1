"""Decode attention (a few queries over a long cache) equals SDPA, with GQA and masks; a step's rows of
several requests attend each over its own cache only; so does the CPU path of unmasked (vision) attention."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from vlm.layers import attention
from vlm.layers.attention import SPAN_STEP, CacheSpec, Rows, SelfAttention, cpu_attention, segment_attention


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 4, 16), (14, 2, 64), (6, 3, 32)])
@pytest.mark.parametrize("queries", [1, 3])
def test_cpu_attention_matches_sdpa_with_a_mask(heads, kv_heads, head_dim, queries):
    torch.manual_seed(0)
    batch, length = 2, 37
    q = torch.randn(batch, heads, queries, head_dim)
    k, v = torch.randn(batch, kv_heads, length, head_dim), torch.randn(batch, kv_heads, length, head_dim)
    mask = torch.rand(batch, 1, queries, length) > 0.3
    mask[..., -1] = True  # every query sees at least itself, as Rows guarantees
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=heads != kv_heads)
    torch.testing.assert_close(cpu_attention(q, k, v, mask), expected, rtol=1e-5, atol=1e-5)


def test_rows_of_several_requests_attend_each_over_its_own_cache():
    """One step: a decode row of a request with 11 cached positions, 5 prompt rows of a fresh one, and 3 rows
    continuing a prompt of 7. Each equals SDPA over that request's keys alone (the span past them is masked)."""
    torch.manual_seed(1)
    spec = CacheSpec(layers=1, kv_heads=2, head_dim=8, dtype=torch.float32, device=torch.device("cpu"))
    caches = [spec.new(300), spec.new(20), spec.new(40)]
    history = [(torch.randn(1, 2, n, 8), torch.randn(1, 2, n, 8)) for n in (11, 0, 7)]
    for cache, (k, v) in zip(caches, history):
        if k.shape[2]:
            Rows([cache], [k.shape[2]]).attend(0, torch.randn(1, 6, k.shape[2], 8), k, v)
            cache.length = k.shape[2]
    counts = [1, 5, 3]
    q, k, v = torch.randn(1, 6, 9, 8), torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8)
    rows = Rows(caches, counts)
    assert rows.plans[0][0] == SPAN_STEP and rows.plans[1][1] is None  # a rounded span; a fresh prompt: causal
    out = rows.attend(0, q, k, v)
    for (old_k, old_v), begin, end in zip(history, rows.offsets, rows.offsets[1:]):
        keys, values = torch.cat([old_k, k[:, :, begin:end]], 2), torch.cat([old_v, v[:, :, begin:end]], 2)
        causal = torch.ones(end - begin, keys.shape[2], dtype=torch.bool).tril(keys.shape[2] - (end - begin))
        expected = F.scaled_dot_product_attention(q[:, :, begin:end], keys, values, attn_mask=causal, enable_gqa=True)
        torch.testing.assert_close(out[:, :, begin:end], expected, rtol=1e-5, atol=1e-5)
    rows.commit()
    assert [c.length for c in caches] == [12, 5, 10]


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


def test_fresh_prompt_runs_plain_causal_attention():
    """A request's first rows skip the mask (the causal path); it must equal the masked path, here reached
    by feeding the same tokens in two chunks."""
    torch.manual_seed(4)
    attn = SelfAttention(dim=32, heads=4, kv_heads=2, head_dim=8, layer=0).eval()
    x, cos, sin = torch.randn(1, 20, 32), torch.randn(1, 20, 8), torch.randn(1, 20, 8)
    spec = CacheSpec(1, 2, 8, torch.float32, torch.device("cpu"))

    def run(chunks):
        cache, outs = spec.new(64), []
        for part in torch.arange(20).split(chunks):
            rows = Rows([cache], [len(part)])
            assert (rows.plans[0][1] is None) == (part[0] == 0)
            outs.append(attn(x[:, part], cos[:, part], sin[:, part], rows))
            rows.commit()
        return torch.cat(outs, dim=1)

    with torch.no_grad():
        torch.testing.assert_close(run(20), run(10), rtol=1e-5, atol=1e-5)

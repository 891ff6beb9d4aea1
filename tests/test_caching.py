"""Reuse across turns: the KV cache of a conversation's beginning and the vision features of its images."""

from __future__ import annotations

import threading

import pytest
import torch

import vlm
import vlm.tiny
from vlm.caching import FeatureCache, Prefix, PrefixPool


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return vlm.tiny.write("qwen2_vl", tmp_path_factory.mktemp("q"))


def _turns(media_dir):
    first = [{"role": "user", "content": [{"type": "image", "path": f"{media_dir}/coco.jpg"},
                                          {"type": "text", "text": "What is in the picture?"}]}]
    return first


def _count_prefill(pipe, monkeypatch):
    """Record how many positions each prefill (the first forward of a generation, one request at a time) runs."""
    runs = []
    forward = pipe.model.forward

    def counting(embeds, positions, rows):
        if embeds.shape[0] > 1:
            runs.append(embeds.shape[0])
        return forward(embeds, positions, rows)

    monkeypatch.setattr(pipe.model, "forward", counting)
    return runs


def test_follow_up_runs_only_its_new_tokens_and_matches_a_fresh_model(tiny_dir, media_dir, monkeypatch):
    pipe = vlm.load(tiny_dir, dtype="float32")
    visual_calls = []
    visual = pipe.model.visual.forward
    monkeypatch.setattr(pipe.model.visual, "forward", lambda *a: visual_calls.append(1) or visual(*a))
    runs = _count_prefill(pipe, monkeypatch)
    first = _turns(media_dir)
    answer = pipe.generate(first, max_new_tokens=8, repetition_penalty=1.0)[0]
    follow_up = first + [{"role": "assistant", "content": answer.text},
                         {"role": "user", "content": "And the colours?"}]
    ours = pipe.generate(follow_up, max_new_tokens=8, repetition_penalty=1.0)[0]
    prompt_length = pipe.encode(follow_up)["input_ids"].shape[1]
    assert runs[0] == pipe.encode(first)["input_ids"].shape[1]
    assert runs[1] < prompt_length // 2  # the image and the first turn came from the cache
    assert len(visual_calls) == 1  # the image was encoded once
    fresh = vlm.load(tiny_dir, dtype="float32").generate(follow_up, max_new_tokens=8, repetition_penalty=1.0)[0]
    assert ours.token_ids == fresh.token_ids


def test_a_different_image_is_not_reused(tiny_dir, media_dir, monkeypatch):
    pipe = vlm.load(tiny_dir, dtype="float32")
    runs = _count_prefill(pipe, monkeypatch)
    ask = lambda image: [{"role": "user", "content": [{"type": "image", "path": f"{media_dir}/{image}"},
                                                      {"type": "text", "text": "What is it?"}]}]
    pipe.generate(ask("coco.jpg"), max_new_tokens=2)
    out = pipe.generate(ask("voc.jpg"), max_new_tokens=4, repetition_penalty=1.0)[0]
    # coco.jpg and voc.jpg have the same size: same placeholder tokens, different pixels
    assert pipe.encode(ask("coco.jpg"))["input_ids"].tolist() == pipe.encode(ask("voc.jpg"))["input_ids"].tolist()
    assert runs[1] < runs[0]  # the system prompt is shared...
    fresh = vlm.load(tiny_dir, dtype="float32").generate(ask("voc.jpg"), max_new_tokens=4, repetition_penalty=1.0)[0]
    assert out.token_ids == fresh.token_ids  # ...but the image's positions are recomputed, not reused


def test_prefix_pool_keeps_the_longest_match_and_is_bounded():
    from vlm.layers.attention import CacheSpec

    pool = PrefixPool(max_entries=2)
    spec = CacheSpec(1, 1, 2, torch.float32, torch.device("cpu"))
    positions = lambda n: torch.arange(n)[None]
    entry = lambda ids, content=None: Prefix(torch.tensor(ids), positions(len(ids)),
                                            torch.tensor(content or [0] * len(ids)), spec.new(16))
    for ids in ([1, 2, 3], [1, 2, 3, 4, 5], [9, 9]):
        pool.put(entry(ids))
    assert pool.nbytes == 2 * spec.nbytes(16)  # the oldest went
    taken = pool.take(torch.tensor([1, 2, 3, 4, 7, 8]), positions(6), torch.zeros(6, dtype=torch.long))
    assert taken is not None and taken[1] == 4 and taken[0].cache.capacity >= 16
    assert pool.take(torch.tensor([1, 2, 3]), positions(3), torch.zeros(3, dtype=torch.long)) is None  # evicted, or taken
    assert pool.take(torch.tensor([9, 9, 1]), positions(3) + 1, torch.zeros(3, dtype=torch.long)) is None  # other positions
    pool.put(entry([5, 6, 6], [0, 7, 7]))
    other_media = pool.take(torch.tensor([5, 6, 6, 1]), positions(4), torch.tensor([0, 8, 8, 0]))
    assert other_media is not None and other_media[1] == 1  # the same tokens over other media: only the text before
    assert pool.evict() and not pool.evict() and pool.nbytes == 0


def test_feature_cache_hits_by_content_and_stays_bounded():
    calls = []
    encode = lambda x: calls.append(1) or x * 2
    cache = FeatureCache(max_bytes=3 * 4 * 100)
    a = torch.ones(100)
    (first, key), (again, same_key) = cache.encode(encode, a), cache.encode(encode, a.clone())
    assert torch.equal(first, a * 2) and torch.equal(again, a * 2) and key == same_key != 0
    assert len(calls) == 1
    assert cache.encode(encode, torch.zeros(100))[1] != key  # other contents, another id
    for i in range(5):
        cache.encode(encode, torch.full((100,), float(i + 2)))
    cache.encode(encode, a)
    assert len(calls) == 8  # `a` was evicted by newer entries and encoded again


def test_concurrent_conversations_each_get_their_own_cache(tiny_dir):
    pipe = vlm.load(tiny_dir, dtype="float32")
    convs = [[{"role": "user", "content": f"Story number {i}"}] for i in range(4)]
    expected = [pipe.generate(c, max_new_tokens=6, repetition_penalty=1.0)[0].token_ids for c in convs]
    results = {}

    def run(i):
        results[i] = pipe.generate(convs[i], max_new_tokens=6, repetition_penalty=1.0)[0].token_ids

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(4)] == expected


def test_clear_caches_forgets_kv_and_features(tiny_dir, media_dir, monkeypatch):
    pipe = vlm.load(tiny_dir, dtype="float32")
    runs = _count_prefill(pipe, monkeypatch)
    pipe.generate(_turns(media_dir), max_new_tokens=2)
    pipe.clear_caches()
    pipe.generate(_turns(media_dir), max_new_tokens=2)
    assert runs[0] == runs[1]

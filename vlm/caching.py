"""Reuse across requests: vision features by content hash, and KV caches by common token prefix.

A follow-up turn about the same image then costs only its new tokens: the image's features come from
the `FeatureCache` and the earlier turns' keys and values from the `PrefixPool`.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Any, Callable

import torch

from .layers.attention import KVCache


class FeatureCache:
    """Results of a vision encoder keyed by a hash of its inputs' contents (LRU, bounded in bytes)."""

    def __init__(self, max_bytes: int = 512 << 20):
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __call__(self, encode: Callable[..., torch.Tensor], *inputs: Any) -> torch.Tensor:
        key = content_key(getattr(encode, "__qualname__", repr(encode)), *inputs)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        features = encode(*inputs)
        size = features.numel() * features.element_size()
        if size <= self.max_bytes:
            with self._lock:
                if key not in self._items:
                    self._items[key] = features
                    self._bytes += size
                while self._bytes > self.max_bytes:
                    _, old = self._items.popitem(last=False)
                    self._bytes -= old.numel() * old.element_size()
        return features


    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0


def content_key(*items: Any) -> str:
    """A hash of tensors' contents (dtype, shape and bytes) and of other items' reprs."""
    digest = hashlib.blake2b(digest_size=20)
    for item in items:
        if isinstance(item, torch.Tensor):
            tensor = item.detach().contiguous().cpu()
            digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
            digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        else:
            digest.update(repr(item).encode())
    return digest.hexdigest()


class PrefixPool:
    """A few finished KV caches of single conversations, with the inputs they were computed from.

    Keys and values of a prefix depend only on its input embeddings and positions (attention is
    causal), so an entry is reusable as far as those agree with a new prompt: the same token ids
    over a different image do not match. `take` hands out the entry sharing the longest prefix (or
    None); `put` returns it after generation. An entry is used by one generation at a time. `key` names
    what else the cache depends on (a family whose images are not in its input embeddings hashes them):
    only entries with an equal key are reused.
    """

    def __init__(self, max_entries: int = 4):
        self.max_entries = max_entries
        self._entries: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, KVCache, str | None]] = []
        self._lock = threading.Lock()

    def take(self, ids: torch.Tensor, positions: torch.Tensor, embeds: torch.Tensor,
             key: str | None = None) -> tuple[KVCache, int] | None:
        """ids (L,), positions (P, L), embeds (L, D): the best cache and how many of its positions to keep."""
        with self._lock:
            best, best_len = None, 0
            for i, entry in enumerate(self._entries):
                length = _common_prefix(entry[:3], (ids, positions, embeds)) if entry[4] == key else 0
                if length > best_len:
                    best, best_len = i, length
            if best is None:
                return None
            cache = self._entries.pop(best)[3]
        return cache, min(best_len, ids.shape[0] - 1)  # at least one token is run to get logits

    def put(self, ids: torch.Tensor, positions: torch.Tensor, embeds: torch.Tensor, cache: KVCache,
            key: str | None = None) -> None:
        with self._lock:
            self._entries.append((ids, positions, embeds, cache, key))
            del self._entries[:-self.max_entries]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def _common_prefix(cached: tuple[torch.Tensor, ...], new: tuple[torch.Tensor, ...]) -> int:
    """Leading positions where token ids, positions and input embeddings all agree."""
    (ids_a, pos_a, emb_a), (ids_b, pos_b, emb_b) = cached, new
    if pos_a.shape[0] != pos_b.shape[0] or emb_a.shape[-1] != emb_b.shape[-1]:
        return 0
    n = min(ids_a.shape[0], ids_b.shape[0])
    same = (ids_a[:n] == ids_b[:n]) & (pos_a[:, :n] == pos_b[:, :n]).all(0)
    same &= (emb_a[:n] == emb_b[:n]).all(-1)
    differs = (~same).nonzero()
    return int(differs[0]) if len(differs) else n

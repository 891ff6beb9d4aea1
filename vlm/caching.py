"""Reuse across requests: vision features by content hash, and KV caches by common token prefix.

A follow-up turn about the same image then costs only its new tokens: the image's features come from
the `FeatureCache` and the earlier turns' keys and values from the `PrefixPool` (which the engine keeps
within its KV memory budget).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Any, Callable, NamedTuple

import torch

from . import progress
from .layers.attention import KVCache


class FeatureCache:
    """Results of a vision encoder keyed by a hash of its inputs' contents (LRU, bounded in bytes)."""

    def __init__(self, max_bytes: int = 512 << 20):
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def encode(self, encode: Callable[..., torch.Tensor], *inputs: Any) -> tuple[torch.Tensor, int]:
        """`encode(*inputs)` (one image or video), or its earlier result for inputs of the same contents;
        and a content id (a nonzero 60-bit number from the same hash) that tells these inputs apart from
        others. Reported as progress ("encoding", one more item encoded)."""
        key = _content_key(encode, inputs)
        content = int(key[:15], 16) | 1
        with self._lock:
            cached = self._items.get(key)
            if cached is not None:
                self._items.move_to_end(key)
        if cached is not None:
            progress.report("encoding", 1)
            return cached, content
        features = encode(*inputs)
        progress.report("encoding", 1)
        size = features.numel() * features.element_size()
        if size <= self.max_bytes:
            with self._lock:
                if key not in self._items:
                    self._items[key] = features
                    self._bytes += size
                while self._bytes > self.max_bytes:
                    _, old = self._items.popitem(last=False)
                    self._bytes -= old.numel() * old.element_size()
        return features, content

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0


def _content_key(encode: Callable, inputs: tuple) -> str:
    digest = hashlib.blake2b(getattr(encode, "__qualname__", repr(encode)).encode(), digest_size=20)
    for item in inputs:
        if isinstance(item, torch.Tensor):
            tensor = item.detach().contiguous().cpu()
            digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
            digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        else:
            digest.update(repr(item).encode())
    return digest.hexdigest()


class Prefix(NamedTuple):
    """A KV cache whose first `cache.length` positions hold these token ids, positions (P, n) and content ids."""

    ids: torch.Tensor
    positions: torch.Tensor
    content: torch.Tensor
    cache: KVCache


class PrefixPool:
    """KV caches of finished requests, with the inputs they were computed from, reused by follow-ups.

    Keys and values of a prefix depend only on its tokens, their positions and the media shown there
    (attention is causal), so an entry is reusable as far as token ids, positions and content ids agree
    with a new prompt: the same token ids over a different image do not match. `take` hands out the entry
    sharing the longest prefix (or None); the request puts its cache back when it ends. An entry is used
    by one request at a time; the oldest go first (`evict`, or beyond `max_entries`).
    """

    def __init__(self, max_entries: int = 16):
        self.max_entries = max_entries
        self._entries: list[Prefix] = []
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(entry.cache.nbytes for entry in self._entries)

    def take(self, ids: torch.Tensor, positions: torch.Tensor, content: torch.Tensor) -> tuple[Prefix, int] | None:
        """ids (L,), positions (P, L), content (L,): the best entry and how many of its positions to keep."""
        with self._lock:
            best, best_len = None, 0
            for i, entry in enumerate(self._entries):
                length = _common_prefix(entry, (ids, positions, content))
                if length > best_len:
                    best, best_len = i, length
            if best is None:
                return None
            entry = self._entries.pop(best)
        return entry, min(best_len, ids.shape[0] - 1)  # at least one token is run to get logits

    def put(self, entry: Prefix) -> None:
        with self._lock:
            self._entries.append(entry)
            del self._entries[:-self.max_entries]

    def evict(self) -> bool:
        """Drop the oldest entry; False when there is none."""
        with self._lock:
            if not self._entries:
                return False
            del self._entries[0]
            return True

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def _common_prefix(cached: Prefix, new: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> int:
    """Leading positions where token ids, positions and content ids all agree."""
    (ids_a, pos_a, content_a, _), (ids_b, pos_b, content_b) = cached, new
    if pos_a.shape[0] != pos_b.shape[0]:
        return 0
    n = min(ids_a.shape[0], ids_b.shape[0])
    same = (ids_a[:n] == ids_b[:n]) & (pos_a[:, :n] == pos_b[:, :n]).all(0) & (content_a[:n] == content_b[:n])
    differs = (~same).nonzero()
    return int(differs[0]) if len(differs) else n

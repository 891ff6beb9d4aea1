"""The contract between a chat model and the engine, written once; every chat family implements it.

The engine knows no family. It asks a `ChatModel` for:
- `embed(inputs) -> Embedded`: one request's prompt (the processor's inputs, a batch of one) as input
  embeddings with the vision features written over their placeholders, a content id per position, and
  whatever a family needs at every step (`extras`, e.g. cross-attention states);
- `embed_tokens(ids)`: the embeddings of generated tokens;
- `forward(embeds, positions, rows) -> hidden`: one step's rows of every request at once, packed as
  (N, D) with positions (P, N); `rows` says which rows are whose and holds each request's KV cache, so
  the linears run once over all rows and attention runs per request over its own keys;
- `logits(hidden)` and `cache_spec()`.
The processor builds the positions (1-D, or M-RoPE's 3-D ones) with the inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .caching import FeatureCache
from .errors import InputError
from .layers.attention import CacheSpec, Rows
from .layers.decoder import Decoder


@dataclass
class Embedded:
    """One request's prompt as the model reads it."""

    embeds: torch.Tensor  # (L, D) input embeddings
    content: torch.Tensor  # (L,) int64: 0 at a text token, else an id of the contents of the image/video shown there
    extras: dict[str, Any] = field(default_factory=dict)  # per-request state a family reads at every step


class ChatModel(nn.Module):
    """A decoder with its output head, and the embedding of a request's inputs (text only by default).

    The decoder and head are the modules `model` and `lm_head`, the hub's usual names; a family whose
    checkpoint names them otherwise overrides the `decoder` and `head` properties. A family that reads
    images or videos overrides `embed`, encoding them through `self.features` so that a follow-up turn
    does not encode the same media again.
    """

    language_modules: tuple[str, ...] = ()  # module name prefixes quantization applies to

    def __init__(self):
        super().__init__()
        self.features = FeatureCache()

    @property
    def decoder(self) -> Decoder:
        return self.model

    @property
    def head(self) -> nn.Module:
        return self.lm_head

    def embed(self, inputs: Mapping[str, Any]) -> Embedded:
        ids = request_ids(inputs)
        return Embedded(self.embed_tokens(ids), torch.zeros_like(ids))

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.decoder.embed_tokens(ids)

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, rows: Rows) -> torch.Tensor:
        return self.decoder(embeds, positions, rows)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)

    def cache_spec(self) -> CacheSpec:
        return self.decoder.cache_spec()

    def encoder_modules(self) -> list[nn.Module]:
        """The modules only `embed` runs (vision towers, projectors): everything but the decoder and head."""
        language = {id(m) for part in (self.decoder, self.head) for m in part.modules()}
        return [m for m in self.modules() if id(m) not in language and m is not self]


def request_ids(inputs: Mapping[str, Any]) -> torch.Tensor:
    """The token ids (L,) of a request's inputs (a batch of one, as processors build it)."""
    ids = inputs["input_ids"]
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise InputError(f"A request holds one conversation; input_ids has shape {tuple(ids.shape)}.")
    return ids[0]


def place_media(embedded: Embedded, slots: torch.Tensor, items: Sequence[tuple[torch.Tensor, int]], kind: str) -> None:
    """Write media features over their placeholder `slots` (L,) in order, and each item's content id.

    `items` are (features (n, D), content id) per image or video, as `FeatureCache.encode` returns them;
    the placeholders must be exactly as many as the features.
    """
    found, given = int(slots.sum()), sum(features.shape[0] for features, _ in items)
    if found != given:
        raise InputError(f"The prompt has {found} {kind} placeholder tokens for {given} {kind} features; the "
                         "processor settings do not match the model config.")
    if not items:
        return
    embedded.embeds[slots] = torch.cat([features for features, _ in items]).to(embedded.embeds.dtype)
    embedded.content[slots] = torch.cat([torch.full((features.shape[0],), key, dtype=torch.long)
                                         for features, key in items]).to(embedded.content.device)


@torch.inference_mode()
def run_prompt(model: ChatModel, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Hidden states (L, D) of one prompt run at once through a fresh cache: embeds (L, D), positions (P, L)."""
    cache = model.cache_spec().new(embeds.shape[0])
    return model.forward(embeds, positions, Rows([cache], [embeds.shape[0]]))

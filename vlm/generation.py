"""Family-agnostic generation: sampling settings, the decode loop over a KV cache, streaming in a thread.

A model used here exposes `embed(inputs)`, `embed_tokens(ids)`, `new_cache(batch, capacity)`,
`forward(embeds, positions, cache, valid)` and `logits(hidden)`; its processor builds `inputs` with
`input_ids`, `attention_mask`, `positions` (P, B, L) and `next_position` (B,).
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Iterator, Sequence

import torch

from . import cancellation
from .caching import PrefixPool
from .errors import Cancelled, GenerationError, InputError, OutOfMemoryError, VLMError


@dataclass(frozen=True)
class Sampling:
    """Decoding settings; None in a call means "the checkpoint's generation_config.json value"."""

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None

    @classmethod
    def from_generation_config(cls, config: dict[str, Any]) -> "Sampling":
        """Defaults from generation_config.json (unknown or null fields keep the neutral default)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in known and v is not None})

    def override(self, **overrides: Any) -> "Sampling":
        """A copy with every non-None override applied, validated."""
        known = {f.name for f in fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise InputError(f"Unknown sampling settings: {', '.join(sorted(unknown))}")
        out = replace(self, **{k: v for k, v in overrides.items() if v is not None})
        out.validate()
        return out

    def validate(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be a positive integer, not {self.max_new_tokens!r}")
        if self.temperature <= 0 and self.do_sample:
            raise InputError("temperature must be > 0 when sampling")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], not {self.top_p}")
        if self.top_k < 0:
            raise InputError(f"top_k must be >= 0, not {self.top_k}")
        if self.repetition_penalty <= 0:
            raise InputError(f"repetition_penalty must be > 0, not {self.repetition_penalty}")


@dataclass
class GenerationOutput:
    text: str  # the answer (for thinking models, without the reasoning)
    token_ids: list[int]
    finish_reason: str  # "stop" | "length" | "cancelled"
    reasoning: str = ""  # thinking models: the text between the think tags


class Sampler:
    """Picks the next token from logits: repetition penalty, then temperature, top-k, top-p (as transformers)."""

    def __init__(self, sampling: Sampling, device: torch.device):
        self.s = sampling
        self.generator = None
        if sampling.do_sample:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(sampling.seed if sampling.seed is not None else torch.seed())

    def __call__(self, logits: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.s.repetition_penalty != 1.0:
            seen = logits.gather(1, history)
            seen = torch.where(seen < 0, seen * self.s.repetition_penalty, seen / self.s.repetition_penalty)
            logits = logits.scatter(1, history, seen)
        if not self.s.do_sample:
            return logits.argmax(-1)
        logits = logits / self.s.temperature
        if self.s.top_k > 0:
            kth = logits.topk(min(self.s.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.s.top_p < 1.0:
            sorted_logits, order = logits.sort(dim=-1)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            drop = cumulative <= 1 - self.s.top_p
            drop[:, -1] = False
            logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
        probs = logits.softmax(-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(1)


@torch.inference_mode()
def generate_tokens(model, inputs: dict[str, Any], sampling: Sampling, stop_ids: set[int], pad_id: int,
                    cancel: threading.Event | None = None,
                    logits_processors: Sequence[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = (),
                    prefixes: PrefixPool | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, step by step, until all rows stop, the budget or `cancel`.

    Rows that already stopped receive `pad_id`. `lm_head` runs on the last position only.
    `logits_processors` map (logits, history) to new logits before sampling (e.g. a thinking budget).
    With `prefixes`, a single conversation reuses the KV cache of an earlier one that shares its
    beginning (only the new tokens are run) and leaves its own cache there afterwards.
    """
    ids = inputs["input_ids"]
    batch = ids.shape[0]
    axes = inputs["positions"].shape[0]
    pool = prefixes if batch == 1 else None
    try:
        with cancellation.scope(cancel):  # the vision encoders and the decoder look at it between layers
            cache, logits, embeds = _prefill(model, inputs, ids.shape[1] + sampling.max_new_tokens, pool)
    except Cancelled:
        return
    sampler = Sampler(sampling, ids.device)
    stop = torch.tensor(sorted(stop_ids), device=ids.device, dtype=torch.long)
    position = inputs["next_position"].clone()
    finished = torch.zeros(batch, dtype=torch.bool, device=ids.device)
    history, decoded_positions = ids, []
    one = torch.ones(batch, 1, dtype=torch.bool, device=ids.device)
    try:
        for step in range(sampling.max_new_tokens):
            if cancel is not None and cancel.is_set():
                return
            for process in logits_processors:
                logits = process(logits, history)
            tokens = sampler(logits, history).masked_fill(finished, pad_id)
            yield tokens
            finished |= torch.isin(tokens, stop)
            if bool(finished.all()) or step + 1 == sampling.max_new_tokens:
                return
            if cancel is not None and cancel.is_set():
                return
            positions = position.view(1, batch, 1).expand(axes, batch, 1)
            hidden = model.forward(model.embed_tokens(tokens[:, None]), positions, cache, one)
            history = torch.cat([history, tokens[:, None]], dim=1)
            decoded_positions.append(positions[:, 0])
            logits = model.logits(hidden[:, -1])
            position += 1
    finally:
        if pool is not None:
            decoded = model.embed_tokens(history[:, ids.shape[1]:])
            pool.put(history[0], torch.cat([inputs["positions"][:, 0], *decoded_positions], dim=1),
                     torch.cat([embeds, decoded], dim=1)[0], cache)


def _prefill(model, inputs: dict[str, Any], capacity: int, pool: PrefixPool | None):
    """Run the prompt (only what a pooled cache does not already hold); return the cache, the last
    logits and the prompt's input embeddings."""
    ids, positions = inputs["input_ids"], inputs["positions"]
    embeds = model.embed(inputs)  # vision features come from the model's FeatureCache when known
    reused = pool.take(ids[0], positions[:, 0], embeds[0]) if pool is not None else None
    if reused is None:
        cache, start = model.new_cache(ids.shape[0], capacity), 0
    else:
        cache, start = reused
        cache.truncate(start)
        cache.reserve(capacity)
    hidden = model.forward(embeds[:, start:], positions[..., start:], cache, inputs["attention_mask"][:, start:].bool())
    return cache, model.logits(hidden[:, -1]), embeds


def run_in_thread(produce: Callable[[threading.Event], Iterator[Any]], cancel: threading.Event) -> Iterator[Any]:
    """Run the iterator `produce(cancel)` in a background thread and yield its items here.

    An exception in the thread is raised to the caller (vlm errors as they are, others wrapped in
    GenerationError). Leaving the loop early sets `cancel`; the thread is always joined.
    """
    items: queue.Queue = queue.Queue()
    done = object()

    def work():
        try:
            for item in produce(cancel):
                items.put((True, item))
        except BaseException as exc:  # handed over to the consumer
            items.put((False, exc))
        finally:
            items.put((True, done))

    thread = threading.Thread(target=work, name="vlm-generate", daemon=True)
    thread.start()
    finished = False
    try:
        while True:
            ok, item = items.get()
            if item is done:
                finished = True
                return
            if not ok:
                if isinstance(item, VLMError):
                    raise item
                if isinstance(item, (MemoryError, torch.OutOfMemoryError)):
                    raise OutOfMemoryError("Out of memory while answering: use fewer or smaller images, fewer "
                                           "video frames, fewer new tokens or a shorter conversation.") from item
                raise GenerationError(f"Generation failed: {type(item).__name__}: {item}") from item
            yield item
    finally:
        if not finished:
            cancel.set()
        thread.join()

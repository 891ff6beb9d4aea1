"""One request's side of generation: sampling settings, logits processors, picking each next token, and
when it stops. The engine (`vlm.engine`) runs the model for every request at once and asks each
request's `Decoding` for its token.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Sequence

import torch

from .errors import InputError

# Maps (logits (1, V), history (1, prompt + generated)) to new logits before sampling, e.g. a thinking budget.
LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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
    finish_reason: str  # "stop" | "length" | "cancelled" | "timeout"
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


class Decoding:
    """Picks one request's tokens: logits processors, then its sampler, over the prompt and what it generated.

    `pick(logits)` returns the next token and records it; `finish` becomes "stop" after a stop id and
    "length" after `sampling.max_new_tokens` tokens.
    """

    def __init__(self, prompt: torch.Tensor, sampling: Sampling, stop_ids: frozenset[int],
                 processors: Sequence[LogitsProcessor] = ()):
        self.sampling, self.stop_ids, self.processors = sampling, stop_ids, list(processors)
        self.sampler = Sampler(sampling, prompt.device)
        self.history = torch.empty(1, prompt.shape[0] + sampling.max_new_tokens, dtype=torch.long, device=prompt.device)
        self.history[0, :prompt.shape[0]] = prompt
        self.length = prompt.shape[0]
        self.generated = 0
        self.finish: str | None = None

    @property
    def greedy(self) -> bool:
        """Whether the next token is the argmax of the logits as they come (no processors, no sampling, no
        repetition penalty), so a batch's tokens can be picked at once and handed to `record`."""
        return not self.processors and not self.sampling.do_sample and self.sampling.repetition_penalty == 1.0

    def pick(self, logits: torch.Tensor) -> int:
        """logits (1, V) -> the next token."""
        history = self.history[:, :self.length]
        for process in self.processors:
            logits = process(logits, history)
        return self.record(int(self.sampler(logits, history)))

    def record(self, token: int) -> int:
        """Take `token` as the next one (what `pick` chose, or a greedy request's argmax) and return it."""
        self.history[0, self.length] = token
        self.length += 1
        self.generated += 1
        if token in self.stop_ids:
            self.finish = "stop"
        elif self.generated == self.sampling.max_new_tokens:
            self.finish = "length"
        return token

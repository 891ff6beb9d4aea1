"""Thinking models: split generated text into reasoning and answer, whole or while streaming.

GLM-4.1V-Thinking writes ``<think>reasoning</think><answer>answer</answer>``; GLM-Z1 and other
templates open ``<think>`` in the prompt, so the output starts inside the reasoning. The parser is a
small state machine fed with text pieces of any size: tags split across pieces are held back until
they are complete, and its output does not depend on how the text was split. Tags are removed, and
each stretch of reasoning or answer is stripped of leading and trailing whitespace.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

THINKING, ANSWER = "thinking", "answer"


@dataclass(frozen=True)
class ThinkingFormat:
    """The tags a family's reasoning uses; `answer_open`/`answer_close` wrap the answer (GLM-4.1V) or are None."""

    open: str = "<think>"
    close: str = "</think>"
    answer_open: str | None = None
    answer_close: str | None = None

    @property
    def tags(self) -> tuple[str, ...]:
        return tuple(t for t in (self.open, self.close, self.answer_open, self.answer_close) if t)

    @property
    def force_answer(self) -> str:
        """Text that ends the reasoning and starts the answer (used when a thinking budget runs out)."""
        return self.close + (self.answer_open or "")


@dataclass(frozen=True)
class Report:
    """How a streamed request went, sent with its last delta (None: not known)."""

    finish: str | None  # "stop" (end-of-sequence token or stop string) | "length" (token budget) | None
    prompt_tokens: int | None
    visual_tokens: int | None  # image and video placeholder tokens in the prompt


class Delta(str):
    """A piece of streamed text that knows whether it is reasoning (`kind == "thinking"`) or answer, how
    many tokens the model had generated when it was sent (`tokens`) and, on the last delta of a stream,
    the `report` of the request."""

    kind: str
    tokens: int
    report: Report | None

    def __new__(cls, text: str, kind: str = ANSWER, tokens: int = 0, report: Report | None = None) -> "Delta":
        delta = super().__new__(cls, text)
        delta.kind, delta.tokens, delta.report = kind, tokens, report
        return delta

    def __repr__(self) -> str:
        return f"Delta({str(self)!r}, {self.kind!r})"


@dataclass(frozen=True)
class Split:
    reasoning: str
    answer: str


class ReasoningParser:
    """Incremental splitter: `feed(text)` and `flush()` return Deltas of reasoning and answer text.

    `thinking=True` starts inside the reasoning (the prompt ended with an open think tag). In the
    reasoning, the close tag (or an answer tag, for a model that skips the close tag) ends it; in the
    answer, the open tag starts reasoning and answer tags are dropped. Other text is kept verbatim.
    """

    def __init__(self, fmt: ThinkingFormat, thinking: bool = False):
        self.fmt = fmt
        self.kind = THINKING if thinking else ANSWER
        self._buffer = ""  # text not yet classified: at most a partial tag at its end
        self._started = False  # the current section has produced non-whitespace text
        self._space = ""  # whitespace held back until more text of the section follows

    def _transitions(self) -> dict[str, str]:
        f = self.fmt
        if self.kind == THINKING:
            return {t: ANSWER for t in (f.close, f.answer_open) if t}
        return {t: k for t, k in ((f.open, THINKING), (f.answer_open, ANSWER), (f.answer_close, ANSWER),
                                  (f.close, ANSWER)) if t}

    def feed(self, text: str) -> list[Delta]:
        out: list[Delta] = []
        self._buffer += text
        while True:
            transitions = self._transitions()
            found = [(self._buffer.find(tag), -len(tag), tag) for tag in transitions if tag in self._buffer]
            if not found:
                keep = partial_tag_length(self._buffer, transitions)
                self._emit(self._buffer[:len(self._buffer) - keep], out)
                self._buffer = self._buffer[len(self._buffer) - keep:]
                return out
            index, _, tag = min(found)
            self._emit(self._buffer[:index], out)
            self._buffer = self._buffer[index + len(tag):]
            if transitions[tag] != self.kind:  # a new section: its surrounding whitespace is dropped
                self.kind, self._started, self._space = transitions[tag], False, ""

    def flush(self) -> list[Delta]:
        """The rest at the end of generation (a dangling partial tag is plain text)."""
        out: list[Delta] = []
        self._emit(self._buffer, out)
        self._buffer, self._space = "", ""
        return out

    def _emit(self, text: str, out: list[Delta]) -> None:
        if not self._started:
            text = text.lstrip()
            if not text:
                return
            self._started = True
        body = text.rstrip()
        if body:
            out.append(Delta(self._space + body, self.kind))
            self._space = text[len(body):]
        else:
            self._space += text


def partial_tag_length(text: str, tags) -> int:
    """Length of the longest end of `text` that is the beginning of a tag (it may complete later); also
    used for stop strings."""
    for length in range(min(len(text), max(map(len, tags), default=1) - 1), 0, -1):
        if any(tag.startswith(text[-length:]) for tag in tags):
            return length
    return 0


def split_reasoning(text: str, fmt: ThinkingFormat, thinking: bool = False) -> Split:
    """Reasoning and answer of a whole generated text (same result as streaming it through a parser)."""
    parser = ReasoningParser(fmt, thinking)
    deltas = parser.feed(text) + parser.flush()
    return Split("".join(d for d in deltas if d.kind == THINKING), "".join(d for d in deltas if d.kind == ANSWER))


def opens_thinking(prompt_end: str, fmt: ThinkingFormat) -> bool:
    """Whether a prompt (its last characters suffice) leaves a think tag open for the model to continue."""
    return prompt_end.rfind(fmt.open) > prompt_end.rfind(fmt.close)


class ThinkingBudget:
    """Logits processor that forces the answer once a row has reasoned for `budget` tokens.

    Called as `processor(logits, history)` before sampling at every step; `history` is (B, prompt +
    generated). It follows each row's text with a ReasoningParser and, when the budget is spent,
    forces `forced_ids` (the tokens of `fmt.force_answer`) one step at a time.
    """

    def __init__(self, budget: int, fmt: ThinkingFormat, forced_ids: Sequence[int],
                 detokenizer: Callable[[], object], opened: Sequence[bool]):
        if not isinstance(budget, int) or budget < 0:
            raise ValueError(f"thinking_budget must be a non-negative integer, not {budget!r}")
        self.budget, self.forced_ids = budget, list(forced_ids)
        self.rows = [_BudgetRow(ReasoningParser(fmt, thinking), detokenizer()) for thinking in opened]
        self.start: int | None = None

    def __call__(self, logits: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        if self.start is None:
            self.start = history.shape[1]
        forced = []
        for row, state in enumerate(self.rows):
            for token in history[row, self.start + state.seen:].tolist():
                state.add(token)
            if not state.forced and state.parser.kind == THINKING and state.thought >= self.budget:
                state.forced, state.queue = True, list(self.forced_ids)
            if state.queue:
                forced.append((row, state.queue[0]))
        if forced:
            logits = logits.clone()
            for row, token in forced:
                logits[row] = float("-inf")
                logits[row, token] = 0.0
        return logits


class _BudgetRow:
    def __init__(self, parser: ReasoningParser, detokenizer):
        self.parser, self.detokenizer = parser, detokenizer
        self.seen = 0  # generated tokens consumed
        self.thought = 0  # tokens generated inside the reasoning
        self.queue: list[int] = []  # forced tokens still to come
        self.forced = False

    def add(self, token: int) -> None:
        self.seen += 1
        if self.queue and token == self.queue[0]:
            self.queue.pop(0)
        was_thinking = self.parser.kind == THINKING
        self.parser.feed(self.detokenizer.add(token))
        if was_thinking and self.parser.kind == THINKING:
            self.thought += 1

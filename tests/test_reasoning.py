"""vlm.reasoning: splitting thinking models' output into reasoning and answer, whole and streamed."""

from __future__ import annotations

import codecs

import pytest
import torch

from vlm.reasoning import (Delta, ReasoningParser, ThinkingBudget, ThinkingFormat, opens_thinking,
                           split_reasoning)

GLM41V = ThinkingFormat(answer_open="<answer>", answer_close="</answer>")
Z1 = ThinkingFormat()

CASES = [  # (format, prompt opened <think>, output, reasoning, answer)
    (GLM41V, False, "<think>\nLet me look: a cat, 猫.\n</think>\n<answer>\nA cat 🐱 on a sofa.\n</answer>",
     "Let me look: a cat, 猫.", "A cat 🐱 on a sofa."),
    (GLM41V, False, "<think>short</think><answer>B</answer>", "short", "B"),
    (GLM41V, False, "<think>The box is <|begin_of_box|>[1,2,3,4]<|end_of_box|>?</think><answer>Here "
     "<|begin_of_box|>[10, 20, 300, 400]<|end_of_box|></answer>", "The box is <|begin_of_box|>[1,2,3,4]<|end_of_box|>?",
     "Here <|begin_of_box|>[10, 20, 300, 400]<|end_of_box|>"),
    (GLM41V, False, "<think>unfinished, cut by the token limit", "unfinished, cut by the token limit", ""),
    (GLM41V, False, "<think>skips the close tag<answer>42</answer>", "skips the close tag", "42"),
    (GLM41V, False, "No tags at all: 2 < 3 and 5 > 4, <thin", "", "No tags at all: 2 < 3 and 5 > 4, <thin"),
    (GLM41V, False, "  \n  ", "", ""),
    (Z1, True, "\nthe prompt opened it\n\n</think>\n\nThe answer.\n", "the prompt opened it", "The answer."),
    (Z1, True, "all reasoning", "all reasoning", ""),
    (Z1, False, "plain answer </think> tag dropped", "", "plain answer  tag dropped"),
    (Z1, False, "a <think>x</think> b", "x", "ab"),
]


@pytest.mark.parametrize("fmt, opened, text, reasoning, answer", CASES)
def test_whole_text(fmt, opened, text, reasoning, answer):
    split = split_reasoning(text, fmt, opened)
    assert (split.reasoning, split.answer) == (reasoning, answer)


def _stream(fmt, opened, pieces: list[bytes]) -> tuple[str, str, list[Delta]]:
    """Feed UTF-8 byte pieces through an incremental decoder (as a detokenizer would) and the parser."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    parser = ReasoningParser(fmt, opened)
    deltas = [d for piece in pieces for d in parser.feed(decoder.decode(piece))]
    deltas += parser.feed(decoder.decode(b"", final=True)) + parser.flush()
    assert all(isinstance(d, str) and d.kind in ("thinking", "answer") and d for d in deltas)
    return ("".join(d for d in deltas if d.kind == "thinking"), "".join(d for d in deltas if d.kind == "answer"),
            deltas)


@pytest.mark.parametrize("fmt, opened, text, reasoning, answer", CASES)
def test_streamed_split_at_every_byte_boundary(fmt, opened, text, reasoning, answer):
    data = text.encode("utf-8")
    for cut in range(len(data) + 1):
        assert _stream(fmt, opened, [data[:cut], data[cut:]])[:2] == (reasoning, answer), cut
    assert _stream(fmt, opened, [data[i:i + 1] for i in range(len(data))])[:2] == (reasoning, answer)


def test_tag_split_three_ways_is_still_a_tag():
    text = "<think>abc</think><answer>xyz</answer>".encode()
    for i in range(len(text)):
        for j in range(i, len(text)):
            assert _stream(GLM41V, False, [text[:i], text[i:j], text[j:]])[:2] == ("abc", "xyz")


def test_deltas_come_early_and_in_order():
    parser = ReasoningParser(GLM41V)
    assert parser.feed("<think>Hello") == ["Hello"] and parser.feed(" world")[0].kind == "thinking"
    assert parser.feed("</th") == []  # a partial tag is held back
    out = parser.feed("ink><answer>Yes")
    assert [(str(d), d.kind) for d in out] == [("Yes", "answer")]
    assert repr(out[0]) == "Delta('Yes', 'answer')"


def test_opens_thinking():
    assert opens_thinking("<|assistant|>\n<think>", Z1)
    assert not opens_thinking("<think>a</think><|user|>hi<|assistant|>", Z1)
    assert not opens_thinking("<|assistant|>", Z1)


class _Detok:
    """Stand-in for IncrementalDetokenizer over a toy vocabulary."""

    VOCAB = {0: "<think>", 1: "a", 2: "</think>", 3: "<answer>", 4: "b"}

    def add(self, token: int) -> str:
        return self.VOCAB[token]


def test_thinking_budget_forces_close_and_answer_per_row():
    budget = ThinkingBudget(2, GLM41V, forced_ids=[2, 3], detokenizer=_Detok, opened=[False, True])
    history = torch.tensor([[9, 9], [9, 9]])  # the prompt
    logits = torch.zeros(2, 5)
    picks = []
    for step_tokens in ([0, 1], [1, 1], [1, 2], [2, 3], [3, 4]):
        forced = budget(logits, history)
        picks.append([int(row.argmax()) if torch.isinf(row).any() else None for row in forced])
        history = torch.cat([history, torch.tensor(step_tokens)[:, None]], dim=1)
    # row 0 thinks after <think>: 'a', 'a' -> forced </think>, <answer>; row 1 started thinking: 'a', 'a' -> forced
    assert picks == [[None, None], [None, None], [None, 2], [2, 3], [3, None]]
    with pytest.raises(ValueError):
        ThinkingBudget(-1, GLM41V, [2], _Detok, [False])

"""Conversations -> GLM-4 model inputs (text only): chat template, left padding, 1-D positions."""

from __future__ import annotations

from typing import Any

from ...conversation import left_pad
from ...errors import InputError
from ...tokenizer import Tokenizer


class Glm4Inputs:
    """Builds `input_ids`, `attention_mask`, `positions` (1, B, L) and `next_position` for a batch."""

    def __init__(self, tokenizer: Tokenizer, pad_id: int):
        self.tokenizer, self.pad_id = tokenizer, pad_id

    def __call__(self, conversations: list[list[dict]], add_generation_prompt: bool = True,
                 template_vars: dict[str, Any] | None = None, **media_options: Any) -> dict[str, Any]:
        rows = [self.tokenizer.encode_chat(text_messages(c), add_generation_prompt=add_generation_prompt,
                                           **(template_vars or {})) for c in conversations]
        input_ids, attention_mask = left_pad(rows, self.pad_id)
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0) * attention_mask  # as transformers' generate
        return {"input_ids": input_ids, "attention_mask": attention_mask, "positions": positions[None],
                "next_position": attention_mask.sum(-1)}


def text_messages(messages: list[dict]) -> list[dict]:
    """Messages with string content, as GLM-4's template expects; images and videos are refused."""
    out = []
    for message in messages:
        content = message["content"]
        if not isinstance(content, str):
            if any(part["type"] != "text" for part in content):
                raise InputError("GLM-4 reads text only; use a GLM-4.1V checkpoint for images and videos.")
            content = "".join(part["text"] for part in content)
        out.append({"role": message["role"], "content": content})
    return out

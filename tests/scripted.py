"""A model made to say a given text: for tests of what the library and the UI do with an answer."""

from __future__ import annotations

import torch


def script(pipe, monkeypatch, names: list[str], then: str = "a"):
    """Make the model emit the tokens of `names` then the first token of `then` forever, whatever the input."""
    ids = [i for n in names for i in pipe.tokenizer.encode(n)]
    fallback = pipe.tokenizer.encode(then)[0]
    step = {"n": 0}
    original = pipe.model.logits

    def logits(hidden):
        out = torch.zeros(hidden.shape[0], original(hidden).shape[-1])
        out[:, ids[step["n"]] if step["n"] < len(ids) else fallback] = 10.0
        step["n"] += 1
        return out

    monkeypatch.setattr(pipe.model, "logits", logits)
    return step

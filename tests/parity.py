"""Helpers to compare a vlm pipeline with the transformers reference on greedy decoding."""

from __future__ import annotations

import torch

MIN_GAP = 2e-3
MIN_STEPS = 5


def reference_greedy(model, inputs: dict, max_new_tokens: int, **generate_kwargs) -> tuple[list[list[int]], list[list[float]]]:
    """New tokens of each row and the top-1/top-2 logit gap at every step (near-ties make tokens unstable)."""
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, output_scores=True,
                         return_dict_in_generate=True, **generate_kwargs)
    start = inputs["input_ids"].shape[1]
    tokens = out.sequences[:, start:].tolist()
    logits = torch.stack(out.scores, dim=1).float()  # (B, steps, V) after the logits processors
    top2 = logits.topk(2, dim=-1).values
    gaps = (top2[..., 0] - top2[..., 1]).tolist()
    return tokens, gaps


def assert_same_greedy(ours: list[int], theirs: list[int], gaps: list[float], stop_ids: set[int] | None = None) -> int:
    """Tokens agree step by step; they may part only at a near-tie (top-1/top-2 gap < MIN_GAP), and at
    least MIN_STEPS steps (or all up to a stop) must agree before that."""
    compared = 0
    for step, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            assert gaps[step] < MIN_GAP, f"step {step} (gap {gaps[step]:.4f}): ours {ours} vs reference {theirs}"
            break
        compared += 1
        if stop_ids and b in stop_ids:
            return compared
    assert compared >= min(MIN_STEPS, len(theirs)), f"only {compared} steps agree before a near-tie; reseed the config"
    return compared


def greedy_tokens(pipe, conversation, steps: int) -> list[int]:
    """Our greedy answer's token ids."""
    return pipe.generate(conversation, max_new_tokens=steps, do_sample=False)[0].token_ids

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


def image_conv(paths, text: str = "What is in the picture?") -> list[dict]:
    """One user message with images (by path) and a question."""
    images = [{"type": "image", "path": p} for p in paths]
    return [{"role": "user", "content": [*images, {"type": "text", "text": text}]}]


def multi_turn_conv(media: str) -> list[dict]:
    """An image question, its answer, and a follow-up with another image (files of ../shared/media)."""
    return image_conv([f"{media}/llava_v1_5_radar.jpg"], "What chart is this?") + [
        {"role": "assistant", "content": "A radar chart of benchmark scores."},
        {"role": "user", "content": [{"type": "image", "path": f"{media}/voc.jpg"},
                                     {"type": "text", "text": "And this one?"}]},
    ]


def padded_batch(media: str) -> list[list[dict]]:
    """A text-only conversation and a two-image one: the first row is left-padded."""
    return [[{"role": "user", "content": "Hi"}],
            image_conv([f"{media}/ctx.jpg", f"{media}/extreme_ironing.jpg"], "Describe both pictures in detail.")]


def opened(conversation: list[dict]) -> list[dict]:
    """The conversation as the model cards pass it to the reference: image paths opened as PIL images."""
    from PIL import Image

    return [{**m, "content": m["content"] if isinstance(m["content"], str) else [
        {"type": "image", "image": Image.open(p["path"])} if p["type"] == "image" else p for p in m["content"]]}
        for m in conversation]


# transformers 5.3+ starts the text after an image or video at its start + max(h, w) / merge; Qwen's code,
# vLLM and transformers <= 5.2 at its largest position + 1, which the trained models expect. The two differ
# after a video whose temporal positions go further than max(h, w) / merge.
_ROPE_DEVIATION = "current_pos += max(grid_thw[1], grid_thw[2]) // spatial_merge_size"
_ROPE_ORIGINAL = "current_pos = int(vision_position_ids.max()) + 1"


def original_text_after_video(model) -> None:
    """Correct the pinned reference's position function (Qwen2-VL, Qwen2.5-VL `get_rope_index`) on `model`
    to the original rule for the text after a vision run: one line of its source replaced, on this instance
    only. Its decoding already continues from the largest position + 1 (rope_deltas), as ours does."""
    import inspect
    import textwrap
    import types

    base = model.model
    source = textwrap.dedent(inspect.getsource(type(base).get_rope_index))
    assert source.count(_ROPE_DEVIATION) == 1, "the reference's get_rope_index changed: review the patch"
    namespace: dict = {}
    exec(compile(source.replace(_ROPE_DEVIATION, _ROPE_ORIGINAL), inspect.getsourcefile(type(base)), "exec"),
         vars(inspect.getmodule(type(base))), namespace)
    base.get_rope_index = types.MethodType(namespace["get_rope_index"], base)

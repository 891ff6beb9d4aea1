"""Measure the reference implementation (transformers, eager attention) on one checkpoint.

Run by `python -m vlm.bench` in its own process; it lives outside `vlm/` because the package never
imports transformers.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from vlm.bench import scenarios as s  # noqa: E402

MODEL_CLASSES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
                 "llava_onevision": "LlavaOnevisionForConditionalGeneration"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("--family", required=True)
    parser.add_argument("--image")
    parser.add_argument("--video")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--decode-only", action="store_true", help="decode tokens/s from a one-token prompt only")
    parser.add_argument("--gen", type=int, default=s.NEW_TOKENS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import transformers
    from transformers import LogitsProcessorList

    dtype = getattr(torch, args.dtype)
    before = s.reset_peak_rss()
    cls = getattr(transformers, MODEL_CLASSES[args.family])
    load_s, model = s.timed(lambda: cls.from_pretrained(args.checkpoint, dtype=dtype, attn_implementation="eager"))
    load_peak = s.peak_rss() - before
    model.eval()
    if args.decode_only:
        s.emit({"decode_tok_s": [decode_speed(model, args.gen) for _ in range(2)]})
        return
    processor = transformers.AutoProcessor.from_pretrained(args.checkpoint)

    def generate(conversation, new_tokens, videos=None, **kwargs):
        text = processor.apply_chat_template(_strip(conversation), add_generation_prompt=True, tokenize=False)
        images = [Image.open(args.image).convert("RGB")] * _count(conversation, "image") or None
        inputs = processor(text=[text], images=images, videos=videos, return_tensors="pt")
        inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        with torch.inference_mode():
            return model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, repetition_penalty=1.0,
                                  **kwargs)[0, inputs["input_ids"].shape[1]:]

    image = s.image_turn(args.image)
    generate(image, 1)  # warm-up
    ttft, _ = s.timed(lambda: generate(image, 1))
    clock = StepClock()
    out = generate(image, s.NEW_TOKENS, min_new_tokens=s.NEW_TOKENS, logits_processor=LogitsProcessorList([clock]))
    assert len(out) == s.NEW_TOKENS
    answer = processor.decode(generate(image, s.FIRST_ANSWER_TOKENS), skip_special_tokens=True)
    ttft2, _ = s.timed(lambda: generate(s.second_turn(args.image, answer), 1))
    video_ttft, _ = s.timed(lambda: generate(s.video_turn(args.video), 1, videos=[_frames(args.video)]))
    s.emit({
        "load_s": load_s, "load_peak_rss": load_peak, "ttft_image_s": ttft,
        "decode_tok_s": clock.tokens_per_second(), "ttft_turn2_s": ttft2, "video16_ttft_s": video_ttft,
    })


class StepClock:
    """A logits processor that notes when each decode step's logits arrive (it changes nothing)."""

    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores

    def tokens_per_second(self) -> float:
        return (len(self.times) - 1) / (self.times[-1] - self.times[0])


def decode_speed(model, gen: int) -> float:
    """Tokens/s of `gen` greedy steps after a one-token prompt, each step timed as its logits arrive."""
    from transformers import LogitsProcessorList

    clock = StepClock()
    with torch.inference_mode():
        model.generate(input_ids=torch.randint(0, 400, (1, 1)), max_new_tokens=gen + 1, min_new_tokens=gen + 1,
                       do_sample=False, logits_processor=LogitsProcessorList([clock]))
    return clock.tokens_per_second()


def _strip(conversation):
    """Media parts reduced to their type, as the template only needs the placeholders."""
    return [{**m, "content": [{"type": p["type"]} if p["type"] != "text" else p for p in m["content"]]}
            for m in conversation]


def _count(conversation, kind: str) -> int:
    return sum(p["type"] == kind for m in conversation for p in m["content"])


def _frames(path: str) -> np.ndarray:
    """VIDEO_FRAMES frames sampled uniformly, decoded with PyAV (decoding is part of the measured time)."""
    import av

    with av.open(path) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    index = np.linspace(0, len(frames) - 1, s.VIDEO_FRAMES).round().astype(int)
    return np.stack([frames[i] for i in index])


if __name__ == "__main__":
    main()

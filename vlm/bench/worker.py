"""Measure this project on one checkpoint (run in its own process by `python -m vlm.bench`)."""

from __future__ import annotations

import argparse
import time

import torch

from ..layers.linear import PackedLinear
from ..model import run_prompt
from . import scenarios as s


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("--image", required=True)
    parser.add_argument("--video", required=True)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--quantization")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import vlm
    from vlm.checkpoint import read_config
    from vlm.families import detect_family

    detect_family(read_config(args.checkpoint)).module  # imports happen before the clock starts, as for the reference
    before = s.reset_peak_rss()
    load_s, pipe = s.timed(lambda: vlm.load(args.checkpoint, device="cpu", dtype=args.dtype,
                                                   quantization=args.quantization))
    load_peak = s.peak_rss() - before
    greedy = dict(do_sample=False, repetition_penalty=1.0)
    image = s.image_turn(args.image)

    def cold(run):
        """Time `run` with nothing reused from earlier requests (no cached KV or vision features)."""
        pipe.clear_caches()
        return s.timed(run)

    pipe.generate(image, max_new_tokens=1, **greedy)  # warm-up (first-call allocations)
    ttft, _ = cold(lambda: pipe.generate(image, max_new_tokens=1, **greedy))
    stops, pipe.stop_ids = pipe.stop_ids, set()  # forced to run to length
    pipe.clear_caches()
    arrivals = [(time.perf_counter(), delta) for delta in pipe.stream(image, max_new_tokens=s.NEW_TOKENS, **greedy)]
    pipe.stop_ids = stops
    (start, opening), (end, closing) = arrivals[0], arrivals[-1]  # decode steps timed directly, from the first token
    assert closing.tokens == s.NEW_TOKENS
    _, first = cold(lambda: pipe.generate(image, max_new_tokens=s.FIRST_ANSWER_TOKENS, **greedy)[0])
    # the second turn may reuse what the first computed: that is the point of the measurement
    ttft2, _ = s.timed(lambda: pipe.generate(s.second_turn(args.image, first.text), max_new_tokens=1, **greedy))
    video = s.video_turn(args.video)
    video_ttft, _ = cold(lambda: pipe.generate(video, max_new_tokens=1, num_frames=s.VIDEO_FRAMES, **greedy))
    agreement = {}
    if args.quantization:  # how often the quantized model picks bf16's token, and bf16 fp32's (the noise floor)
        answered = image + [{"role": "assistant", "content": "".join(d for _, d in arrivals)}]
        plain = vlm.load(args.checkpoint, device="cpu", dtype=args.dtype)
        exact = vlm.load(args.checkpoint, device="cpu", dtype="float32")
        quantized_picks, plain_picks, exact_picks = (teacher_forced_picks(p, answered) for p in (pipe, plain, exact))
        agreement = {"top1_vs_plain": (quantized_picks == plain_picks).float().mean().item(),
                     "top1_plain_vs_float32": (plain_picks == exact_picks).float().mean().item()}
    s.emit({
        **agreement,
        "decode_bytes": decode_weight_bytes(pipe.model),
        "load_s": load_s, "load_peak_rss": load_peak, "ttft_image_s": ttft,
        "decode_tok_s": (closing.tokens - opening.tokens) / (end - start), "ttft_turn2_s": ttft2, "video16_ttft_s": video_ttft,
    })


@torch.inference_mode()
def teacher_forced_picks(pipe, conversation) -> torch.Tensor:
    """The model's next-token pick at each of the last NEW_TOKENS positions of `conversation` (one forward)."""
    model, inputs = pipe.model, pipe.encode(conversation)
    hidden = run_prompt(model, model.embed(inputs).embeds, inputs["positions"][:, 0])
    return model.logits(hidden[-s.NEW_TOKENS:]).argmax(-1)


def decode_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads, as held in memory (packed or quantized): the language model's
    tensors, without its embedding table (one row per token; a tied lm_head is counted as the head)."""
    total = 0
    for name, module in model.named_modules():
        if not name.startswith(model.language_modules) or isinstance(module, torch.nn.Embedding):
            continue
        tensors = [*module._parameters.values(), *module._buffers.values(), getattr(module, "packed", None)]
        if isinstance(module, PackedLinear):  # its plain weight where the kernels read it (not a parameter)
            tensors.append(module.weight)
        total += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    return total


if __name__ == "__main__":
    main()

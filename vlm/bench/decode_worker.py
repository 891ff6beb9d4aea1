"""Time this project's language model as llama-bench times llama.cpp's (run in its own process by the peer
benchmark): a prompt of random tokens processed at once (tokens/s), and decode steps timed one by one from
an almost empty context (forward, head and greedy pick of one token per step)."""

from __future__ import annotations

import argparse
import time

import torch

from . import scenarios as s
from ..layers.attention import Rows
from ..model import run_prompt


@torch.inference_mode()
def prompt_speed(model, tokens: int, vocab: int) -> float:
    """Tokens/s of one prompt of `tokens` random ids from an empty cache (logits of the last one only)."""
    ids = torch.randint(0, vocab, (tokens,))
    start = time.perf_counter()
    hidden = run_prompt(model, model.embed_tokens(ids), torch.arange(tokens)[None])
    model.logits(hidden[-1:]).argmax(-1)
    return tokens / (time.perf_counter() - start)


@torch.inference_mode()
def decode_speed(model, steps: int, vocab: int) -> float:
    """Tokens/s over `steps` decode steps after a one-token prompt, each step timed as it ends."""
    cache = model.cache_spec().new(steps + 1)
    token = torch.randint(0, vocab, (1,))
    ends = [time.perf_counter()]
    for position in range(steps):
        hidden = model.forward(model.embed_tokens(token), torch.full((1, 1), position), Rows([cache], [1]))
        token = model.logits(hidden).argmax(-1)
        ends.append(time.perf_counter())
    return steps / (ends[-1] - ends[0])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--quantization")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--gen", type=int, default=128)
    parser.add_argument("--repetitions", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import vlm
    from .worker import decode_weight_bytes

    pipe = vlm.load(args.checkpoint, device="cpu", dtype="bfloat16", quantization=args.quantization)
    model, vocab = pipe.model, pipe.tokenizer.vocab_size
    prompt_speed(model, args.prompt, vocab), decode_speed(model, 8, vocab)  # warm-up: packing, first-call costs
    s.emit({"decode_bytes": decode_weight_bytes(model),
            "pp_tok_s": [prompt_speed(model, args.prompt, vocab) for _ in range(args.repetitions)],
            "decode_tok_s": [decode_speed(model, args.gen, vocab) for _ in range(args.repetitions)]})


if __name__ == "__main__":
    main()

"""Command line: `python -m vlm chat|segment|serve|tiny ...`."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

from .boxes import strip_markup
from .cost import estimate
from .errors import InputError, VLMError
from .media import partial_videos
from .session import Stats, format_bytes


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except VLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vlm", description="Vision-language models in plain PyTorch.")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    chat = sub.add_parser("chat", help="ask a chat model about images / videos; the answer streams to stdout "
                                       "(a thinking model's reasoning to stderr)")
    chat.add_argument("model", help="local checkpoint directory or hub repo id")
    chat.add_argument("prompt", help="the question")
    chat.add_argument("--image", action="append", default=[], help="an image file (repeatable)")
    chat.add_argument("--video", action="append", default=[], help="a video file (repeatable)")
    chat.add_argument("--system", help="a system prompt")
    chat.add_argument("--max-new-tokens", type=int)
    chat.add_argument("--temperature", type=float)
    chat.add_argument("--top-p", type=float)
    chat.add_argument("--top-k", type=int)
    chat.add_argument("--repetition-penalty", type=float)
    chat.add_argument("--seed", type=int)
    chat.add_argument("--sample", action="store_true", default=None, help="sample instead of greedy decoding")
    chat.add_argument("--max-pixels", type=int)
    chat.add_argument("--fps", type=float)
    chat.add_argument("--num-frames", type=int)
    chat.add_argument("--verbose", action="store_true", help="print the prompt's tokens, the time to first token, "
                                                             "tokens/s and peak memory on stderr")
    _add_load_options(chat)
    chat.set_defaults(run=_chat)

    seg = sub.add_parser("segment", help="zero-shot segmentation with GroupViT; writes an overlay PNG")
    seg.add_argument("model")
    seg.add_argument("--image", required=True)
    seg.add_argument("--labels", required=True, help="comma-separated labels, e.g. cat,dog,grass")
    seg.add_argument("--out", required=True, help="where to write the overlay (PNG)")
    seg.add_argument("--threshold", type=float, help="background threshold")
    _add_load_options(seg)
    seg.set_defaults(run=_segment)

    serve = sub.add_parser("serve", help="serve chat models through an OpenAI-compatible API (/v1/chat/completions)")
    serve.add_argument("models", nargs="+", metavar="MODEL", help="local checkpoint directory or hub repo id")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--device", help="as vlm.load (default: VLM_DEVICE, else auto)")
    serve.add_argument("--dtype", help="as vlm.load (default: VLM_DTYPE, else auto)")
    serve.set_defaults(run=_serve)

    tiny = sub.add_parser("tiny", help="write a tiny random checkpoint in the hub layout")
    tiny.add_argument("family")
    tiny.add_argument("out_dir")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(run=_tiny)
    return parser


def _add_load_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--revision")


def _load(args, needs: str):
    """The pipeline of args.model; InputError unless it can `needs` ("stream" for chat, "segment")."""
    from . import load

    pipe = load(args.model, device=args.device, dtype=args.dtype, revision=args.revision)
    if not hasattr(pipe, needs):
        command, other = ("chat", "segment") if needs == "stream" else ("segment", "chat")
        raise InputError(f"{args.model} is a {pipe.family} checkpoint, which `{command}` cannot use: "
                         f"try `python -m vlm {other}`.")
    return pipe


def _chat(args) -> int:
    content = [{"type": "image", "path": p} for p in args.image]
    content += [{"type": "video", "path": p} for p in args.video]
    content.append({"type": "text", "text": args.prompt})
    conversation = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": content}]
    pipe = _load(args, "stream")
    media = {k: v for k, v in dict(max_pixels=args.max_pixels, fps=args.fps, num_frames=args.num_frames).items()
             if v is not None}
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                   top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed,
                   do_sample=args.sample)
    start, first, tokens, noted = time.perf_counter(), None, 0, 0
    with partial_videos() as partial:  # a damaged video: the frames before the damage, and a note saying so
        for delta in pipe.stream(conversation, **{k: v for k, v in options.items() if v is not None}, **media):
            first, tokens = first or time.perf_counter(), delta.tokens
            noted = _notes(partial, noted)
            out = sys.stderr if delta.kind == "thinking" else sys.stdout  # the reasoning stays off stdout
            out.write(strip_markup(delta))  # boxes' coordinates stay, their tokens do not
            out.flush()
        end = time.perf_counter()
        sys.stdout.write("\n")
        _notes(partial, noted)
        if args.verbose:
            cost = estimate(pipe, conversation, **media)
            stats = Stats(None if first is None else first - start, tokens, end - start, cost.visual_tokens)
            print(stats_text(stats, cost.prompt_tokens), file=sys.stderr)
    return 0


def _notes(partial: list, shown: int) -> int:
    """Print the notes not shown yet on stderr; return how many have been."""
    for video in partial[shown:]:
        print(f"note: {video.message}", file=sys.stderr)
    return len(partial)


def stats_text(stats: Stats, prompt_tokens: int) -> str:
    """The --verbose lines: prompt and time to first token, generation speed, peak memory."""
    lines = [f"prompt: {prompt_tokens} tokens ({stats.visual_tokens} visual)"]
    if stats.seconds_to_first_token is not None:
        rate = prompt_tokens / stats.seconds_to_first_token if stats.seconds_to_first_token > 0 else 0.0
        lines[0] += f", {stats.seconds_to_first_token:.2f} s to first token ({rate:.1f} tokens/s)"
    speed = f", {stats.tokens_per_second:.2f} tokens/s" if stats.tokens_per_second is not None else ""
    lines.append(f"generation: {stats.tokens} tokens{speed}")
    lines.append(f"peak memory: {format_bytes(peak_memory())}")
    return "\n".join(lines)


def peak_memory() -> int:
    """Peak bytes: allocated on the GPU when one is used, else the process's peak resident memory."""
    import resource

    import torch

    if torch.cuda.is_available() and torch.cuda.max_memory_allocated():
        return torch.cuda.max_memory_allocated()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def _segment(args) -> int:
    pipe = _load(args, "segment")
    labels = [label.strip() for label in args.labels.split(",")]
    options = {} if args.threshold is None else {"threshold": args.threshold}
    seg = pipe.segment(args.image, labels, **options)
    seg.overlay().save(args.out)
    print(f"wrote {args.out}")
    return 0


def _serve(args) -> int:
    from .serve import serve

    serve(args.models, args.host, args.port, args.device, args.dtype)
    return 0


def _tiny(args) -> int:
    from .tiny import write

    print(write(args.family, args.out_dir, seed=args.seed))
    return 0

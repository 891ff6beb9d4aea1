"""Command line: `python -m vlm chat|segment|serve|tiny ...`."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .errors import VLMError


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


def _load(args):
    from . import load

    return load(args.model, device=args.device, dtype=args.dtype, revision=args.revision)


def _chat(args) -> int:
    content = [{"type": "image", "path": p} for p in args.image]
    content += [{"type": "video", "path": p} for p in args.video]
    content.append({"type": "text", "text": args.prompt})
    conversation = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": content}]
    pipe = _load(args)
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                   top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed,
                   do_sample=args.sample, max_pixels=args.max_pixels, fps=args.fps, num_frames=args.num_frames)
    for delta in pipe.stream(conversation, **{k: v for k, v in options.items() if v is not None}):
        out = sys.stderr if delta.kind == "thinking" else sys.stdout  # the reasoning stays off stdout
        out.write(delta)
        out.flush()
    sys.stdout.write("\n")
    return 0


def _segment(args) -> int:
    pipe = _load(args)
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

"""Concurrent streams on one model (run in its own process by `python -m vlm.bench`).

For 1, 2, 4, 8 streams (text questions, or one image each, every stream its own image), arriving one
after another, each forced to NEW_TOKENS tokens: aggregate decode tokens/s while the most of them decode at once,
per-stream tokens/s, and time to first token p50/p95 from each stream's arrival. Then the rate of two
running streams while a third request's image is prefilled, against their rate just before. The same
load also runs through the one-request-at-a-time path (each stream waits for the one before to end, as
the demo did with one generation per family), as the baseline.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from . import scenarios as s
from .media import make_image

TEXT_QUESTION = "Tell me a long story about a lighthouse keeper and a storm."
STAGGER_SECONDS = 0.5  # between two arrivals


class TokenizerIdsOnly:
    """Logits processor: only ids the tokenizer has are picked."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, logits: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        logits = logits.clone()
        logits[..., self.size:] = float("-inf")
        return logits


class Stream:
    """One user's request in a thread, from `start_at`: when it arrived, and when each token came."""

    def __init__(self, pipe, conversation: list[dict], start_at: float, turn: threading.Semaphore | None = None,
                 tokens: int = s.NEW_TOKENS):
        self.arrived = self.first = None
        self.times: list[tuple[float, int]] = []  # (time, tokens so far)
        self.cancel = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(pipe, conversation, start_at, turn, tokens))
        self.thread.start()

    def _run(self, pipe, conversation, start_at, turn, tokens):
        time.sleep(max(0.0, start_at - time.perf_counter()))
        self.arrived = time.perf_counter()
        with turn or nullcontext():
            for delta in pipe.stream(conversation, cancel=self.cancel, max_new_tokens=tokens, do_sample=False,
                                     repetition_penalty=1.0):
                now = time.perf_counter()
                self.first = self.first or now
                self.times.append((now, delta.tokens))

    def tokens_at(self, moment: float) -> int:
        return max((count for t, count in self.times if t <= moment), default=0)

    @property
    def end(self) -> float:
        return self.times[-1][0]


def run(pipe, conversations: list[list[dict]], one_at_a_time: bool) -> list[Stream]:
    pipe.clear_caches()
    turn = threading.Semaphore(1) if one_at_a_time else None
    start = time.perf_counter() + 0.1
    streams = [Stream(pipe, c, start + i * STAGGER_SECONDS, turn) for i, c in enumerate(conversations)]
    for stream in streams:
        stream.thread.join()
    assert all(stream.times[-1][1] == s.NEW_TOKENS for stream in streams)
    return streams


def rate(streams: list[Stream], begin: float, end: float) -> float:
    """Tokens per second of all `streams` together between two moments."""
    return sum(st.tokens_at(end) - st.tokens_at(begin) for st in streams) / (end - begin)


def summary(streams: list[Stream]) -> dict[str, float]:
    """Aggregate decode rate while the most streams decode at once (`together`: how many; when fewer than
    all overlap, the later ones' prompts were still waiting when the first answers ended), per-stream rate,
    and TTFT from each arrival."""
    ttfts = sorted(st.first - st.arrived for st in streams)
    together, windows = _most_together(streams)
    if together > 1:
        tokens = sum(rate(streams, begin, end) * (end - begin) for begin, end in windows)
        aggregate = tokens / sum(end - begin for begin, end in windows)
    else:  # one at a time: the tokens after each first one, over the time spent decoding
        aggregate = sum(s.NEW_TOKENS - 1 for _ in streams) / sum(st.end - st.first for st in streams)
    per_stream = statistics.mean((st.times[-1][1] - 1) / (st.end - st.first) for st in streams)
    return {"aggregate_tok_s": aggregate, "together": together, "per_stream_tok_s": per_stream,
            "ttft_p50_s": _quantile(ttfts, 0.5), "ttft_p95_s": _quantile(ttfts, 0.95)}


def _most_together(streams: list[Stream], least_seconds: float = 0.5) -> tuple[int, list[tuple[float, float]]]:
    """The most streams decoding at once for at least `least_seconds` in all, and the time windows they do."""
    events = sorted([(st.first, 1) for st in streams] + [(st.end, -1) for st in streams])
    spans: dict[int, list[tuple[float, float]]] = {}
    count = 0
    for (moment, change), (following, _) in zip(events, events[1:]):
        count += change
        if following > moment:
            spans.setdefault(count, []).append((moment, following))
    for count in sorted(spans, reverse=True):
        if sum(end - begin for begin, end in spans[count]) >= least_seconds:
            return count, spans[count]
    return 1, []


def prefill_interference(pipe, image: str) -> dict[str, float]:
    """Two text streams decode; a third request with an image arrives once they have. Their rate while its
    prompt (vision encoding and prefill) is read, and before it arrived."""
    pipe.clear_caches()
    start = time.perf_counter() + 0.1
    text = [{"role": "user", "content": TEXT_QUESTION}]
    streams = [Stream(pipe, text, start, tokens=100_000), Stream(pipe, text, start, tokens=100_000)]
    while min(st.tokens_at(time.perf_counter()) for st in streams) < 8:
        time.sleep(0.01)
    quiet_from = time.perf_counter()
    time.sleep(3.0)
    newcomer = Stream(pipe, s.image_turn(image), time.perf_counter(), tokens=1)
    newcomer.thread.join()
    for stream in streams:
        stream.cancel.set()
        stream.thread.join()
    before = rate(streams, quiet_from, newcomer.arrived) / 2
    during = rate(streams, newcomer.arrived, newcomer.first) / 2
    return {"stream_tok_s_before": before, "stream_tok_s_during_image_prefill": during,
            "image_prefill_s": newcomer.first - newcomer.arrived}


def _quantile(sorted_values: list[float], q: float) -> float:
    """The q-quantile of a few values, interpolated between neighbours."""
    position = q * (len(sorted_values) - 1)
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("--media", required=True, help="a directory for the streams' images")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--streams", default="1,2,4,8")
    parser.add_argument("--kinds", default="text,image")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import vlm

    pipe = vlm.load(args.checkpoint, device="cpu", dtype=args.dtype)
    pipe.stop_ids = set()  # every answer runs to NEW_TOKENS
    # the benchmark's tokenizer is small and the head the real model's: ids beyond the tokenizer decode to
    # nothing, so their deltas (and the times they are streamed at) would wait for text that never comes
    pipe.banned = TokenizerIdsOnly(pipe.tokenizer.vocab_size)
    counts = [int(n) for n in args.streams.split(",")]
    images = [str(make_image(Path(args.media) / f"stream{i}.png", variant=i)) for i in range(max(counts) + 1)]
    conversations = {"text": [[{"role": "user", "content": f"{TEXT_QUESTION} ({i})"}] for i in range(max(counts))],
                     "image": [s.image_turn(path) for path in images]}
    pipe.generate(s.image_turn(images[-1]), max_new_tokens=2)  # warm-up (first-call allocations)
    results: dict[str, Any] = {"prefill_interference": prefill_interference(pipe, images[-1])}
    for kind in args.kinds.split(","):
        for n in counts:
            for path, serial in (("engine", False), ("one_at_a_time", True)):
                results[f"{kind}/{n}/{path}"] = summary(run(pipe, conversations[kind][:n], serial))
                print(kind, n, path, results[f"{kind}/{n}/{path}"], flush=True)
    s.emit(results)


if __name__ == "__main__":
    main()

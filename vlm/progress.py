"""Progress of long work inside a request, for whoever waits on it (the demo shows it with numbers).

The library reports from a few places: video decoding (`"video"`: frames decoded of those sampled),
image loading (`"images"`: images loaded of the conversation's), vision encoding (`"encoding"`: images
and videos encoded, counted by the receiver, who knows how many the request holds) and reading the
prompt (`"prompt"`: tokens in the KV cache of the prompt's). A caller listens with
`with reporting(callback):`; the callback gets `(stage, done, total)` from the thread doing the work
(`total` None: `done` more items are finished). Without a listener a report costs a context lookup.
The listener is a context variable; the engine reports a prompt's progress through `forwarder`.
`Steps` is such a listener for one request, as the session shows it (`Step`: stage, n, N).
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

Reporter = Callable[[str, int, "int | None"], None]
T = TypeVar("T")

_reporter: ContextVar[Reporter | None] = ContextVar("vlm_progress", default=None)


@contextmanager
def reporting(reporter: Reporter) -> Iterator[None]:
    """Inside, the library's progress reports go to `reporter(stage, done, total)`."""
    token = _reporter.set(reporter)
    try:
        yield
    finally:
        _reporter.reset(token)


def report(stage: str, done: int, total: int | None = None) -> None:
    """`done` of `total` items of `stage` are finished (`total` None: `done` more are)."""
    reporter = _reporter.get()
    if reporter is not None:
        reporter(stage, done, total)


def forwarder(stage: str) -> Callable[[int, "int | None"], None] | None:
    """`report(stage, ...)` bound to the calling context's listener, to be called from another thread (the
    engine's); None without a listener."""
    reporter = _reporter.get()
    return None if reporter is None else functools.partial(reporter, stage)


def each(stage: str, items: Sequence[T] | Iterable[T]) -> Iterator[T]:
    """The items, reporting `stage` as (n, N) after each one is dealt with."""
    items = list(items)
    for number, item in enumerate(items, 1):
        yield item
        report(stage, number, len(items))


@dataclass(frozen=True)
class Step:
    """Work under way before the first token: `done` of `total` frames of a video decoded ("video"), images
    loaded ("images"), images and videos encoded ("encoding"), prompt tokens read ("prompt")."""

    stage: str
    done: int
    total: int


class Steps:
    """The listener of one request: turns its reports into Steps for `show` (from the working thread).

    Encodings are counted here, of the request's `media` images and videos (a cached one counts as
    encoded); the first prompt report says how much of the prompt a reused KV cache already held."""

    def __init__(self, media: int, show: Callable[[Step], None]):
        self.media, self.show = media, show
        self.encoded = 0
        self.prompt: tuple[int, int] | None = None  # (tokens already cached, prompt tokens), once known

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        if stage == "encoding":
            self.encoded += done
            done, total = self.encoded, max(self.encoded, self.media)
        elif stage == "prompt" and self.prompt is None:
            self.prompt = (done, total)
        self.show(Step(stage, done, total if total is not None else done))

    @property
    def prefilled(self) -> int | None:
        """Prompt tokens the model ran (the rest came from a reused KV cache); None before the prompt."""
        return None if self.prompt is None else self.prompt[1] - self.prompt[0]

"""Progress of long work inside a request, for whoever waits on it (the demo shows it with numbers).

The library reports from a few places: video decoding (`"video"`: frames decoded of those sampled),
image loading (`"images"`: images loaded of the conversation's), vision encoding (`"encoding"`: images
and videos encoded, counted by the receiver, who knows how many the request holds) and reading the
prompt (`"prompt"`: tokens in the KV cache of the prompt's). A caller listens with
`with reporting(callback):`; the callback gets `(stage, done, total)` from the thread doing the work
(`total` None: `done` more items are finished). Without a listener a report costs a context lookup.
The listener is a context variable: `vlm.generation.run_in_thread` carries it into its thread.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
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


def listening() -> bool:
    """Whether someone listens (work that costs something to report can skip it otherwise)."""
    return _reporter.get() is not None


def report(stage: str, done: int, total: int | None = None) -> None:
    """`done` of `total` items of `stage` are finished (`total` None: `done` more are)."""
    reporter = _reporter.get()
    if reporter is not None:
        reporter(stage, done, total)


def each(stage: str, items: Sequence[T] | Iterable[T]) -> Iterator[T]:
    """The items, reporting `stage` as (n, N) after each one is dealt with."""
    items = list(items)
    for number, item in enumerate(items, 1):
        yield item
        report(stage, number, len(items))

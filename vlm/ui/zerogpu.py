"""ZeroGPU (Hugging Face Spaces): GPU work runs inside functions decorated with `spaces.GPU`.

Elsewhere (no `spaces` package, or a Space without ZeroGPU) the functions are returned unchanged.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable, Iterator, TypeVar

T = TypeVar("T")
GPU_SECONDS = 120  # longest GPU lease per call


def active() -> bool:
    """True on a ZeroGPU Space (the `spaces` package is installed and SPACES_ZERO_GPU is set)."""
    if not os.environ.get("SPACES_ZERO_GPU"):
        return False
    try:
        import spaces  # noqa: F401
    except ImportError:
        return False
    return True


def gpu(fn: Callable[..., T]) -> Callable[..., T]:
    """`fn` running on a leased GPU on ZeroGPU, else `fn` itself."""
    if not active():
        return fn
    import spaces

    return spaces.GPU(duration=GPU_SECONDS)(fn)


def gpu_stream(fn: Callable[..., Iterator[T]]) -> Callable[..., Iterator[T]]:
    """Like `gpu` for a generator `fn(*args, cancel=event)`.

    On ZeroGPU the call runs in another process the event cannot reach, so the event stays here and
    closes the stream when set (the next item after it is set ends the stream).
    """
    if not active():
        return fn

    @gpu
    def remote(*args: Any) -> Iterator[T]:  # a generator function, as spaces.GPU expects for streaming
        yield from fn(*args, cancel=None)

    def run(*args: Any, cancel: threading.Event) -> Iterator[T]:
        stream = remote(*args)
        try:
            for item in stream:
                yield item
                if cancel.is_set():
                    return
        finally:
            stream.close()

    return run

"""Reading a child process's reply with a deadline (the video decoder and the chat-template renderer)."""

from __future__ import annotations

import select
import time
from typing import BinaryIO, Callable

POLL_SECONDS = 0.05  # how often a wait calls its `waiting` callback


def read_exact(pipe: BinaryIO, size: int, deadline: float, waiting: Callable[[], None] | None = None) -> bytearray:
    """`size` bytes from a raw (unbuffered) pipe before the monotonic `deadline`.

    Raises TimeoutError past the deadline and EOFError if the pipe closes first. `waiting` is called
    before each wait of at most POLL_SECONDS (it may raise to stop waiting, e.g. on cancellation).
    """
    buffer = bytearray(size)
    view, got = memoryview(buffer), 0
    while got < size:
        if waiting is not None:
            waiting()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        if not select.select([pipe], [], [], min(remaining, POLL_SECONDS))[0]:
            continue
        count = pipe.readinto(view[got:])
        if not count:
            raise EOFError
        got += count
    return buffer

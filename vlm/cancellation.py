"""Cancellation that reaches work deep inside a request without an event passed through every call.

A pipeline runs a request's work inside `scope(cancel)`; long loops (waiting for the video decoder,
frames, vision-tower blocks, decoder layers) call `check()`, which raises `vlm.errors.Cancelled` once
the event is set. The scope belongs to the thread that opens it.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

from .errors import Cancelled

_local = threading.local()


@contextmanager
def scope(event: threading.Event | None) -> Iterator[None]:
    """Make `event` this thread's cancel event while the block runs (None: nothing can cancel it)."""
    outer = getattr(_local, "event", None)
    _local.event = event
    try:
        yield
    finally:
        _local.event = outer


def requested() -> bool:
    """Has this thread's current request been cancelled?"""
    event = getattr(_local, "event", None)
    return event is not None and event.is_set()


def check() -> None:
    """Raise Cancelled if this thread's current request has been cancelled."""
    if requested():
        raise Cancelled("The request was cancelled.")

"""Threads the library starts: each model's engine runs one scheduler thread while it has requests."""

from __future__ import annotations

import threading
import time


def engine_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "vlm-engine"]


def engines_stop(seconds: float = 1.0) -> bool:
    """Whether every engine thread ends within `seconds` (they end once their requests have)."""
    deadline = time.monotonic() + seconds
    while engine_threads():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True

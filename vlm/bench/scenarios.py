"""What the benchmark measures, shared by our worker and the reference worker (no transformers here)."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable

QUESTION = "Describe this image in detail."
FOLLOW_UP = "What colours dominate it?"
VIDEO_QUESTION = "What happens in this video?"
NEW_TOKENS = 128
VIDEO_FRAMES = 16
FIRST_ANSWER_TOKENS = 16


def image_turn(image_path: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image", "path": image_path}, {"type": "text", "text": QUESTION}]}]


def second_turn(image_path: str, answer: str) -> list[dict[str, Any]]:
    return image_turn(image_path) + [{"role": "assistant", "content": [{"type": "text", "text": answer}]},
                                     {"role": "user", "content": [{"type": "text", "text": FOLLOW_UP}]}]


def video_turn(video_path: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "video", "path": video_path},
                                         {"type": "text", "text": VIDEO_QUESTION}]}]


def reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS and return that RSS in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


def peak_rss() -> int:
    return _status("VmHWM")


def _status(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(field + r":\s+(\d+) kB", text).group(1)) * 1024


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def emit(result: dict[str, Any]) -> None:
    """Workers print one JSON line last; the driver reads it."""
    sys.stdout.write("\nRESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()

"""Admission: a request's peak memory for its images and videos, estimated from their headers before
anything is decoded, against the memory the machine has left. A request that does not fit is refused
with MemoryAdmissionError instead of taking the server (and every other user) out of memory.

The estimate follows what vlm.media and the processors allocate: an image decoded at full size with
its conversion copies (one image at a time), then kept at most at the shrink budget and normalised in
float32 at the model's size; a video one full frame at a time (in the decoder child and on arrival),
its frames kept at the processor's size and normalised in float32. Requests are checked before their
model is loaded, so the model's sizes are those the request asks for (`max_pixels`, `num_frames`,
`fps`) or else the largest defaults of the supported families.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .conversation import Media, media_items, normalize
from .errors import MemoryAdmissionError
from .media import SHRINK_FLOOR, SHRINK_MARGIN, image_header, probe_video

HEADROOM = 512 << 20  # left free for everything else the server does
# The largest default sizes of the families' processors: GLM-4.1V's images (28*28*15000 counting its
# two temporal frames) and whole clips (28*28*2*30000); Qwen2-VL's frames (28*28*768) are smaller.
IMAGE_PIXELS = 28 * 28 * 15000 // 2
CLIP_PIXELS = 28 * 28 * 2 * 30000
# Bytes per pixel: a decode and its conversion copies (an alpha image: RGBA, a white canvas, the
# composite, RGB), a kept RGB image or frame, its float32 patches (two temporal copies of an image,
# rescaled in float64 first, then laid out in patches) and a clip's (normalised, patches, batch).
DECODE_EXTRA = 12
KEPT = 3
IMAGE_TENSORS = 3 * (8 + 4 * 2 * 2)
FRAME_TENSORS = 3 * 4 * 3
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "LA": 2, "PA": 2, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2,
               "RGB": 3, "YCbCr": 3, "RGBA": 4, "RGBX": 4, "CMYK": 4, "I": 4, "F": 4}


def admit(conversation: Any, options: dict[str, Any]) -> None:
    """Raise MemoryAdmissionError when the request's media would need more memory than is left."""
    admit_media(media_items(normalize(conversation)), options)


def admit_media(media: list[Media], options: dict[str, Any]) -> None:
    """`admit` for a list of media items (a segmentation's one image)."""
    if not media:
        return
    needed = media_bytes(media, options)
    free = available_bytes()
    if free is not None and needed > free - HEADROOM:
        raise MemoryAdmissionError(
            f"This request needs about {_gb(needed)} of memory for its images and videos, and the server has "
            f"{_gb(max(free - HEADROOM, 0))} to spare right now. Use fewer or smaller images or fewer video "
            "frames (a lower fps), or try again in a moment.")


def media_bytes(media: list[Media], options: dict[str, Any]) -> int:
    """Estimated peak bytes of reading and preprocessing `media` with these options (see the module)."""
    per_image = options.get("max_pixels") or IMAGE_PIXELS
    peak, kept = 0, 0
    for item in media:
        if item.kind == "image":
            header = image_header(item.source)
            pixels = header.width * header.height
            held = min(pixels, max(SHRINK_MARGIN * per_image, SHRINK_FLOOR))
            peak = max(peak, pixels * (_MODE_BYTES.get(header.mode, 4) + DECODE_EXTRA))
            kept += held * KEPT + min(held, per_image) * IMAGE_TENSORS
        else:
            info = probe_video(item.source)
            pixels = info.width * info.height
            frames = video_frames(item.source, item.options.get("fps", options.get("fps")),
                                  item.options.get("num_frames", options.get("num_frames")))
            per_frame = min(pixels, options.get("max_pixels") or CLIP_PIXELS // max(frames, 1))
            peak = max(peak, pixels * 4 * KEPT)  # a frame decoded in the child, and received and resized here
            kept += frames * per_frame * (KEPT + FRAME_TENSORS)
    return peak + kept


def video_frames(source: Any, fps: float | None, num_frames: int | None) -> int:
    """How many frames a video contributes with these settings (before rounding to the model's multiple)."""
    if num_frames:
        return int(num_frames)
    info = probe_video(source)
    return min(info.num_frames, math.ceil(info.duration * fps)) if fps else info.num_frames


def available_bytes() -> int | None:
    """Memory this process can still take: the kernel's MemAvailable, lowered by a cgroup (v2) limit as
    containers and Spaces set one; None where neither is known."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError):
        pass
    cgroup = Path("/sys/fs/cgroup")
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int((cgroup / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def _gb(n: int) -> str:
    return f"{n / 2**30:.1f} GB"

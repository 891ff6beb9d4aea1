"""Synthetic benchmark media (made here, so the benchmark needs no downloads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def make_image(path: Path, size: tuple[int, int] = (640, 480), variant: int = 0) -> Path:
    """A gradient with a few shapes (moved by `variant`, so that images differ), saved as PNG."""
    if not path.exists():
        w, h = size
        x, y = np.meshgrid(np.linspace(0, 255, w), np.linspace(0, 255, h))
        image = Image.fromarray(np.stack([x, y, 255 - x], axis=-1).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        dx = 7 * variant
        draw.ellipse((w // 4 + dx, h // 4, w // 2 + dx, h // 2), fill=(220, 40, 40))
        draw.rectangle((w // 2 - dx, h // 2, 3 * w // 4 - dx, 3 * h // 4), fill=(30, 160, 60))
        image.save(path)
    return path


def make_video(path: Path, frames: int = 48, size: tuple[int, int] = (426, 240), fps: int = 24) -> Path:
    """A moving square over a gradient, H.264 in MP4."""
    if not path.exists():
        import av

        w, h = size
        with av.open(str(path), "w") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
            for i in range(frames):
                frame = np.broadcast_to(x, (h, w, 3)).astype(np.uint8).copy()
                left = (i * 7) % (w - 40)
                frame[h // 3:h // 3 + 40, left:left + 40] = (250, 200, 0)
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode(None):
                container.mux(packet)
    return path

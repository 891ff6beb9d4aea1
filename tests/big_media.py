"""Large media made here, as issue #14's attacks used them: small files that decode to a lot of pixels.

Written once per test session under pytest's base temp directory (the `where` fixture; import it into a
test module to use it), reused by every module.
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="module")
def where(tmp_path_factory) -> Path:
    """The directory the files are written to, shared by the test session."""
    path = tmp_path_factory.getbasetemp() / "big_media"
    path.mkdir(exist_ok=True)
    return path


def _once(path: Path, write) -> str:
    if not path.exists():
        partial = path.with_name("partial-" + path.name)
        write(partial)
        partial.rename(path)
    return str(path)


def big_png(where: Path) -> str:
    """7999 x 7999 pixels (192 MB as RGB) in a ~200 KB PNG."""
    return _once(where / "big.png", lambda p: _gradient(7999, 7999).save(p, format="PNG"))


def strip_png(where: Path) -> str:
    """A 1436 x 44556 strip (64 Mpx, 1:31: just inside the segmentation's aspect limit)."""
    return _once(where / "strip.png", lambda p: _gradient(1436, 44556).save(p, format="PNG"))


def big_jpeg(where: Path) -> str:
    """7999 x 7999 pixels in a ~1 MB JPEG."""
    return _once(where / "big.jpg", lambda p: _gradient(7999, 7999).save(p, format="JPEG", quality=70))


def video_4k(where: Path, frames: int = 64) -> str:
    """3840 x 2160, `frames` frames at 8 fps (1.6 GB of RGB for 64 frames) in a few MB."""
    def write(path: Path) -> None:
        ramp = np.linspace(0, 255, 3840, dtype=np.uint8)[None, :, None].repeat(2160, 0).repeat(3, 2)
        with av.open(str(path), "w", format="mp4") as container:
            stream = container.add_stream("mpeg4", rate=8)
            stream.width, stream.height, stream.pix_fmt, stream.bit_rate = 3840, 2160, "yuv420p", 400_000
            for i in range(frames):
                frame = av.VideoFrame.from_ndarray(np.roll(ramp, 16 * i, axis=1), format="rgb24")
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode(None):
                container.mux(packet)

    return _once(where / f"4k_{frames}.mp4", write)


def _gradient(width: int, height: int) -> Image.Image:
    """A smooth RGB image of that size (compresses to almost nothing)."""
    small = Image.merge("RGB", [Image.linear_gradient("L"), Image.linear_gradient("L").rotate(90),
                                Image.new("L", (256, 256), 128)])
    return small.resize((width, height), Image.Resampling.BILINEAR)

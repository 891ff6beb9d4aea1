"""Draw the demo's example media: three synthetic scenes (PNG) and a short synthetic video (H.264 MP4).

Run `python assets/make_assets.py` to rebuild them; the output is deterministic and committed.
"""

from __future__ import annotations

import math
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
SIZE = (640, 480)


def street() -> Image.Image:
    """A red car on a road under a blue sky, a tree and a yellow sun."""
    img = Image.new("RGB", SIZE, "#87ceeb")
    d = ImageDraw.Draw(img)
    d.rectangle([0, 300, 640, 480], fill="#4caf50")  # grass
    d.rectangle([0, 360, 640, 430], fill="#555555")  # road
    for x in range(20, 640, 80):
        d.rectangle([x, 392, x + 40, 398], fill="#ffffff")  # lane marks
    d.ellipse([500, 40, 580, 120], fill="#ffd700")  # sun
    d.rectangle([80, 200, 105, 330], fill="#8b5a2b")  # trunk
    d.ellipse([30, 110, 155, 230], fill="#2e7d32")  # crown
    d.rounded_rectangle([250, 320, 470, 385], radius=12, fill="#d32f2f")  # car body
    d.polygon([(295, 320), (320, 280), (410, 280), (435, 320)], fill="#d32f2f")  # cabin
    d.polygon([(305, 318), (325, 287), (362, 287), (362, 318)], fill="#bbdefb")  # windows
    d.polygon([(370, 318), (370, 287), (405, 287), (425, 318)], fill="#bbdefb")
    for cx in (300, 420):
        d.ellipse([cx - 24, 362, cx + 24, 410], fill="#212121")  # wheels
        d.ellipse([cx - 10, 376, cx + 10, 396], fill="#9e9e9e")
    return img


def shapes() -> Image.Image:
    """A red circle, a blue square and a green triangle on a wooden table (for counting and grounding)."""
    img = Image.new("RGB", SIZE, "#f5f5f5")
    d = ImageDraw.Draw(img)
    d.rectangle([0, 260, 640, 480], fill="#c8a165")  # table
    for y in range(280, 480, 36):
        d.line([0, y, 640, y + 8], fill="#b08850", width=3)  # wood grain
    d.ellipse([60, 250, 200, 390], fill="#e53935")
    d.rectangle([260, 240, 400, 380], fill="#1e88e5")
    d.polygon([(450, 390), (590, 390), (520, 250)], fill="#43a047")
    return img


def cat() -> Image.Image:
    """A cartoon cat on a sofa."""
    img = Image.new("RGB", SIZE, "#fff3e0")
    d = ImageDraw.Draw(img)
    d.rectangle([0, 0, 640, 120], fill="#ffe0b2")  # wall stripe
    d.rounded_rectangle([60, 280, 580, 440], radius=30, fill="#7b1fa2")  # sofa seat
    d.rounded_rectangle([60, 200, 580, 300], radius=30, fill="#8e24aa")  # sofa back
    d.ellipse([230, 250, 420, 380], fill="#ff9800")  # body
    d.ellipse([250, 150, 370, 260], fill="#ff9800")  # head
    d.polygon([(258, 185), (270, 125), (300, 165)], fill="#ff9800")  # ears
    d.polygon([(362, 185), (350, 125), (320, 165)], fill="#ff9800")
    for ex in (285, 335):
        d.ellipse([ex - 10, 190, ex + 10, 212], fill="#1b5e20")  # eyes
        d.ellipse([ex - 3, 194, ex + 3, 208], fill="#000000")
    d.polygon([(303, 222), (317, 222), (310, 231)], fill="#e91e63")  # nose
    for side in (-1, 1):
        for dy in (-6, 4):
            d.line([310 + side * 15, 228, 310 + side * 60, 228 + dy], fill="#5d4037", width=2)  # whiskers
    d.arc([400, 260, 500, 380], start=200, end=340, fill="#ff9800", width=18)  # tail
    return img


def bouncing_ball(path: Path, seconds: float = 3.0, fps: int = 10, size: tuple[int, int] = (320, 240)) -> None:
    """A red ball bouncing left to right over a floor; H.264 in MP4 (plays in browsers, decodes with PyAV)."""
    width, height = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "28", "preset": "veryslow"}
        frames = round(seconds * fps)
        for i in range(frames):
            img = Image.new("RGB", size, "#e3f2fd")
            d = ImageDraw.Draw(img)
            d.rectangle([0, 200, width, height], fill="#8d6e63")  # floor
            x = 20 + (width - 40) * i / (frames - 1)
            y = 180 - 140 * abs(math.sin(math.pi * 2 * i / frames))
            d.ellipse([x - 20, y - 20, x + 20, y + 20], fill="#e53935")
            frame = av.VideoFrame.from_ndarray(np.asarray(img), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def main() -> None:
    for name, draw in (("street", street), ("shapes", shapes), ("cat", cat)):
        draw().save(HERE / f"{name}.png", optimize=True)
    bouncing_ball(HERE / "bouncing_ball.mp4")


if __name__ == "__main__":
    main()

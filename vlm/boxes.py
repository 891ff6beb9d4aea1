"""Bounding boxes written by grounding models, parsed so a UI can draw them.

Two markups are understood, both with coordinates relative to the image on a 0..1000 scale:
- GLM-4.1V: ``<|begin_of_box|>[x1, y1, x2, y2]<|end_of_box|>``; the bracket style varies ([], [[]],
  (), <>) and one box markup may hold several boxes;
- Qwen2-VL: ``<|object_ref_start|>label<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>``,
  the label part optional.
(x1, y1) is the top-left corner, (x2, y2) the bottom-right. Malformed boxes (a count of numbers that
is not a multiple of four, corners out of range or in the wrong order) are skipped, never raised.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SCALE = 1000.0
MARKUP = ("<|begin_of_box|>", "<|end_of_box|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
          "<|box_end|>")

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_GLM = re.compile(r"<\|begin_of_box\|>((?:(?!<\|begin_of_box\|>).)*?)<\|end_of_box\|>", re.S)
_QWEN = re.compile(r"(?:<\|object_ref_start\|>((?:(?!<\|object_ref_start\|>).)*?)<\|object_ref_end\|>\s*)?"
                   r"<\|box_start\|>((?:(?!<\|box_start\|>).)*?)<\|box_end\|>", re.S)


@dataclass(frozen=True)
class Box:
    """A box as fractions of the image's width and height (0..1), with its label and place in the text."""

    x1: float
    y1: float
    x2: float
    y2: float
    label: str | None = None
    start: int = 0  # character span of the markup in the parsed text
    end: int = 0

    def pixels(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) in pixels of an image of the given size."""
        return (round(self.x1 * width), round(self.y1 * height), round(self.x2 * width), round(self.y2 * height))


def parse_boxes(text: str, scale: float = SCALE) -> list[Box]:
    """Every well-formed box in `text`, in order of appearance."""
    found = []
    for match in _GLM.finditer(text):
        found += _boxes(match.group(1), None, match.span(), scale)
    for match in _QWEN.finditer(text):
        label = match.group(1).strip() if match.group(1) is not None else None
        found += _boxes(match.group(2), label or None, match.span(), scale)
    return sorted(found, key=lambda b: b.start)


def strip_markup(text: str) -> str:
    """`text` without the box markup tokens (the coordinates and labels stay), for display."""
    for token in MARKUP:
        text = text.replace(token, "")
    return text


def _boxes(body: str, label: str | None, span: tuple[int, int], scale: float) -> list[Box]:
    numbers = [float(n) for n in _NUMBER.findall(body)]
    if not numbers or len(numbers) % 4:
        return []
    out = []
    for i in range(0, len(numbers), 4):
        x1, y1, x2, y2 = numbers[i:i + 4]
        if 0 <= x1 < x2 <= scale and 0 <= y1 < y2 <= scale:
            out.append(Box(x1 / scale, y1 / scale, x2 / scale, y2 / scale, label, *span))
    return out

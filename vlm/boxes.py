"""Bounding boxes and points written by grounding models, parsed so a UI can draw them.

Three notations are understood:
- GLM-4.1V: ``<|begin_of_box|>[x1, y1, x2, y2]<|end_of_box|>``; the bracket style varies ([], [[]],
  (), <>) and one box markup may hold several boxes;
- Qwen2-VL: ``<|object_ref_start|>label<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>``,
  the label part optional;
- Qwen2.5-VL: JSON objects ``{"bbox_2d": [x1, y1, x2, y2], "label": ...}`` or ``{"point_2d": [x, y], ...}``,
  usually a list in a ```json block (a fence, a bare list, one object, or a list cut short all parse).
What the numbers are measured in is the family's: the markups use a 0..1000 grid of the image
(`relative_frame`); Qwen2.5-VL uses pixels of the image as its processor resized it (the pipeline's
`box_frame`). Parsed boxes are fractions of the image, so they map onto the original picture.
(x1, y1) is the top-left corner, (x2, y2) the bottom-right. Malformed boxes (a count of numbers that
is not a multiple of four, corners out of the frame or in the wrong order) are skipped, never raised.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Callable

SCALE = 1000.0
MARKUP = ("<|begin_of_box|>", "<|end_of_box|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
          "<|box_end|>")

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_GLM = re.compile(r"<\|begin_of_box\|>((?:(?!<\|begin_of_box\|>).)*?)<\|end_of_box\|>", re.S)
_QWEN = re.compile(r"(?:<\|object_ref_start\|>((?:(?!<\|object_ref_start\|>).)*?)<\|object_ref_end\|>\s*)?"
                   r"<\|box_start\|>((?:(?!<\|box_start\|>).)*?)<\|box_end\|>", re.S)
_JSON_OBJECT = re.compile(r"\{[^{}]*\}")  # grounding objects hold no nested objects

FrameRule = Callable[..., tuple[float, float]]  # (width, height, **media options) -> the frame of the numbers


def relative_frame(width: int, height: int, **media_options: Any) -> tuple[float, float]:
    """The 0..1000 grid of the markup notations, whatever the image's size."""
    return SCALE, SCALE


@dataclass(frozen=True)
class Box:
    """A box (or a point: x1 == x2, y1 == y2) as fractions of the image's width and height (0..1), with its
    label and place in the text."""

    x1: float
    y1: float
    x2: float
    y2: float
    label: str | None = None
    start: int = 0  # character span of the markup in the parsed text
    end: int = 0

    @property
    def is_point(self) -> bool:
        return self.x1 == self.x2 and self.y1 == self.y2

    def pixels(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) in pixels of an image of the given size."""
        return (round(self.x1 * width), round(self.y1 * height), round(self.x2 * width), round(self.y2 * height))


def parse_boxes(text: str, frame: tuple[float, float] = (SCALE, SCALE)) -> list[Box]:
    """Every well-formed box and point in `text`, in order of appearance.

    `frame` is the (width, height) the numbers are measured in: the 0..1000 grid by default, or the
    resized image's size for Qwen2.5-VL (see `ChatPipeline.box_frame`).
    """
    found = []
    for match in _GLM.finditer(text):
        found += _boxes(match.group(1), None, match.span(), frame)
    for match in _QWEN.finditer(text):
        label = match.group(1).strip() if match.group(1) is not None else None
        found += _boxes(match.group(2), label or None, match.span(), frame)
    for match in _JSON_OBJECT.finditer(text):
        found += _json_box(match.group(0), match.span(), frame)
    return sorted(found, key=lambda b: b.start)


def strip_markup(text: str) -> str:
    """`text` without the box markup tokens (the coordinates and labels stay), for display."""
    for token in MARKUP:
        text = text.replace(token, "")
    return text


def _boxes(body: str, label: str | None, span: tuple[int, int], frame: tuple[float, float]) -> list[Box]:
    numbers = [float(n) for n in _NUMBER.findall(body)]
    if not numbers or len(numbers) % 4:
        return []
    out = [_box(numbers[i:i + 4], label, span, frame) for i in range(0, len(numbers), 4)]
    return [box for box in out if box is not None]


def _box(corners: list[float], label: str | None, span: tuple[int, int], frame: tuple[float, float]) -> Box | None:
    x1, y1, x2, y2 = corners
    width, height = frame
    if 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height:
        return Box(x1 / width, y1 / height, x2 / width, y2 / height, label, *span)
    return None


def _json_box(body: str, span: tuple[int, int], frame: tuple[float, float]) -> list[Box]:
    """A Qwen2.5-VL grounding object: {"bbox_2d": [x1, y1, x2, y2]} or {"point_2d": [x, y]}, "label" optional."""
    try:
        item = json.loads(body)
    except ValueError:
        return []
    label = item.get("label")
    label = str(label).strip() or None if label is not None else None
    box, point = item.get("bbox_2d"), item.get("point_2d")
    if _numbers(box, 4):
        found = _box([float(v) for v in box], label, span, frame)
        return [found] if found else []
    if _numbers(point, 2):
        x, y = (float(v) for v in point)
        width, height = frame
        if 0 <= x <= width and 0 <= y <= height:
            return [Box(x / width, y / height, x / width, y / height, label, *span)]
    return []


def _numbers(value: Any, count: int) -> bool:
    return (isinstance(value, list) and len(value) == count
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))

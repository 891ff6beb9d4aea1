"""AnyRes geometry shared by the processor (placeholder counts) and the model (feature packing).

An image is resized into the best of the `image_grid_pinpoints` resolutions, cut into rows x cols tiles
of the vision tower's input size, and its tile features are laid out as one (rows*grid, cols*grid) map,
cropped back to the image's aspect ratio and, past `max_tiles` tiles' worth, downscaled.
"""

from __future__ import annotations

import math
import re

from ...errors import CheckpointError

Size = tuple[int, int]  # (height, width)


def best_resolution(size: Size, pinpoints: list[Size]) -> Size:
    """The pinpoint keeping most of the image's pixels, then wasting the fewest (select_best_resolution)."""
    height, width = size
    best, best_effective, best_wasted = pinpoints[0], 0, math.inf
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = w * h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (h, w), effective, wasted
    return best


def tile_grid(size: Size, pinpoints: list[Size], tile: int) -> Size:
    """(rows, cols) of tiles an image of `size` is cut into."""
    h, w = best_resolution(size, pinpoints)
    return h // tile, w // tile


def unpadded_shape(size: Size, shape: Size) -> Size:
    """The part of a (height, width) feature map covered by the image, not by the letterbox padding."""
    height, width = size
    current_h, current_w = shape
    if width / height > current_w / current_h:
        new_h = int(round(height * (current_w / width), 7))
        return current_h - 2 * ((current_h - new_h) // 2), current_w
    new_w = int(round(width * (current_h / height), 7))
    return current_h, current_w - 2 * ((current_w - new_w) // 2)


def limited_shape(shape: Size, grid: int, max_tiles: int) -> Size:
    """The `anyres_max_N` rule: a map larger than 1.1 x N tiles is downscaled to about N tiles."""
    h, w = shape
    ratio = math.sqrt(h * w / (max_tiles * grid**2))
    return (int(h // ratio), int(w // ratio)) if ratio > 1.1 else shape


def anyres_shape(size: Size, pinpoints: list[Size], tile: int, grid: int, max_tiles: int) -> Size:
    """(height, width) of an image's packed feature map, before the newline column."""
    rows, cols = tile_grid(size, pinpoints, tile)
    return limited_shape(unpadded_shape(size, (rows * grid, cols * grid)), grid, max_tiles)


def max_tiles(vision_aspect_ratio: str) -> int:
    """N of `anyres_max_N`."""
    match = re.fullmatch(r"anyres_max_(\d+)", str(vision_aspect_ratio))
    if not match:
        raise CheckpointError(f"vision_aspect_ratio={vision_aspect_ratio!r} is not supported; expected 'anyres_max_N'.")
    return int(match.group(1))

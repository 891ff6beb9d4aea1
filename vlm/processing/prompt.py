"""Prompts of the Qwen-style families: placeholder expansion and 3-D (M-RoPE) positions.

Each image, video or video frame group is a run of vision tokens in the prompt. Its positions are
(start + temporal index x time step, start + row, start + column) over its merged grid; text advances
all three axes together. Text after a run starts at the run's largest position + 1, as Qwen's own code,
vLLM and transformers <= 5.2 do (5.3+ starts it at start + max(h, w), which overlaps a video whose
temporal positions went further; for images, t = 0, both rules agree).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ..conversation import left_pad
from ..errors import InputError

TEXT, IMAGE, VIDEO = 0, 1, 2  # token types, as the reference's mm_token_type_ids


@dataclass(frozen=True)
class VisionRun:
    """One image, video or frame group as the language model sees it: t x h x w merged tokens."""

    t: int
    h: int
    w: int
    time_step: float | torch.Tensor = 1  # temporal position step between frame groups

    def positions(self, start: int) -> torch.Tensor:
        """(3, t*h*w) positions; temporal ones truncated to integers after the step, as the reference does."""
        temporal = (torch.arange(self.t) * self.time_step).long()
        tt, hh, ww = torch.meshgrid(temporal, torch.arange(self.h), torch.arange(self.w), indexing="ij")
        return torch.stack([tt, hh, ww]).reshape(3, -1) + start


@dataclass(frozen=True)
class Placeholder:
    """A template placeholder token and, per occurrence in order, the ids and types that replace it."""

    name: str  # "image" / "video", for error messages
    token: int
    replacements: Sequence[tuple[list[int], list[int]]]


def repeated(token: int, kind: int, count: int) -> tuple[list[int], list[int]]:
    """A replacement of `count` copies of `token`, all of type `kind`."""
    return [token] * count, [kind] * count


def expand_placeholders(ids: list[int], placeholders: Sequence[Placeholder]) -> tuple[list[int], list[int]]:
    """Replace every placeholder occurrence by its replacement; returns the ids and their types.

    Raises InputError when the prompt has a different number of placeholders than media.
    """
    by_token = {p.token: iter(p.replacements) for p in placeholders}
    for p in placeholders:
        found = ids.count(p.token)
        if found != len(p.replacements):
            raise InputError(f"The prompt has {found} {p.name} placeholders for {len(p.replacements)} {p.name}s.")
    out, types = [], []
    for token in ids:
        if token in by_token:
            new_ids, new_types = next(by_token[token])
            out += new_ids
            types += new_types
        else:
            out.append(token)
            types.append(TEXT)
    return out, types


def mrope_positions(width: int, kinds: list[list[int]],
                    runs: list[list[VisionRun]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (3, B, width) of left-padded rows and each row's next position (B,).

    `kinds` are each row's token types (unpadded), `runs` each row's vision runs in order of appearance.
    """
    batch = len(kinds)
    positions = torch.zeros(3, batch, width, dtype=torch.long)
    next_position = torch.zeros(batch, dtype=torch.long)
    for row, (types, row_runs) in enumerate(zip(kinds, runs)):
        parts, current, vision = [], 0, iter(row_runs)
        for kind, group in itertools.groupby(types):
            count = len(list(group))
            if kind == TEXT:
                parts.append(torch.arange(current, current + count).expand(3, -1))
                current += count
                continue
            run = next(vision, None)
            if run is None or run.t * run.h * run.w != count:
                raise InputError("Vision placeholder runs do not match the patch grids.")
            parts.append(run.positions(current))
            current = int(parts[-1].max()) + 1
        row_positions = torch.cat(parts, dim=1)
        positions[:, row, width - row_positions.shape[1]:] = row_positions
        next_position[row] = row_positions.max() + 1
    return positions, next_position


Row = tuple[list[int], list[int], list[VisionRun], Any, list[Any]]  # ids, types, runs, image part, video parts


def batch_inputs(conversations: list[list[dict]], encode: Callable[[list[dict]], Row], pad: int) -> dict[str, Any]:
    """A left-padded batch of conversations, each encoded by `encode` into its ids, their types, its vision
    runs, its images' (pixel_values, grid_thw) or None, and its videos' (pixel_values, grid_thw, sample).

    Returns input_ids, attention_mask, mm_token_type_ids, each kind's pixels and grids, positions and
    next_position.
    """
    rows, kinds, runs, images, videos = [], [], [], [], []
    for messages in conversations:
        ids, types, row_runs, image_part, video_parts = encode(messages)
        rows.append(ids)
        kinds.append(types)
        runs.append(row_runs)
        images += [image_part] if image_part else []
        videos += video_parts
    input_ids, attention_mask = left_pad(rows, pad)
    out: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask,
                           "mm_token_type_ids": left_pad(kinds, TEXT)[0]}
    for parts, pixels, grid in ((images, "pixel_values", "image_grid_thw"),
                                (videos, "pixel_values_videos", "video_grid_thw")):
        if parts:
            out[pixels] = torch.cat([part[0] for part in parts])
            out[grid] = torch.cat([part[1] for part in parts])
    out["positions"], out["next_position"] = mrope_positions(input_ids.shape[1], kinds, runs)
    return out


def grid_tokens(inputs: dict[str, Any], image_merge: int, video_merge: int) -> dict[str, list[int]]:
    """Placeholder tokens of each image and each video of `inputs`, in order (for cost estimates): a grid
    of t x h x w patches takes t * h * w / merge tokens."""
    return {kind: [int(grid.prod()) // merge for grid in inputs.get(key, [])]
            for kind, key, merge in (("image", "image_grid_thw", image_merge), ("video", "video_grid_thw", video_merge))}


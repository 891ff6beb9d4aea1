"""The merge-block patch layout shared by Qwen2-VL and GLM-4.1V: how processors flatten frames into patch
rows, and the (row, col) of each row that the vision towers' 2-D rotary uses. Both must agree."""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F


def patchify(frames: torch.Tensor, temporal_patch_size: int, patch_size: int, merge_size: int):
    """(T, C, H, W) float32 -> (grid_t * grid_h * grid_w, C * tp * p * p) rows and [grid_t, grid_h, grid_w].

    T is padded to a multiple of the temporal patch size by repeating the last frame (an image is
    one frame repeated, as the reference broadcasts it). Rows go merge block by merge block.
    """
    tp, p, m = temporal_patch_size, patch_size, merge_size
    if pad := -frames.shape[0] % tp:
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)])
    t, c, h, w = frames.shape
    gt, gh, gw = t // tp, h // p, w // p
    x = frames.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (gt, gh/m, gw/m, m, m, C, tp, p, p)
    return x.reshape(gt * gh * gw, c * tp * p * p), [gt, gh, gw]


def normalize_pixels(pixels: np.ndarray, mean, std, rescale_factor: float) -> torch.Tensor:
    """A resized (H, W, 3) uint8 array -> (3, H, W) float32 with the reference's float steps (rescale in
    float64, then normalise in float32)."""
    mean, std = np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)
    x = ((pixels.astype(np.float64) * rescale_factor).astype(np.float32) - mean) / std
    return torch.from_numpy(x).permute(2, 0, 1)


def image_patches(pixels, mean, std, rescale_factor: float, temporal_patch_size: int, patch_size: int,
                  merge_size: int):
    """A resized (H, W, 3) uint8 array -> `patchify`'s rows and grid (see `normalize_pixels`)."""
    x = normalize_pixels(pixels, mean, std, rescale_factor)
    return patchify(x[None], temporal_patch_size, patch_size, merge_size)


def video_patches(frames: torch.Tensor, size: tuple[int, int], mode: str, mean, std, rescale_factor: float,
                  temporal_patch_size: int, patch_size: int, merge_size: int):
    """uint8 frames (T, 3, H, W) -> resized (antialiased, as torchvision), rescaled, normalised patch rows.

    Returns `patchify`'s (rows, [grid_t, grid_h, grid_w]).
    """
    if tuple(size) != tuple(frames.shape[2:]):
        frames = F.interpolate(frames, size=size, mode=mode, align_corners=False, antialias=True)
    mean = torch.tensor(mean) * (1.0 / rescale_factor)  # fused rescale + normalise
    std = torch.tensor(std) * (1.0 / rescale_factor)
    x = (frames.to(torch.float32) - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)
    return patchify(x, temporal_patch_size, patch_size, merge_size)


def patch_rows_cols(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """(row, col) of every patch row `patchify` produces, for each (t, h, w) grid: (N, 2)."""
    out = []
    for t, h, w in grid_thw.tolist():
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        block = (h // merge, merge, w // merge, merge)
        rows = rows.reshape(block).transpose(1, 2).flatten()
        cols = cols.reshape(block).transpose(1, 2).flatten()
        out.append(torch.stack([rows, cols], dim=-1).repeat(t, 1))
    return torch.cat(out)

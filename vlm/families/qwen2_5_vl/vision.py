"""Qwen2.5-VL vision transformer: 3-D patch embedding, 2-D rotary RMSNorm blocks with SwiGLU MLPs, window
attention (tokens reordered window by window; blocks in `fullatt_block_indexes` attend over each whole
image or frame group, the others within windows of `window_size` pixels), the 2x2 patch merger into the
language model's width, and the order undone."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ... import cancellation
from ...layers.mlp import GatedMLP
from ...layers.norms import RMSNorm
from ...layers.patches import patch_rows_cols
from ...layers.rotary import VisionRotary2D
from ...layers.vit import PatchEmbed, PatchMerger, VisionBlock, frame_lengths


@dataclass
class VisionConfig:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int  # the language model's width
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112  # pixels per window side
    fullatt_block_indexes: list[int] = field(default_factory=lambda: [7, 15, 23, 31])
    tokens_per_second: int = 4  # temporal positions per second of video (the reference's default)
    in_channels: int = 3
    hidden_act: str = "silu"
    rope_theta: float = 10000.0

    @classmethod
    def from_dict(cls, d: dict[str, Any], text_hidden: int) -> "VisionConfig":
        """From config.json's vision_config (hub names `in_chans`, or transformers' `in_channels`)."""
        kw = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        kw.setdefault("num_heads", d.get("num_attention_heads"))
        kw.setdefault("depth", d.get("num_hidden_layers"))
        kw.setdefault("out_hidden_size", text_hidden)
        kw["in_channels"] = d.get("in_channels", d.get("in_chans", 3))
        if "fullatt_block_indexes" in kw:
            kw["fullatt_block_indexes"] = list(kw["fullatt_block_indexes"])
        kw["rope_theta"] = (d.get("rope_parameters") or {}).get("rope_theta", cls.rope_theta)
        return cls(**kw)


def _rms_norm(dim: int) -> nn.Module:
    return RMSNorm(dim, 1e-6)


def window_order(grid_thw: torch.Tensor, merge: int, window: int) -> tuple[torch.Tensor, list[int]]:
    """Merged units reordered window by window, and the windows' lengths in patches.

    Each frame group of each (t, h, w) grid is cut into windows of `window` x `window` merged units
    (smaller at the right and bottom edges), taken row by row; inside a window the units keep their
    row-major order. Frame groups stay where they were, so whole-frame segments are unchanged.
    """
    order, lengths, offset = [], [], 0
    for t, h, w in grid_thw.tolist():
        units = torch.arange(t * (h // merge) * (w // merge)).view(t, h // merge, w // merge) + offset
        offset += units.numel()
        for frame in units:
            for top in range(0, frame.shape[0], window):
                for left in range(0, frame.shape[1], window):
                    block = frame[top:top + window, left:left + window].flatten()
                    order.append(block)
                    lengths.append(block.numel() * merge * merge)
    return torch.cat(order), lengths


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.patch_embed = PatchEmbed(cfg.in_channels, d, cfg.temporal_patch_size, cfg.patch_size)
        self.rotary = VisionRotary2D(d // cfg.num_heads, cfg.rope_theta)
        self.blocks = nn.ModuleList(
            VisionBlock(d, cfg.num_heads, _rms_norm, GatedMLP(d, cfg.intermediate_size, cfg.hidden_act, bias=True))
            for _ in range(cfg.depth))
        self.merger = PatchMerger(d, cfg.out_hidden_size, cfg.spatial_merge_size, _rms_norm)

    def forward(self, patches: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """patches (N, C*tp*p*p), grid_thw (n, 3) -> merged features (N / merge^2, out_hidden_size)."""
        m = self.cfg.spatial_merge_size
        order, windows = window_order(grid_thw, m, self.cfg.window_size // m // self.cfg.patch_size)
        order = order.to(patches.device)
        frames = frame_lengths(grid_thw)

        def by_window(x: torch.Tensor) -> torch.Tensor:  # rows in merge-unit groups of m*m, reordered
            return x.view(-1, m * m, x.shape[-1])[order].view(-1, x.shape[-1])

        cos, sin = self.rotary(by_window(patch_rows_cols(grid_thw, m).to(patches.device)))
        x = by_window(self.patch_embed(patches))
        for i, block in enumerate(self.blocks):
            cancellation.check()
            x = block(x, cos, sin, frames if i in self.cfg.fullatt_block_indexes else windows)
        return self.merger(x)[torch.argsort(order)]

"""Rotary position embeddings: 1-D (text), multimodal M-RoPE (Qwen2-VL), 2-D axial (vision towers).

Every text rotary maps positions of shape (P, B, L) to cos/sin of shape (B, L, head_dim); P is 1 for
plain text positions and 3 (temporal, height, width) for M-RoPE.
"""

import torch
from torch import nn


def inverse_frequencies(dim: int, theta: float, device=None) -> torch.Tensor:
    """theta ** (-2i / dim) for i < dim / 2, in float32."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, L, D) by cos/sin (B, L, D) in the half-split layout."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


class Rotary(nn.Module):
    """Standard RoPE over the whole head dimension."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta

    def angles(self, positions: torch.Tensor) -> torch.Tensor:
        """positions (P, B, L) -> angles (B, L, head_dim / 2) from the first position axis."""
        inv = inverse_frequencies(self.head_dim, self.theta, positions.device)
        return positions[0, ..., None].float() * inv

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        angles = self.angles(positions)
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


class MRotary(Rotary):
    """Qwen2-VL M-RoPE: frequency bands split by `mrope_section` take temporal, height, width positions."""

    def __init__(self, head_dim: int, theta: float, mrope_section: list[int]):
        super().__init__(head_dim, theta)
        if sum(mrope_section) != head_dim // 2:
            raise ValueError(f"mrope_section {mrope_section} must sum to head_dim / 2 = {head_dim // 2}")
        self.mrope_section = list(mrope_section)

    def angles(self, positions: torch.Tensor) -> torch.Tensor:
        positions = positions.expand(3, -1, -1)
        inv = inverse_frequencies(self.head_dim, self.theta, positions.device)
        per_axis = positions[..., None].float() * inv  # (3, B, L, D/2)
        bands = per_axis.split(self.mrope_section, dim=-1)
        return torch.cat([band[i % 3] for i, band in enumerate(bands)], dim=-1)


class VisionRotary2D(nn.Module):
    """Axial 2-D RoPE of ViT patches: half the rotary dims follow the row, half the column."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        self.dim = head_dim // 2
        self.theta = theta

    def forward(self, rows_cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """rows_cols (N, 2) -> cos, sin (N, head_dim) in float32."""
        inv = inverse_frequencies(self.dim, self.theta, rows_cols.device)
        angles = (rows_cols[..., None].float() * inv).flatten(1)  # (N, 2 * dim / 2)
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos(), angles.sin()

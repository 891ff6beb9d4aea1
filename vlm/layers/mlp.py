"""Feed-forward blocks."""

import torch
from torch import nn
from torch.nn import functional as F

from .linear import PackedLinear, packable

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: (1.702 * x).sigmoid_().mul_(x),  # x * sigmoid(1.702 x), one temporary
    "relu": F.relu,
}


def activation(name: str):
    """The activation function a config names."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"Unknown activation {name!r}; known: {sorted(ACTIVATIONS)}") from None


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)), the Llama/Qwen2 MLP (with biases in Qwen2.5-VL's vision tower)."""

    def __init__(self, dim: int, hidden: int, act: str = "silu", bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.act = activation(act)
        self.gate_up_proj: PackedLinear | None = None

    def fuse_projections(self) -> None:
        """Run gate and up as one packed matmul (see `pack_linears`) when the weights allow it."""
        if packable(self.gate_proj, self.up_proj):
            self.gate_up_proj = PackedLinear(self.gate_proj, self.up_proj)
            del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x) if self.gate_up_proj is not None else (self.gate_proj(x), self.up_proj(x))
        return self.down_proj(self.act(gate) * up)


class MLP(nn.Module):
    """fc2(act(fc1(x))), the ViT MLP."""

    def __init__(self, dim: int, hidden: int, act: str = "gelu", out_dim: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, out_dim or dim)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))

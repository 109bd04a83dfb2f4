"""Numerics shared by the vision towers."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def align_to_grid(tokens: torch.Tensor, grid: int) -> torch.Tensor:
    """Upstream `feature_align`: [B, L, C] tokens on a sqrt(L) square -> [B, grid*grid, C].

    The bilinear resize (align_corners=False) runs in fp32 and the result is cast back, exactly as
    mova_encoder.py:160-170 does; a tower already on the grid is returned unchanged.
    """
    b, length, c = tokens.shape
    if length == grid * grid:
        return tokens
    side = math.isqrt(length)
    if side * side != length:
        raise ValueError(f"cannot align {length} tokens to a {grid}x{grid} grid: {length} is not a square")
    dtype = tokens.dtype
    x = tokens.float().reshape(b, side, side, c).permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(grid, grid), mode="bilinear", align_corners=False)
    return x.permute(0, 2, 3, 1).reshape(b, grid * grid, c).to(dtype)


class Mlp(nn.Module):
    """timm's / DINOv2's Mlp: fc1 -> exact GELU -> fc2 (the key names `fc1`, `fc2` are the checkpoints')."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))

"""Numerics and image inputs the vision towers and the adapter share, written once: the bilinear alignment to the
common grid, timm's Mlp, the 2-D RoPE and SwiGLU of EVA-02 style blocks (Co-DETR, the MoV-Adapter), the SAM-style
windows, channels-first LayerNorm and patch embedding (Vary, SAM-H, Co-DETR), and the CLIP-normalised image rows."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ComponentError
from ..core.image_inputs import ImageInput

PATCH = 14                          # CLIP ViT-L/14: upstream sizes every 672 image as image_feat_size * 14

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


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# the base encoder's and BiomedCLIP's input: CLIPImageProcessor at 672 (image_side), CLIP mean/std
CLIP672 = ImageInput("clip672", "resize_crop", None, CLIP_MEAN, CLIP_STD, upstream="CLIPImageProcessor")


def image_side(cfg) -> int:
    """Upstream `image_size = image_feat_size * 14`: 672 for the 48x48 grid."""
    return cfg.image_feat_size * PATCH


def layers_to_run(select_layer: int, num_layers: int, component: str = "base") -> int:
    """How many encoder layers produce hidden_states[select_layer] (hidden_states has num_layers + 1 entries)."""
    index = select_layer if select_layer >= 0 else num_layers + 1 + select_layer
    if not 0 <= index <= num_layers:
        raise ComponentError(f"component {component}: mm_vision_select_layer={select_layer} is outside the "
                             f"{num_layers + 1} hidden states of a {num_layers}-layer tower; use e.g. -2")
    return index


def smooth_image_sample(seed: int, side: int, mean, std) -> torch.Tensor:
    """A smooth random picture in [0,1] at side x side, normalised with mean/std: a realistic value range."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, 16, 16, generator=gen)
    img = F.interpolate(low, size=(side, side), mode="bilinear", align_corners=False)
    return ((img - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)).float()


def rope_tables(head_dim: int, n: int, pt_seq_len: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [n*n, head_dim] of VisionRotaryEmbeddingFast(dim=head_dim // 2, pt_seq_len, ft_seq_len=n)."""
    dim = head_dim // 2
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    t = torch.arange(n) / n * pt_seq_len
    axis = torch.repeat_interleave(t[:, None] * freqs[None, :], 2, dim=-1)            # [n, dim], pairs repeated
    table = torch.cat([axis[:, None, :].expand(n, n, dim), axis[None, :, :].expand(n, n, dim)], dim=-1)
    table = table.reshape(n * n, head_dim)
    return table.cos(), table.sin()


def rotate_half(x: torch.Tensor, n: int, d: int) -> torch.Tensor:
    """x [B, n, d]: adjacent pairs (x0, x1) -> (-x1, x0) (upstream: einops '... (d r) -> ... d r', r=2)."""
    pairs = x.reshape(-1, n, d // 2, 2)
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).reshape(-1, n, d)


class Rope(nn.Module):
    """Upstream VisionRotaryEmbeddingFast: buffers freqs_cos / freqs_sin [n*n, head_dim]."""

    def __init__(self, head_dim: int, n: int, pt_seq_len: int, theta: float, persistent: bool):
        super().__init__()
        self.n, self.head_dim = n * n, head_dim
        cos, sin = rope_tables(head_dim, n, pt_seq_len, theta)
        self.register_buffer("freqs_cos", cos, persistent=persistent)
        self.register_buffer("freqs_sin", sin, persistent=persistent)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t [B * heads, n*n, head_dim]."""
        return t * self.freqs_cos + rotate_half(t, self.n, self.head_dim) * self.freqs_sin


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, eps: float):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(dim, hidden)
        self.ffn_ln = nn.LayerNorm(hidden, eps=eps)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(self.ffn_ln(F.silu(self.w1(x)) * self.w2(x)))


SAM_INPUT = 1024   # high_images side (upstream img_size)


def sam_side(cfg) -> int:
    """The SAM-style towers (Vary, SAM-H, Co-DETR) read high_images at 1024 whatever the grid."""
    return SAM_INPUT


# high_images: upstream's image_processor_2 from the Vary expert folder [inferred: that preprocessor config was not
# read]: taken as a CLIP processor at 1024 with CLIP mean/std, the normalisation Vary's own SAM input uses
SAM1024 = ImageInput("sam1024", "resize_crop", SAM_INPUT, CLIP_MEAN, CLIP_STD, upstream="CLIPImageProcessor")


class LayerNorm2d(nn.Module):
    """segment-anything LayerNorm2d: LayerNorm over the channel axis of [B, C, H, W] (eps 1e-6)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.normalized_shape = (channels,)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def window_partition(x: torch.Tensor, window: int, side: int, dim: int) -> torch.Tensor:
    """[B, side, side, dim] -> [B * nW, window, window, dim], zero-padding bottom/right up to a multiple of window.

    Shapes are Python ints from the architecture (not read from the tensor), so the traced graph is static.
    """
    pad = (window - side % window) % window
    if pad:  # zeros concatenated, not F.pad: the exported Pad's computed pads would hide the static shapes
        b = x.shape[0]
        x = torch.cat([x, x.new_zeros(b, pad, side, dim)], dim=1)
        x = torch.cat([x, x.new_zeros(b, side + pad, pad, dim)], dim=2)
    n = (side + pad) // window
    x = x.reshape(-1, n, window, n, window, dim).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window, window, dim)


def window_unpartition(windows: torch.Tensor, window: int, side: int, dim: int) -> torch.Tensor:
    """Inverse of window_partition, dropping the padding: -> [B, side, side, dim]."""
    padded = side + (window - side % window) % window
    n = padded // window
    x = windows.reshape(-1, n, n, window, window, dim).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(-1, padded, padded, dim)
    return x[:, :side, :side, :] if padded != side else x


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)  # B C H W -> B H W C


class WindowedBlock(nn.Module):
    """The SAM / EVA-02 transformer block's forward: pre-norm attention inside windows (window > 0, padded and
    unpadded by window_partition) or over the whole grid, residual, then the pre-norm MLP. Subclasses create norm1,
    attn, norm2 and mlp (the checkpoints' key names) and set window, side and dim."""
    window: int
    side: int
    dim: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window > 0:
            windows = window_partition(x, self.window, self.side, self.dim)
            x = window_unpartition(self.attn(windows), self.window, self.side, self.dim)
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))

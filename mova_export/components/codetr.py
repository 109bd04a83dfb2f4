"""Expert C: Co-DETR's ViT-L backbone (`ViT02`, EVA-02 style), upstream `mova/model/vision_experts/codetr/vit.py`.

What upstream's `build_codetr_vit_l` builds and `ViT02.forward` runs (the builder's 1280/32/[7,15,23,31] arguments
are ignored; `_build_codetr` hard-codes the ViT-L below), reproduced here operation for operation:
  high_images [1,3,1024,1024] -> fp32 nearest resize to 1280x1280 (floor index, as F.interpolate 'nearest')
  -> patch_embed.proj (conv 16x16 s16, 1024 ch) -> + pos_embed[:, 1:] as 80x80 (pos_embed [1, 6401, 1024] with a
     CLS row; pretrain size 1280 = input size, so upstream's bicubic resize is skipped)
  -> 24 blocks: LayerNorm eps 1e-6 -> attention (q/k/v without bias + q_bias, v_bias; 2-D RoPE on q and k;
     softmax((q * d^-0.5) k^T) v, the xattn=False path; proj) on 16x16 windows (no padding: 80 = 5 x 16), except
     the global blocks 5, 11, 17, 23 -> residual -> LayerNorm eps 1e-6 -> SwiGLU with sub-LN:
     w3(ffn_ln(silu(w1 x) * w2 x)), hidden int(1024 * 4 * 2 / 3) = 2730 -> residual
  -> out_norm (nn.LayerNorm default eps 1e-5) -> neck: 1x1 conv 1024->256 (no bias), LayerNorm2d eps 1e-6, GELU,
     3x3 conv (no bias), LayerNorm2d eps 1e-6 -> fp32 bilinear 80x80 -> 37x37 (align_corners False)
  -> tokens [1, 1369, 256] -> fp32 bilinear 37x37 -> 48x48 (`align_to_grid`, MoVA's feature_align).

RoPE (`VisionRotaryEmbeddingFast`, "lang" frequencies, theta 10000): for head dim d, f_i = 10000^(-2i/(d/2)),
i < d/4; positions t = arange(n) / n * 16 (n = 16 for windows, 80 for global blocks); each frequency repeated twice
(interleaved), rows then columns concatenated: table [n*n, d], first d/2 channels encode the row, last d/2 the
column. Applied as t * cos + rotate_half(t) * sin, rotate_half on adjacent pairs: (x0, x1) -> (-x1, x0).
Upstream registers the two tables as persistent buffers `rope_win` / `rope_glb` and hands the same module to every
block's `attn.rope`, so its state_dict (and a checkpoint saved from it) has `rope_win.freqs_cos`, ...,
`blocks.N.attn.rope.freqs_cos`, ... This module registers them the same way; arch `rope_in_checkpoint: false`
makes them non-persistent for a checkpoint that turns out not to carry them. The forward uses the buffers as
loaded, as upstream does (a bf16 checkpoint therefore brings bf16-rounded tables).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ComponentError
from . import ExpertInfo, MemoryFigures, arch, register
from .layers import (
    CLIP_MEAN,
    CLIP_STD,
    SAM1024,
    LayerNorm2d,
    PatchEmbed,
    Rope,
    SwiGLU,
    WindowedBlock,
    align_to_grid,
    sam_side,
)
from .tower import pixel_input, pixel_sample, tower_spec

NAME = "expert_C"

_COMMON = dict(img_size=1280, pretrain_img_size=1280, patch_size=16, window_size=16, pt_hw_seq_len=16,
               rope_theta=10000.0, mlp_ratio=4 * 2 / 3, out_chans=256, out_size=37, norm_eps=1e-6,
               out_norm_eps=1e-5, neck_eps=1e-6, rope_in_checkpoint=True)
PRESETS: dict[str, dict[str, Any]] = {
    # _build_codetr: window blocks = every index except 5, 11, 17, 23
    "full": {**_COMMON, "embed_dim": 1024, "depth": 24, "num_heads": 16, "global_attn_indexes": (5, 11, 17, 23)},
    "tiny": {**_COMMON, "embed_dim": 64, "depth": 2, "num_heads": 2, "global_attn_indexes": (1,), "out_chans": 32},
}


# ---- RoPE --------------------------------------------------------------------------------------------------------


# ---- blocks ------------------------------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, size: int, rope: Rope):
        super().__init__()
        self.num_heads, self.size, self.dim = num_heads, size, dim
        head_dim = dim // num_heads
        self.scale = head_dim ** -0.5
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.rope = rope
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, size, size, C] (B = batch x windows) -> same shape."""
        s, heads, c = self.size, self.num_heads, self.dim
        n, d = s * s, c // heads
        x = x.reshape(-1, n, c)

        def split(t: torch.Tensor) -> torch.Tensor:                        # [B, n, c] -> [B * heads, n, d]
            return t.reshape(-1, n, heads, d).permute(0, 2, 1, 3).reshape(-1, n, d)

        q = split(F.linear(x, self.q_proj.weight, self.q_bias))
        k = split(F.linear(x, self.k_proj.weight))
        v = split(F.linear(x, self.v_proj.weight, self.v_bias))
        q, k = self.rope(q), self.rope(k)                                   # table [n, d] broadcast over B*heads
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        x = (attn @ v).reshape(-1, heads, n, d).transpose(1, 2).reshape(-1, n, c)
        return self.proj(x).reshape(-1, s, s, c)


class Block(WindowedBlock):
    def __init__(self, dim: int, num_heads: int, hidden: int, window: int, side: int, rope: Rope, eps: float):
        super().__init__()
        self.window, self.side, self.dim = window, side, dim
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, window if window > 0 else side, rope)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = SwiGLU(dim, hidden, eps)


class CoDetrViT(nn.Module):
    """pixel_values [1,3,1024,1024] -> [1, grid^2, out_chans] fp32 (upstream ViT02 + MoVA's feature_align)."""

    def __init__(self, arch: Mapping[str, Any], grid: int):
        super().__init__()
        dim, heads = int(arch["embed_dim"]), int(arch["num_heads"])
        patch, window = int(arch["patch_size"]), int(arch["window_size"])
        self.img_size, self.grid, self.out_size = int(arch["img_size"]), grid, int(arch["out_size"])
        self.side = side = self.img_size // patch
        pre_side = int(arch["pretrain_img_size"]) // patch
        self.pre_side = pre_side
        head_dim = dim // heads
        if head_dim % 4 or side % window:
            raise ComponentError(f"component {NAME}: head dim {head_dim} must be a multiple of 4 (2-D RoPE pairs) "
                                 f"and the {side}x{side} token grid a multiple of window_size {window}")
        persistent = bool(arch["rope_in_checkpoint"])
        pt, theta = int(arch["pt_hw_seq_len"]), float(arch["rope_theta"])
        self.patch_embed = PatchEmbed(patch, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, pre_side * pre_side + 1, dim))   # CLS row + pretrain grid
        self.rope_win = Rope(head_dim, window, pt, theta, persistent)
        self.rope_glb = Rope(head_dim, side, pt, theta, persistent)
        globals_ = {int(i) for i in arch["global_attn_indexes"]}
        hidden, eps = int(dim * float(arch["mlp_ratio"])), float(arch["norm_eps"])
        self.blocks = nn.ModuleList(
            Block(dim, heads, hidden, 0 if i in globals_ else window, side,
                  self.rope_glb if i in globals_ else self.rope_win, eps)
            for i in range(int(arch["depth"])))
        self.out_norm = nn.LayerNorm(dim, eps=float(arch["out_norm_eps"]))
        out, neck_eps = int(arch["out_chans"]), float(arch["neck_eps"])
        self.neck = nn.Sequential(nn.Conv2d(dim, out, kernel_size=1, bias=False), LayerNorm2d(out, neck_eps),
                                  nn.GELU(),
                                  nn.Conv2d(out, out, kernel_size=3, padding=1, bias=False), LayerNorm2d(out, neck_eps))

    def abs_pos(self) -> torch.Tensor:
        """get_abs_pos: drop the CLS row, [1, side, side, C] (bicubic resize only if the pretrain grid differs)."""
        pos = self.pos_embed[:, 1:].reshape(1, self.pre_side, self.pre_side, -1)
        if self.pre_side != self.side:
            pos = F.interpolate(pos.permute(0, 3, 1, 2), size=(self.side, self.side), mode="bicubic",
                                align_corners=False).permute(0, 2, 3, 1)
        return pos

    def neck_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Upstream ViT02 up to the neck: [B, out_chans, 80, 80]."""
        x = F.interpolate(pixel_values.float(), size=(self.img_size, self.img_size), mode="nearest")
        x = self.patch_embed(x) + self.abs_pos()
        for blk in self.blocks:
            x = blk(x)
        x = self.out_norm(x)
        return self.neck(x.permute(0, 3, 1, 2))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.neck_features(pixel_values)
        x = F.interpolate(x.float(), size=(self.out_size, self.out_size), mode="bilinear", align_corners=False)
        tokens = x.flatten(2).transpose(1, 2)                          # [1, 1369, 256], as upstream returns
        return align_to_grid(tokens, self.grid)


# ---- registration ------------------------------------------------------------------------------------------------
def _out_channels(arch: Mapping[str, Any]) -> int:
    return int(arch["out_chans"])


def _build(cfg) -> nn.Module:
    return CoDetrViT(arch(cfg, NAME), cfg.image_feat_size).eval()


register(tower_spec(
    NAME, "vision_tower_3", _out_channels,
    presets=PRESETS,
    build=_build,
    inputs=pixel_input(sam_side),
    sample_inputs=pixel_sample(sam_side, CLIP_MEAN, CLIP_STD),
    expert=ExpertInfo("C", "This model is a state-of-the-art object detector that can identify objects in "
                          "images."),
    image_inputs=(SAM1024,),
    memory=MemoryFigures(params=310_000_000, activation=(6400, 1024), attention=(16, 6400, 2)),
    description="Co-DETR ViT-L/16 (EVA-02 style: 2-D RoPE, SwiGLU, window 16 + 4 global blocks) at 1280, "
                "neck 256 ch at 80x80 -> bilinear 37x37 -> bilinear 48x48",
))

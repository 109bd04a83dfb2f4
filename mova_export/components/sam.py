"""Experts B (Vary: SAM ViT-B image encoder + `net_2`) and G (SAM ViT-H image encoder).

Upstream: `mova/model/vision_experts/vary/sam.py` (segment-anything's `ImageEncoderViT`, built by
`build_sam_vit_b(use_output_conv=True)` / `build_sam_vit_h(use_output_conv=False)`), called by
`mova_encoder.py` on `high_images` [B,3,1024,1024] and aligned to the 48x48 grid by `feature_align`.

What upstream runs, and this module reproduces:
  patch_embed.proj (conv 16x16 s16) -> + pos_embed [1,64,64,C] -> blocks (pre-LN eps 1e-6; window 14 with zero
  padding 64 -> 70 after norm1, or global; decomposed rel-pos added to the logits; exact GELU MLP) ->
  neck (1x1 conv, LayerNorm2d eps 1e-6, 3x3 conv, LayerNorm2d) [-> Vary: net_2 conv3x3 s2 256->512, 64 -> 32]
  -> tokens [1, HW, C] -> fp32 bilinear to 48x48 (`align_to_grid`).
Vary's `net_3` (512->1024) is commented out upstream: the module has no such parameter, so MoVA's shards carry no
`net_3.*` key (only Vary's own release checkpoint does, which upstream loads with strict=False and we never read).

Why not transformers' `SamVisionEncoder`: its numerics are the same (tests/test_towers_sam_codetr.py checks this
module against it to fp32 rounding), but its parameters are named differently (`layers.N.layer_norm1`,
`patch_embed.projection`, `neck.conv1`, ...). State-dict hooks can rename what `state_dict()` returns, not what
`named_parameters()` / `named_modules()` return, and the meta build, the synthetic-checkpoint planner and the ONNX
initialiser names pair those views; a module that uses the checkpoint's names directly keeps them all equal.
LayerNorm2d is computed as `F.layer_norm` over the channel axis (one ONNX LayerNormalization that the fp16 export
keeps in fp32) instead of upstream's explicit mean/var formula: the same math, equal to ~1e-7 (tested).
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
    SAM_INPUT,
    LayerNorm2d,
    PatchEmbed,
    WindowedBlock,
    align_to_grid,
    sam_side,
)
from .tower import pixel_input, pixel_sample, tower_spec

SAM_PATCH = 16
SAM_WINDOW = 14

_COMMON = dict(img_size=SAM_INPUT, patch_size=SAM_PATCH, window_size=SAM_WINDOW, mlp_ratio=4.0, out_chans=256,
               norm_eps=1e-6, neck_eps=1e-6)

# build_sam_vit_b / build_sam_vit_h (vary/sam.py). net2_chans: Vary's `net_2` output width, 0 = no net_2.
VARY_PRESETS: dict[str, dict[str, Any]] = {
    "full": {**_COMMON, "embed_dim": 768, "depth": 12, "num_heads": 12, "global_attn_indexes": (2, 5, 8, 11),
             "net2_chans": 512},
    "tiny": {**_COMMON, "embed_dim": 32, "depth": 2, "num_heads": 2, "global_attn_indexes": (1,),
             "out_chans": 16, "net2_chans": 32},
}
SAM_H_PRESETS: dict[str, dict[str, Any]] = {
    "full": {**_COMMON, "embed_dim": 1280, "depth": 32, "num_heads": 16, "global_attn_indexes": (7, 15, 23, 31),
             "net2_chans": 0},
    "tiny": {**_COMMON, "embed_dim": 48, "depth": 2, "num_heads": 2, "global_attn_indexes": (1,),
             "out_chans": 24, "net2_chans": 0},
}


# ---- numerics ----------------------------------------------------------------------------------------------------


def _rel_index(size: int) -> torch.Tensor:
    """get_rel_pos index for q_size == k_size == size: (q - k) + (size - 1), in [0, 2*size-2]."""
    coords = torch.arange(size)
    return coords[:, None] - coords[None, :] + (size - 1)


class MLPBlock(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(F.gelu(self.lin1(x)))


class Attention(nn.Module):
    """Multi-head attention on a [B, h, w, C] map with decomposed relative position logits (MViTv2)."""

    def __init__(self, dim: int, num_heads: int, size: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim = dim // num_heads
        self.scale = head_dim ** -0.5
        self.size = size
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * size - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * size - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, size, size, C] (B = batch x windows) -> same shape."""
        s, heads = self.size, self.num_heads
        n = s * s
        qkv = self.qkv(x).reshape(-1, n, 3, heads, self.head_dim).permute(2, 0, 3, 1, 4)
        qkv = qkv.reshape(3, -1, n, self.head_dim)                           # [3, B*heads, n, d]
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1)
        # decomposed rel-pos: the rel tables have exactly 2*size-1 rows, so upstream's linear resize is an identity
        index = _rel_index(s)
        rh, rw = self.rel_pos_h[index], self.rel_pos_w[index]               # [s, s, d] each
        r_q = q.reshape(-1, s, s, self.head_dim)
        rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, rh)
        rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, rw)
        attn = attn.reshape(-1, s, s, s, s) + rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]
        attn = attn.reshape(-1, n, n).softmax(dim=-1)
        x = (attn @ v).reshape(-1, heads, s, s, self.head_dim).permute(0, 2, 3, 1, 4)
        return self.proj(x.reshape(-1, s, s, heads * self.head_dim))


class Block(WindowedBlock):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, window: int, side: int, eps: float):
        super().__init__()
        self.window, self.side, self.dim = window, side, dim
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, window if window > 0 else side)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio))


class SamImageEncoder(nn.Module):
    """pixel_values [1,3,1024,1024] -> [1, grid^2, C] (C = 256, or 512 after Vary's net_2), fp32."""

    def __init__(self, arch: Mapping[str, Any], grid: int):
        super().__init__()
        dim, side = int(arch["embed_dim"]), int(arch["img_size"]) // int(arch["patch_size"])
        out, globals_ = int(arch["out_chans"]), {int(i) for i in arch["global_attn_indexes"]}
        self.side, self.grid, self.img_size = side, grid, int(arch["img_size"])
        self.patch_embed = PatchEmbed(int(arch["patch_size"]), dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, side, side, dim))
        self.blocks = nn.ModuleList(
            Block(dim, int(arch["num_heads"]), float(arch["mlp_ratio"]),
                  0 if i in globals_ else int(arch["window_size"]), side, float(arch["norm_eps"]))
            for i in range(int(arch["depth"])))
        eps = float(arch["neck_eps"])
        self.neck = nn.Sequential(nn.Conv2d(dim, out, kernel_size=1, bias=False), LayerNorm2d(out, eps),
                                  nn.Conv2d(out, out, kernel_size=3, padding=1, bias=False), LayerNorm2d(out, eps))
        net2 = int(arch.get("net2_chans") or 0)
        if net2:
            self.net_2 = nn.Conv2d(out, net2, kernel_size=3, stride=2, padding=1, bias=False)

    def neck_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Upstream ImageEncoderViT up to the neck: [B, out_chans, 64, 64] (transformers' SamVisionEncoder output)."""
        x = self.patch_embed(pixel_values) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.neck(x.permute(0, 3, 1, 2))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.neck_features(pixel_values.float())
        if hasattr(self, "net_2"):
            x = self.net_2(x)
        return align_to_grid(x.flatten(2).transpose(1, 2), self.grid)   # [1, H*W, C] tokens, row-major


# ---- registration ------------------------------------------------------------------------------------------------


def _register(name: str, tower: str, expert: ExpertInfo, presets: dict[str, dict[str, Any]], memory: MemoryFigures,
              description: str) -> None:

    def out_channels(arch: Mapping[str, Any]) -> int:
        return int(arch.get("net2_chans") or 0) or int(arch["out_chans"])

    def build(cfg) -> nn.Module:
        hp = arch(cfg, name)
        if int(hp["img_size"]) != SAM_INPUT or SAM_INPUT % int(hp["patch_size"]):
            raise ComponentError(f"component {name}: img_size={hp['img_size']}, patch_size={hp['patch_size']}; "
                                 f"the tower reads high_images at {SAM_INPUT}x{SAM_INPUT}: keep img_size {SAM_INPUT} "
                                 "and a patch size that divides it")
        return SamImageEncoder(hp, cfg.image_feat_size).eval()

    register(tower_spec(name, tower, out_channels, presets=presets, build=build, inputs=pixel_input(sam_side),
                        sample_inputs=pixel_sample(sam_side, CLIP_MEAN, CLIP_STD), expert=expert,
                        image_inputs=(SAM1024,), memory=memory, description=description))


_register("expert_B", "vision_tower_2",
          ExpertInfo("B", "This model can handle images with text accurately and efficiently but fails to process "
                          "natural images."),
          VARY_PRESETS, MemoryFigures(params=96_000_000, activation=(4096, 768), attention=(12, 4096, 4)),
          "Vary: SAM ViT-B/16 image encoder at 1024 + net_2 (3x3 s2, 256->512), 32x32 -> bilinear 48x48")
# attention=(heads, 4096 tokens of a global layer, 4): the decomposed relative positions add two score-sized terms
# to the scores before the softmax; SAM-H's graph held 4.4 GB after one ONNX Runtime CPU run at full size.
_register("expert_G", "vision_tower_7",
          ExpertInfo("G", "This model is a leading image segmentation framework and achieves strong zero-shot "
                          "segmentation performance."),
          SAM_H_PRESETS, MemoryFigures(params=637_000_000, activation=(4096, 1280), attention=(16, 4096, 4)),
          "SAM ViT-H/16 image encoder at 1024, neck 256 ch at 64x64 -> bilinear 48x48")

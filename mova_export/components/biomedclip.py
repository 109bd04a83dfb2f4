"""Expert F: BiomedCLIP's image tower (open_clip `TimmModel` around timm `vit_base_patch16_224`), upstream
`vision_tower_6` (`open_clip.create_model_from_pretrained('hf-hub:microsoft/BiomedCLIP-...').visual`).

What upstream runs, and this module reproduces:
  images_0 (the CLIP-normalised 672 image; MoVA feeds BiomedCLIP no input of its own) -> fp32 bilinear resize to
  224x224 (`F.interpolate(..., mode="bilinear")`: align_corners False, no antialias)
  -> trunk.forward_features (the bundled timm/open_clip copies return it and skip the head):
     patch_embed.proj (conv 16x16 s16) -> [cls_token; patches] + pos_embed [1, 197, 768]
     -> 12 blocks: x + attn(norm1 x); x + mlp(norm2 x)  (LayerNorm eps 1e-6, fused qkv with bias,
        softmax(q * d^-0.5 k^T) v, proj; fc1 -> exact GELU -> fc2)
     -> norm
  -> drop CLS -> [1, 196, 768] (14x14; the paper's 16x16 is not what the code yields) -> fp32 bilinear 48x48.

timm cannot be imported here (it hard-imports torchvision), and transformers' ViT names its parameters differently,
so this small ViT is written out with timm's parameter names (`trunk.*`) and numerics. `head.proj.weight` [512, 768]
(open_clip's image projection, `timm_proj="linear"`, no bias) is in MoVA's checkpoint but never used: it is kept as a
parameter, so checkpoints load strictly and synthetic checkpoints carry it as the real one does, and listed in
`unused_keys` so tools that skip unused weights know to.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ComponentError
from . import ExpertInfo, MemoryFigures, arch, register
from .layers import CLIP672, CLIP_MEAN, CLIP_STD, Mlp, align_to_grid, image_side
from .tower import pixel_input, pixel_sample, tower_spec

NAME = "expert_F"

_COMMON = dict(img_size=224, patch_size=16, mlp_ratio=4.0, qkv_bias=True, norm_eps=1e-6, resize_mode="bilinear",
               resize_align_corners=False)
PRESETS: dict[str, dict[str, Any]] = {
    # vit_base_patch16_224 + open_clip linear projection to the 512-d joint embedding
    "full": {**_COMMON, "embed_dim": 768, "depth": 12, "num_heads": 12, "proj_dim": 512},
    "tiny": {**_COMMON, "embed_dim": 32, "depth": 2, "num_heads": 2, "proj_dim": 16},
}


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)          # NCHW -> NLC


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qkv_bias: bool):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, qkv_bias: bool, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """timm VisionTransformer (class token, no registers, global_pool='', num_classes=0): forward_features only."""

    def __init__(self, arch: Mapping[str, Any]):
        super().__init__()
        dim, patch, size = int(arch["embed_dim"]), int(arch["patch_size"]), int(arch["img_size"])
        eps = float(arch["norm_eps"])
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (size // patch) ** 2 + 1, dim))
        self.patch_embed = PatchEmbed(patch, dim)
        self.blocks = nn.ModuleList(
            Block(dim, int(arch["num_heads"]), float(arch["mlp_ratio"]), bool(arch["qkv_bias"]), eps)
            for _ in range(int(arch["depth"])))
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


class ProjectionHead(nn.Module):
    """open_clip TimmModel.head (`drop` has no parameters): the 768 -> 512 projection MoVA never applies."""

    def __init__(self, dim: int, proj_dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, proj_dim, bias=False)


class BiomedClipTower(nn.Module):
    """pixel_values [1,3,672,672] (CLIP-normalised) -> [1, grid^2, 768] fp32."""

    def __init__(self, arch: Mapping[str, Any], grid: int):
        super().__init__()
        if int(arch["img_size"]) % int(arch["patch_size"]):
            raise ComponentError(f"component {NAME}: img_size {arch['img_size']} is not a multiple of patch_size "
                                 f"{arch['patch_size']}")
        self.img_size, self.grid = int(arch["img_size"]), grid
        self.resize_mode, self.align_corners = str(arch["resize_mode"]), bool(arch["resize_align_corners"])
        self.trunk = VisionTransformer(arch)
        self.head = ProjectionHead(int(arch["embed_dim"]), int(arch["proj_dim"]))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(pixel_values.float(), size=(self.img_size, self.img_size), mode=self.resize_mode,
                          align_corners=self.align_corners)
        return align_to_grid(self.trunk.forward_features(x)[:, 1:], self.grid)


# ---- registration ------------------------------------------------------------------------------------------------
def _out_channels(arch: Mapping[str, Any]) -> int:
    return int(arch["embed_dim"])


register(tower_spec(
    NAME, "vision_tower_6", _out_channels,
    presets=PRESETS,
    build=lambda cfg: BiomedClipTower(arch(cfg, NAME), cfg.image_feat_size).eval(),
    inputs=pixel_input(image_side),
    sample_inputs=pixel_sample(image_side, CLIP_MEAN, CLIP_STD),
    unused_keys=("head.*",),
    expert=ExpertInfo("F", "This model is a foundation model designed for biomedical vision-language processing."),
    image_inputs=(CLIP672,),
    memory=MemoryFigures(params=86_000_000, activation=(197, 768), attention=(12, 197, 2)),
    description="BiomedCLIP ViT-B/16 (timm) on the CLIP-normalised image resized bilinear to 224, forward_features "
                "without CLS, 14x14 -> bilinear 48x48",
))

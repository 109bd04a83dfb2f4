"""Expert A: DINOv2-giant, upstream `vision_tower_1` (`mova/model/vision_experts/dinov2/modeling_dinov2.py`, a copy of
transformers 4.x `Dinov2Model`).

What upstream runs, and this module reproduces:
  images_1 [1,3,672,672] (DINO-normalised: ImageNet mean/std) -> fp32 bilinear resize to 518x518
  (`F.interpolate(..., mode="bilinear")`: align_corners False, no antialias; mova_encoder.py, DINOv2 branch)
  -> embeddings: patch conv 14x14 s14 (37x37) -> [CLS; patches] + position_embeddings [1, 1370, C] (518 is the
     pretrain size, so the repo copy's `interpolate_pos_encoding` returns the table unchanged and no resize is
     exported)
  -> layers: x + ls1 * attn(norm1 x); x + ls2 * mlp(norm2 x)   (LayerNorm eps 1e-6; attention softmax(q k^T / sqrt(d)) v
     with q/k/v biases; SwiGLU for giant: weights_in -> chunk(2) -> silu(x1) * x2 -> weights_out, hidden
     (int(int(C * 4) * 2 / 3) + 7) // 8 * 8 = 4096)
  -> hidden_states[mm_vision_select_layer] (index 0 = embeddings, i + 1 = after layer i; the final `layernorm` is
     not applied to hidden states) -> drop CLS -> [1, 1369, C] (37x37) -> fp32 bilinear 48x48 (`align_to_grid`).

Why not transformers' `Dinov2Model`: transformers 5 renamed its parameters (`attention.q_proj`, `attention.o_proj`,
`mlp.gate_proj/up_proj/down_proj`, converted on load), while MoVA's checkpoint uses the 4.x names of the repo copy
(`attention.attention.query`, `attention.output.dense`, `mlp.weights_in/weights_out`); see sam.py for why renaming
hooks are avoided. The math is checked against transformers' Dinov2Model in tests/test_towers_hf.py.
`embeddings.mask_token` (pre-training only) and the last layer + `layernorm` (unused for select_layer -2) are built
because the checkpoint carries them.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ComponentError
from ..core.image_inputs import ImageInput
from . import ExpertInfo, MemoryFigures, arch, register
from .layers import Mlp, align_to_grid, image_side, layers_to_run
from .tower import pixel_input, pixel_sample, tower_spec

NAME = "expert_A"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# images_1: DINOv2's AutoImageProcessor (a BitImageProcessor) at 672, upstream's image_processor_1
DINO672 = ImageInput("dino672", "resize_crop", None, IMAGENET_MEAN, IMAGENET_STD, upstream="BitImageProcessor")

_COMMON = dict(image_size=518, patch_size=14, mlp_ratio=4.0, use_swiglu_ffn=True, layer_norm_eps=1e-6,
               qkv_bias=True, hidden_act="gelu", resize_mode="bilinear", resize_align_corners=False)
PRESETS: dict[str, dict[str, Any]] = {
    # facebook/dinov2-giant
    "full": {**_COMMON, "hidden_size": 1536, "num_hidden_layers": 40, "num_attention_heads": 24},
    "tiny": {**_COMMON, "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2},
}


def swiglu_hidden(hidden_size: int, mlp_ratio: float) -> int:
    """Dinov2SwiGLUFFN's hidden width: 4096 for the 1536-wide giant."""
    hidden = int(hidden_size * mlp_ratio)
    return (int(hidden * 2 / 3) + 7) // 8 * 8


# ---- modules named as the checkpoint (transformers 4.x Dinov2) -------------------------------------------------------
class PatchEmbeddings(nn.Module):
    def __init__(self, dim: int, patch: int):
        super().__init__()
        self.projection = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(x).flatten(2).transpose(1, 2)


class Embeddings(nn.Module):
    def __init__(self, dim: int, patch: int, side: int):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))           # pre-training only; in the checkpoint
        self.patch_embeddings = PatchEmbeddings(dim, patch)
        self.position_embeddings = nn.Parameter(torch.zeros(1, side * side + 1, dim))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embeddings(pixel_values)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.position_embeddings                            # input at the pretrain size: no resize


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, bias: bool):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.scale = self.head_dim ** -0.5
        self.query = nn.Linear(dim, dim, bias=bias)
        self.key = nn.Linear(dim, dim, bias=bias)
        self.value = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, n, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        attn = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)
        return (attn @ v).transpose(1, 2).reshape(b, n, c)


class SelfOutput(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dense = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(x)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, bias: bool):
        super().__init__()
        self.attention = SelfAttention(dim, heads, bias)
        self.output = SelfOutput(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.attention(x))


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.lambda1 = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.lambda1


class SwiGLUFFN(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.weights_in = nn.Linear(dim, 2 * hidden)
        self.weights_out = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.weights_in(x).chunk(2, dim=-1)
        return self.weights_out(F.silu(x1) * x2)


class Layer(nn.Module):
    def __init__(self, arch: Mapping[str, Any]):
        super().__init__()
        dim, eps = int(arch["hidden_size"]), float(arch["layer_norm_eps"])
        ratio = float(arch["mlp_ratio"])
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attention = Attention(dim, int(arch["num_attention_heads"]), bool(arch["qkv_bias"]))
        self.layer_scale1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = (SwiGLUFFN(dim, swiglu_hidden(dim, ratio)) if arch["use_swiglu_ffn"]
                    else Mlp(dim, int(dim * ratio)))
        self.layer_scale2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.layer_scale1(self.attention(self.norm1(x)))
        return x + self.layer_scale2(self.mlp(self.norm2(x)))


class Encoder(nn.Module):
    def __init__(self, arch: Mapping[str, Any]):
        super().__init__()
        self.layer = nn.ModuleList(Layer(arch) for _ in range(int(arch["num_hidden_layers"])))


class Dinov2Tower(nn.Module):
    """pixel_values [1,3,672,672] (DINO-normalised) -> [1, grid^2, C] fp32."""

    def __init__(self, arch: Mapping[str, Any], select_layer: int, grid: int):
        super().__init__()
        dim, patch, size = int(arch["hidden_size"]), int(arch["patch_size"]), int(arch["image_size"])
        if size % patch:
            raise ComponentError(f"component {NAME}: image_size {size} is not a multiple of patch_size {patch}")
        if arch["hidden_act"] != "gelu":
            raise ComponentError(f"component {NAME}: hidden_act={arch['hidden_act']!r}; only 'gelu' is implemented")
        self.image_size, self.grid = size, grid
        self.resize_mode, self.align_corners = str(arch["resize_mode"]), bool(arch["resize_align_corners"])
        self.embeddings = Embeddings(dim, patch, size // patch)
        self.encoder = Encoder(arch)
        self.layernorm = nn.LayerNorm(dim, eps=float(arch["layer_norm_eps"]))   # unused by MoVA; in the checkpoint
        self.run_layers = layers_to_run(select_layer, int(arch["num_hidden_layers"]), NAME)

    def hidden_state(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """hidden_states[select_layer] at the model's own resolution: [1, 1 + 37*37, C]."""
        x = self.embeddings(pixel_values)
        for layer in self.encoder.layer[: self.run_layers]:
            x = layer(x)
        return x

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(pixel_values.float(), size=(self.image_size, self.image_size), mode=self.resize_mode,
                          align_corners=self.align_corners)
        return align_to_grid(self.hidden_state(x)[:, 1:], self.grid)


# ---- registration ------------------------------------------------------------------------------------------------
def _out_channels(arch: Mapping[str, Any]) -> int:
    return int(arch["hidden_size"])


register(tower_spec(
    NAME, "vision_tower_1", _out_channels,
    presets=PRESETS,
    build=lambda cfg: Dinov2Tower(arch(cfg, NAME), cfg.mm_vision_select_layer, cfg.image_feat_size).eval(),
    inputs=pixel_input(image_side),
    sample_inputs=pixel_sample(image_side, IMAGENET_MEAN, IMAGENET_STD),
    expert=ExpertInfo("A", "This model can effectively extract the accurate spatial and semantic information from "
                          "natural images."),
    image_inputs=(DINO672,),
    memory=MemoryFigures(params=1_140_000_000, activation=(2305, 1536), attention=(24, 2305, 2)),
    description="DINOv2-giant (SwiGLU, 40 layers) at 518 (672 input resized bilinear), hidden_states[select_layer] "
                "without CLS, 37x37 -> bilinear 48x48",
))

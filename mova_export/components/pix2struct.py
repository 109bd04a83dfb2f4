"""Experts D (Pix2Struct-large) and E (Deplot-base): the Pix2Struct vision encoder, upstream `vision_tower_4` / `_5`
(`Pix2StructForConditionalGeneration.from_pretrained(...).get_encoder()`, i.e. transformers' Pix2StructVisionModel).

What upstream runs, and this module reproduces:
  flattened_patches [1, max_patches, 770] (row id, column id, 16*16*3 standardised pixels; zero rows = padding)
  -> embeddings: patch_projection(pixels) + row_embedder(row id) + column_embedder(column id)
  -> layers: x + attn(RMSNorm x); x + gated-GELU MLP(RMSNorm x)  (T5 style: no q.k scaling, no biases,
     wi_0 -> gelu_new, * wi_1 -> wo; RMSNorm eps 1e-6)
  -> layernorm -> last_hidden_state [1, 2025, C] (45x45) -> fp32 bilinear 48x48 (`align_to_grid`).
Upstream calls the encoder without attention_mask, so transformers derives it from the non-zero rows of the
patches; this graph takes the mask as an explicit input instead ("attention_mask", the image processor's own mask,
which is the same thing), so the export has no data-dependent mask computation. Masked keys get
finfo(float32).min added to their logits, as transformers' eager path does.

max_patches = cfg.pix2struct_max_patches (2025 = 45x45, [inferred]: upstream's `int(sqrt(L))` reshape needs a square).
The transformers classes are used as they are (their 5.x parameter names equal the 4.x names of MoVA's
checkpoint: `embeddings.*`, `encoder.layer.N.*`, `layernorm.*`); the wrapper adopts the model's three children
so its keys are exactly those, and runs them with an explicit additive mask.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from ..core.errors import ComponentError
from ..core.image_inputs import ImageInput, preprocess_input
from . import ExpertInfo, MemoryFigures, TensorSpec, arch, register
from .layers import CLIP_MEAN, align_to_grid
from .tower import tower_spec

PATCH = 16
PATCH_DIM = 2 + PATCH * PATCH * 3   # 770
# flattened_patches: Pix2StructImageProcessor (is_vqa False, max_patches = pix2struct_max_patches, per-image
# standardisation); upstream sets its image_mean to CLIP's, which only serves as expand2square's pad colour
PIX2STRUCT = ImageInput("pix2struct", "pix2struct", None, CLIP_MEAN, upstream="Pix2StructImageProcessor")

_COMMON = dict(patch_embed_hidden_size=PATCH * PATCH * 3, seq_len=4096, dense_act_fn="gelu_new",
               layer_norm_eps=1e-6, d_kv=64, attn_implementation="eager")
PIX2STRUCT_PRESETS: dict[str, dict[str, Any]] = {
    # google/pix2struct-large vision_config
    "full": {**_COMMON, "hidden_size": 1536, "num_hidden_layers": 18, "num_attention_heads": 24, "d_ff": 3968},
    "tiny": {**_COMMON, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "d_kv": 16,
             "d_ff": 64},
}
DEPLOT_PRESETS: dict[str, dict[str, Any]] = {
    # google/deplot vision_config (Pix2Struct-base)
    "full": {**_COMMON, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "d_ff": 2048},
    "tiny": {**_COMMON, "hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2, "d_kv": 24,
             "d_ff": 96},
}


class Pix2StructTower(nn.Module):
    """(flattened_patches [1,P,770], attention_mask [1,P]) -> [1, grid^2, C] fp32."""

    def __init__(self, name: str, arch: Mapping[str, Any], grid: int):
        super().__init__()
        from transformers import Pix2StructVisionConfig, Pix2StructVisionModel

        if int(arch["patch_embed_hidden_size"]) != PATCH_DIM - 2:
            raise ComponentError(f"component {name}: patch_embed_hidden_size={arch['patch_embed_hidden_size']}; "
                                 f"the shared flattened patches are 16x16x3 = {PATCH_DIM - 2} pixels + 2 ids")
        config = Pix2StructVisionConfig(
            hidden_size=int(arch["hidden_size"]), patch_embed_hidden_size=int(arch["patch_embed_hidden_size"]),
            d_ff=int(arch["d_ff"]), d_kv=int(arch["d_kv"]), num_hidden_layers=int(arch["num_hidden_layers"]),
            num_attention_heads=int(arch["num_attention_heads"]), dense_act_fn=str(arch["dense_act_fn"]),
            layer_norm_eps=float(arch["layer_norm_eps"]), seq_len=int(arch["seq_len"]),
            dropout_rate=0.0, attention_dropout=0.0)
        config._attn_implementation = str(arch["attn_implementation"])
        model = Pix2StructVisionModel(config)
        self.embeddings = model.embeddings
        self.encoder = model.encoder
        self.layernorm = model.layernorm
        self.grid = grid

    def last_hidden_state(self, flattened_patches: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(flattened_patches.float())
        bias = (1.0 - attention_mask.float())[:, None, None, :] * torch.finfo(torch.float32).min
        for layer in self.encoder.layer:
            x = layer(x, bias)[0]
        return self.layernorm(x)

    def forward(self, flattened_patches: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return align_to_grid(self.last_hidden_state(flattened_patches, attention_mask), self.grid)


# ---- registration ------------------------------------------------------------------------------------------------
def pix2struct_sample(cfg, seed: int) -> dict[str, torch.Tensor]:
    """Real processor output for a smooth random 3:2 picture, not padded to a square, so that the patch grid leaves
    zero rows and the attention mask matters (with image_aspect_ratio "pad" every patch is valid)."""

    rng = np.random.default_rng(seed)
    low = rng.uniform(0, 255, size=(4, 6, 3))
    img = np.kron(low, np.ones((80, 80, 1)))                      # 320 x 480 blocks, edges softened below
    img = (img + np.roll(img, 7, axis=0) + np.roll(img, 7, axis=1)) / 3
    patches, mask = preprocess_input(img.astype(np.uint8), PIX2STRUCT, cfg.with_overrides(image_aspect_ratio="none"))
    return {"flattened_patches": torch.from_numpy(patches), "attention_mask": torch.from_numpy(mask)}


def _inputs(cfg) -> tuple[TensorSpec, ...]:
    p = cfg.pix2struct_max_patches
    return TensorSpec("flattened_patches", (1, p, PATCH_DIM)), TensorSpec("attention_mask", (1, p))


def _out_channels(arch: Mapping[str, Any]) -> int:
    return int(arch["hidden_size"])


def _register(name: str, tower: str, expert: ExpertInfo, presets: dict[str, dict[str, Any]], memory: MemoryFigures,
              description: str) -> None:

    def build(cfg) -> nn.Module:
        p = cfg.pix2struct_max_patches
        side = int(round(p ** 0.5))
        if side * side != p:
            raise ComponentError(f"component {name}: pix2struct_max_patches={p} is not a square; upstream reshapes "
                                 "the tokens to sqrt(L) x sqrt(L), use e.g. 2025 (45x45)")
        return Pix2StructTower(name, arch(cfg, name), cfg.image_feat_size).eval()

    register(tower_spec(name, tower, _out_channels, presets=presets, build=build, inputs=_inputs,
                        sample_inputs=pix2struct_sample, expert=expert, image_inputs=(PIX2STRUCT,), memory=memory,
                        description=description))


_register("expert_D", "vision_tower_4",
          ExpertInfo("D", "This model shows remarkable skill in text recognition, attaining top-tier text analysis "
                          "outcomes across diverse areas"),
          PIX2STRUCT_PRESETS, MemoryFigures(params=515_000_000, activation=(2025, 1536), attention=(24, 2025, 2)),
          "Pix2Struct-large vision encoder (18 layers, 1536) on 2025 flattened 16x16 patches, 45x45 -> bilinear 48x48")
_register("expert_E", "vision_tower_5",
          ExpertInfo("E", "This model is a specialized model designed to achieve state-of-the-art plot and chart "
                          "understanding performance."),
          DEPLOT_PRESETS, MemoryFigures(params=92_000_000, activation=(2025, 768), attention=(12, 2025, 2)),
          "Deplot (Pix2Struct-base) vision encoder (12 layers, 768) on the same patches, 45x45 -> bilinear 48x48")

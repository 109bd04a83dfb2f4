"""Base encoder: CLIP ViT-L/14 (openai/clip-vit-large-patch14-336) run at 672x672, upstream `vision_tower_0`.

What upstream (`mova_encoder.py`) runs, and this module reproduces:
  images_0 [1,3,672,672] (CLIP-normalised) -> transformers' CLIPVisionModel with output_hidden_states
  -> hidden_states[mm_vision_select_layer] (pre_layrnorm output = index 0, layer i output = index i + 1)
  -> drop CLS ("patch") -> [1, 2304, 1024], already on the 48x48 grid (image_size = image_feat_size * 14).
The position embedding has 2305 rows: `resize_image_embeddings` bicubic-resized 24x24 -> 48x48 at load time and
the MoVA checkpoint carries the fine-tuned result, so nothing is resized here.

Only the layers the selected hidden state needs are run (23 of 24 for select_layer -2); the last layer and
`post_layernorm` are still built because the checkpoint carries them.

Key layout: `vision_model.*`, as upstream's CLIPVisionModel saved it. transformers 5 flattened CLIPVisionModel (no
`vision_model.` level, renamed on load), so the transformers module is held as the `vision_model` attribute, which
puts every key back under the checkpoint's spelling without renaming hooks. `vision_model.embeddings.position_ids`
is a non-persistent buffer; checkpoints written by transformers < 4.31 may still carry it, so it is listed as an
unused key (accepted, not loaded).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ..core.errors import ComponentError
from . import MemoryFigures, arch, register
from .layers import CLIP672, CLIP_MEAN, CLIP_STD, align_to_grid, image_side, layers_to_run
from .tower import pixel_input, pixel_sample, tower_spec

NAME = "base"
PATCH = 14

# images_0: CLIPImageProcessor at image_feat_size * 14 (672), upstream's image_processor_0 (also expert F's input)

_COMMON = dict(patch_size=PATCH, hidden_act="quick_gelu", layer_norm_eps=1e-5, attn_implementation="eager")
PRESETS: dict[str, dict[str, Any]] = {
    # CLIP ViT-L/14-336 vision tower
    "full": {**_COMMON, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
             "num_attention_heads": 16},
    # 3 layers so that select_layer -2 runs two of them and leaves one unused, as the full tower does
    "tiny": {**_COMMON, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
             "num_attention_heads": 2},
}


class ClipTower(nn.Module):
    """pixel_values [1,3,672,672] -> hidden_states[select_layer][:, 1:] aligned to [1, grid^2, C], fp32."""

    def __init__(self, arch: Mapping[str, Any], image_size: int, select_layer: int, grid: int):
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModel

        config = CLIPVisionConfig(
            hidden_size=int(arch["hidden_size"]), intermediate_size=int(arch["intermediate_size"]),
            num_hidden_layers=int(arch["num_hidden_layers"]), num_attention_heads=int(arch["num_attention_heads"]),
            image_size=image_size, patch_size=int(arch["patch_size"]), hidden_act=str(arch["hidden_act"]),
            layer_norm_eps=float(arch["layer_norm_eps"]))
        config._attn_implementation = str(arch["attn_implementation"])
        self.vision_model = CLIPVisionModel(config)
        self.run_layers = layers_to_run(select_layer, config.num_hidden_layers)
        self.grid = grid

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vm = self.vision_model
        x = vm.pre_layrnorm(vm.embeddings(pixel_values.float()))     # hidden_states[0]
        for layer in vm.encoder.layers[: self.run_layers]:
            x = layer(x, None)
        return align_to_grid(x[:, 1:], self.grid)                   # "patch": CLS dropped


def _out_channels(arch: Mapping[str, Any]) -> int:
    return int(arch["hidden_size"])


def _build(cfg) -> nn.Module:
    hp = arch(cfg, NAME)
    side = image_side(cfg)
    if int(hp["patch_size"]) != PATCH:
        raise ComponentError(f"component {NAME}: patch_size={hp['patch_size']}; upstream sizes the image as "
                             f"image_feat_size * 14, so the CLIP tower must keep patch 14")
    return ClipTower(hp, side, cfg.mm_vision_select_layer, cfg.image_feat_size).eval()


register(tower_spec(
    NAME, "vision_tower_0", _out_channels,
    presets=PRESETS,
    build=_build,
    inputs=pixel_input(image_side),
    sample_inputs=pixel_sample(image_side, CLIP_MEAN, CLIP_STD),
    image_inputs=(CLIP672,),
    memory=MemoryFigures(params=304_000_000, activation=(2305, 1024), attention=(16, 2305, 2)),
    unused_keys=("vision_model.embeddings.position_ids",),
    description="CLIP ViT-L/14 at 672 (2305-row position embedding), hidden_states[select_layer] without CLS, "
                "48x48 x 1024",
))

"""MoVA's preprocessing as upstream runs it: transformers' image processors (the reference's side).

Upstream (`mova/eval/model_vqa_loader.py` + `mova/mm_utils.process_images`) runs four image processors on the same
RGB picture; with `image_aspect_ratio == "pad"` each first pads the picture to a square (`expand2square`) filled with
*its own* `image_mean` colour (int(m * 255) per channel), then preprocesses it. The towers declare their inputs as
spec.ImageInput rows (kind, method, side, mean, std); here each row is run by the transformers processor it names
(the slow PIL classes, built from explicit parameters: no hub access). The device runtime runs the same rows with
mova_export.core.image_inputs (numpy + PIL); tests/test_preprocess.py holds the two to the same numbers.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..core.errors import ComponentError
from ..core.image_inputs import ImageInput, expand2square, load_image, pad_color

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

PATCH_SIDE = 14          # CLIP / DINOv2 inputs are image_feat_size * 14 pixels (672)
PIX2STRUCT_PATCH = 16


def _maybe_pad(image: "Image.Image", mean, cfg: Any) -> "Image.Image":
    return expand2square(image, pad_color(mean)) if cfg.image_aspect_ratio == "pad" else image


def _processor(row: ImageInput, cfg: Any):
    from transformers.image_utils import PILImageResampling

    side = row.side or cfg.image_feat_size * PATCH_SIDE
    if row.upstream == "CLIPImageProcessor":
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as cls
    elif row.upstream == "BitImageProcessor":
        from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil as cls
    else:
        raise ComponentError(f"image input {row.kind!r}: the reference has no {row.upstream} (it runs "
                             "CLIPImageProcessor, BitImageProcessor and Pix2StructImageProcessor)")
    return cls(size={"shortest_edge": side}, crop_size={"height": side, "width": side}, do_resize=True,
               do_center_crop=True, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
               image_mean=list(row.mean), image_std=list(row.std), resample=PILImageResampling.BICUBIC,
               do_convert_rgb=True)


def pixel_values(image: Any, row: ImageInput, cfg: Any) -> np.ndarray:
    """A square pixel input ("clip" / "bit" rows): [1, 3, S, S] float32."""
    from PIL import Image

    pil = _maybe_pad(Image.fromarray(load_image(image)), row.mean, cfg)
    out = _processor(row, cfg)(images=pil, return_tensors="np")["pixel_values"]
    return np.ascontiguousarray(out, dtype=np.float32)


def pix2struct_patches(image: Any, row: ImageInput, cfg: Any) -> tuple[np.ndarray, np.ndarray]:
    """(flattened_patches [1, P, 770], attention_mask [1, P]) float32, P = cfg.pix2struct_max_patches."""
    from PIL import Image
    from transformers.models.pix2struct.image_processing_pil_pix2struct import Pix2StructImageProcessorPil

    pil = _maybe_pad(Image.fromarray(load_image(image)), row.mean, cfg)
    proc = Pix2StructImageProcessorPil(patch_size={"height": PIX2STRUCT_PATCH, "width": PIX2STRUCT_PATCH},
                                       max_patches=cfg.pix2struct_max_patches, is_vqa=False, do_normalize=True,
                                       do_convert_rgb=True)
    out = proc(images=pil, max_patches=cfg.pix2struct_max_patches, return_tensors="np")
    return (np.ascontiguousarray(out["flattened_patches"], dtype=np.float32),
            np.ascontiguousarray(out["attention_mask"], dtype=np.float32))


def preprocess_input(image: Any, row: ImageInput, cfg: Any) -> list[np.ndarray]:
    """The arrays of one ImageInput row (row.outputs order), with transformers' processors."""
    if row.upstream == "Pix2StructImageProcessor":
        return list(pix2struct_patches(image, row, cfg))
    return [pixel_values(image, row, cfg)]

"""Image loading and MoVA's preprocessing: one picture -> every tower input, as plain numpy arrays by input kind.

Upstream (`mova/eval/model_vqa_loader.py` + `mova/mm_utils.process_images`) runs four image processors on the same
RGB picture; with `image_aspect_ratio == "pad"` each first pads the picture to a square (`expand2square`) filled
with *its own* `image_mean` colour (int(m * 255) per channel), then preprocesses it:

  kind              processor (as upstream configures it)                               fed to
  clip672           CLIPImageProcessor: shortest edge 672, centre crop 672, bicubic,      base, expert F
                    /255, CLIP mean/std (`image_processor_0`, size set to 48 * 14)
  dino672           DINOv2's AutoImageProcessor = BitImageProcessor: the same steps with   expert A
                    ImageNet mean/std (`image_processor_1`, size set to 672)
  sam1024           `image_processor_2`, AutoImageProcessor from the Vary expert folder    experts B, C, G
                    [inferred: that folder's preprocessor config was not read]: taken as a
                    CLIP processor at 1024 (shortest edge + centre crop of the square = a
                    plain 1024x1024 bicubic resize) with CLIP mean/std, the normalisation
                    Vary's own SAM input uses and components/sam.py's sample assumes
  pix2struct (+_mask) Pix2StructImageProcessor, is_vqa False, max_patches =                experts D, E
                    cfg.pix2struct_max_patches, 16x16 patches, per-image standardisation;
                    upstream sets its image_mean to CLIP's, which is the pad colour

The processors are transformers' slow (PIL / numpy) classes built from explicit parameters (no hub access; the
torchvision "fast" backends are not used). PROCESSORS below is the table; change it there, not in code.
Upstream then casts everything to bf16 on the GPU; these arrays are fp32, the exported graphs' input dtype.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import RuntimeInputError

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from .config import MoVAConfig

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PATCH_SIDE = 14          # CLIP / DINOv2 inputs are image_feat_size * 14 pixels (672)
SAM_SIDE = 1024
PIX2STRUCT_PATCH = 16

# kind -> processor class and arguments; "side" None means image_feat_size * 14.
PROCESSORS: dict[str, dict[str, Any]] = {
    "clip672": {"processor": "clip", "side": None, "mean": CLIP_MEAN, "std": CLIP_STD},
    "dino672": {"processor": "bit", "side": None, "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
    "sam1024": {"processor": "clip", "side": SAM_SIDE, "mean": CLIP_MEAN, "std": CLIP_STD},
}
PIX2STRUCT_PAD_MEAN = CLIP_MEAN  # upstream: image_processor_4.image_mean = CLIP mean (only used as the pad colour)

INPUT_KINDS = (*PROCESSORS, "pix2struct", "pix2struct_mask")


# ---- loading -------------------------------------------------------------------------------------------------------
def load_image(image: Any) -> np.ndarray:
    """A path (str / Path), a PIL image, or a numpy uint8 array (HxW gray, HxWx1, HxWx3 RGB, HxWx4 RGBA) -> HxWx3
    uint8 RGB. Alpha is dropped (PIL's convert("RGB"), as upstream's loader does). Raises RuntimeInputError."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise RuntimeInputError(f"image file {path} does not exist; pass the path of a JPEG/PNG picture")
        try:
            with Image.open(path) as pil:
                return np.asarray(pil.convert("RGB"), dtype=np.uint8).copy()
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise RuntimeInputError(f"{path} is not an image PIL can read ({type(exc).__name__}); pass a JPEG/PNG "
                                    "picture") from None
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    if isinstance(image, np.ndarray):
        return _rgb_array(image)
    raise RuntimeInputError(f"cannot read an image from a {type(image).__name__}; pass a file path, a PIL image or "
                            "a numpy HxWx3 uint8 array")


def _rgb_array(a: np.ndarray) -> np.ndarray:
    if a.dtype != np.uint8:
        raise RuntimeInputError(f"image array has dtype {a.dtype}; pass uint8 pixels 0..255 (e.g. "
                                "(x * 255).round().astype(np.uint8) for floats in [0, 1])")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    elif a.ndim == 3 and a.shape[2] in (3, 4):
        a = a[:, :, :3]
    else:
        raise RuntimeInputError(f"image array has shape {list(a.shape)}; pass HxW (gray), HxWx3 (RGB) or HxWx4 "
                                "(RGBA)")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise RuntimeInputError(f"image array has shape {list(a.shape)}: it holds no pixels")
    return np.ascontiguousarray(a)


# ---- upstream steps ------------------------------------------------------------------------------------------------
def pad_color(mean) -> tuple[int, int, int]:
    """expand2square's fill: tuple(int(x * 255) for x in image_processor.image_mean)."""
    return tuple(int(x * 255) for x in mean)


def expand2square(image: "Image.Image", color: tuple[int, int, int]) -> "Image.Image":
    """LLaVA's expand2square: paste the picture centred on a square canvas of its longer side."""
    from PIL import Image

    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), color)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def _maybe_pad(image: "Image.Image", mean, cfg: "MoVAConfig") -> "Image.Image":
    return expand2square(image, pad_color(mean)) if cfg.image_aspect_ratio == "pad" else image


def _processor(kind: str, cfg: "MoVAConfig"):
    from transformers.image_utils import PILImageResampling

    entry = PROCESSORS[kind]
    side = entry["side"] or cfg.image_feat_size * PATCH_SIDE
    if entry["processor"] == "clip":
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as cls
    else:
        from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil as cls
    return cls(size={"shortest_edge": side}, crop_size={"height": side, "width": side}, do_resize=True,
               do_center_crop=True, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
               image_mean=list(entry["mean"]), image_std=list(entry["std"]), resample=PILImageResampling.BICUBIC,
               do_convert_rgb=True)


def pixel_values(image: np.ndarray, kind: str, cfg: "MoVAConfig") -> np.ndarray:
    """One of the square pixel inputs ("clip672", "dino672", "sam1024"): [1, 3, S, S] float32."""
    from PIL import Image

    pil = _maybe_pad(Image.fromarray(load_image(image)), PROCESSORS[kind]["mean"], cfg)
    out = _processor(kind, cfg)(images=pil, return_tensors="np")["pixel_values"]
    return np.ascontiguousarray(out, dtype=np.float32)


def pix2struct_patches(image: np.ndarray, cfg: "MoVAConfig") -> tuple[np.ndarray, np.ndarray]:
    """(flattened_patches [1, P, 770], attention_mask [1, P]) float32, P = cfg.pix2struct_max_patches."""
    from PIL import Image
    from transformers.models.pix2struct.image_processing_pil_pix2struct import Pix2StructImageProcessorPil

    pil = _maybe_pad(Image.fromarray(load_image(image)), PIX2STRUCT_PAD_MEAN, cfg)
    proc = Pix2StructImageProcessorPil(patch_size={"height": PIX2STRUCT_PATCH, "width": PIX2STRUCT_PATCH},
                                       max_patches=cfg.pix2struct_max_patches, is_vqa=False, do_normalize=True,
                                       do_convert_rgb=True)
    out = proc(images=pil, max_patches=cfg.pix2struct_max_patches, return_tensors="np")
    return (np.ascontiguousarray(out["flattened_patches"], dtype=np.float32),
            np.ascontiguousarray(out["attention_mask"], dtype=np.float32))


def preprocess(image: Any, cfg: "MoVAConfig") -> dict[str, np.ndarray]:
    """Every tower input for one picture, keyed by input kind (see INPUT_KINDS and config.EXPERTS[].input_kind)."""
    rgb = load_image(image)
    out = {kind: pixel_values(rgb, kind, cfg) for kind in PROCESSORS}
    out["pix2struct"], out["pix2struct_mask"] = pix2struct_patches(rgb, cfg)
    return out


def tower_inputs(inputs: dict[str, np.ndarray], kind: str) -> list[np.ndarray]:
    """The positional inputs of a tower fed by one preprocessed kind (Pix2Struct also takes its patch mask)."""
    if kind == "pix2struct":
        return [inputs["pix2struct"], inputs["pix2struct_mask"]]
    return [inputs[kind]]

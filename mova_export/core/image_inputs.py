"""Image loading and MoVA's preprocessing: one picture -> every tower input, as plain numpy arrays by input kind.

numpy + PIL only (no torch, no transformers), so the device runtime can use it. Upstream
(`mova/eval/model_vqa_loader.py` + `mova/mm_utils.process_images`) runs four image processors on the same RGB
picture; with `image_aspect_ratio == "pad"` each first pads the picture to a square (`expand2square`) filled with
*its own* `image_mean` colour (int(m * 255) per channel), then preprocesses it. Each tower declares the
`ImageInput` rows it reads (components/, `spec.image_inputs`; a new tower with a CLIP-style input at another size or
mean is one more row there); the registry's rows are:

  kind              method        as upstream configures it                                          fed to
  clip672           resize_crop   CLIPImageProcessor, shortest edge = crop = image_feat_size * 14,    base, expert F
                                  CLIP mean/std (`image_processor_0`)
  dino672           resize_crop   DINOv2's BitImageProcessor, same geometry, ImageNet mean/std       expert A
                                  (`image_processor_1`)
  sam1024           resize_crop   `image_processor_2` from the Vary expert folder [inferred: its      experts B, C, G
                                  preprocessor config was not read]: a CLIP processor at 1024 with
                                  CLIP mean/std, the normalisation Vary's SAM input uses
  pix2struct        pix2struct    Pix2StructImageProcessor, is_vqa False, max_patches =               experts D, E
  (+ _mask)                       cfg.pix2struct_max_patches, 16x16 patches, per-image
                                  standardisation; upstream sets its image_mean to CLIP's, which is
                                  only used as the pad colour

Each method reproduces transformers 5.23's slow (PIL) processor step by step:
* resize_crop (CLIPImageProcessorPil and BitImageProcessorPil run the same steps): PIL bicubic resize of the
  shortest edge to `side`, the long edge int(side * long / short); centre crop at ((H - side) // 2,
  (W - side) // 2); uint8 * (1 / 255) in float64, cast to float32; (x - mean) / std in float32. Bit-identical.
* pix2struct: per-image standardisation in float32 (mean, max(std, 1 / sqrt(N))); the processor's patch grid
  (rows, cols) and torch's `interpolate(mode="bilinear", antialias=True)` to rows*16 x cols*16, with torch's
  float32 filter weights (width pass, then height pass); 16x16x3 patches, channel fastest, behind 1-based row
  and column ids; zero rows up to max_patches; mask = rows whose sum is non-zero (what Pix2Struct derives
  itself). Only the rounding of the weighted sums differs from torch's (its compiled loop fuses some
  multiply-adds): at most a few float32 ulps.
Upstream then casts everything to bf16 on the GPU; these arrays are fp32, the exported graphs' input dtype.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ComponentError, RuntimeInputError

PATCH_SIDE = 14          # side None: image_feat_size * 14 pixels (672), the CLIP / DINOv2 input
PIX2STRUCT_PATCH = 16
# The most pixels a picture may have, checked from the file's header before it is decoded (and for arrays and PIL
# images): 8192 x 8192 = 67.1 megapixels, 192 MiB as RGB. Far above any camera frame MoVA needs (its largest input
# is 1024 x 1024), below Pillow's own decompression-bomb threshold (89.5 megapixels), so a 30000 x 30000 PNG of a
# few kilobytes is refused in microseconds instead of asking for 2.5 GiB.
MAX_IMAGE_PIXELS = 8192 * 8192


class PreprocessConfig(Protocol):
    """What preprocessing reads from a config: MoVAConfig on the build side, the bundle manifest's on the device."""

    image_feat_size: int
    image_aspect_ratio: str
    pix2struct_max_patches: int


@dataclass(frozen=True)
class ImageInput:
    """One row of the preprocessing table: how one input kind is made from the RGB picture.

    method "resize_crop" (CLIP / BiT processors) makes `kind` [1, 3, S, S] with S = side, or
    cfg.image_feat_size * 14 when side is None; "pix2struct" makes `kind` [1, P, 770] and `kind + "_mask"` [1, P]
    with P = cfg.pix2struct_max_patches (side and std unused). `mean` is also the expand2square fill colour.
    upstream: the transformers processor class upstream configures for it (the PyTorch reference runs that one).
    """

    kind: str
    method: str
    side: int | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float] | None = None
    upstream: str = "CLIPImageProcessor"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "method": self.method, "side": self.side, "mean": list(self.mean),
                "std": None if self.std is None else list(self.std), "upstream": self.upstream}

    @classmethod
    def from_json(cls, raw: Any) -> "ImageInput":
        return cls(str(raw["kind"]), str(raw["method"]), None if raw.get("side") is None else int(raw["side"]),
                   tuple(float(v) for v in raw["mean"]),
                   None if raw.get("std") is None else tuple(float(v) for v in raw["std"]),
                   str(raw.get("upstream", "CLIPImageProcessor")))

    def __post_init__(self) -> None:
        if self.method not in _METHODS:
            raise ComponentError(f"image input {self.kind!r} has method {self.method!r}; use one of "
                                 f"{sorted(_METHODS)}")
        if len(self.mean) != 3:
            raise ComponentError(f"image input {self.kind!r} has a mean of {len(self.mean)} values; give one per "
                                 "RGB channel")
        if self.method == "resize_crop":
            if self.side is not None and self.side < 1:
                raise ComponentError(f"image input {self.kind!r} has side {self.side}; use a positive pixel count "
                                     "or None for image_feat_size * 14")
            if self.std is None or len(self.std) != 3 or min(self.std) <= 0:
                raise ComponentError(f"image input {self.kind!r} needs a std of 3 positive values (one per RGB "
                                     f"channel), got {self.std}")

    @property
    def pad_color(self) -> tuple[int, int, int]:
        return pad_color(self.mean)

    @property
    def outputs(self) -> tuple[str, ...]:
        """The keys this row adds to preprocess()'s result, in a tower's input order."""
        return (self.kind, f"{self.kind}_mask") if self.method == "pix2struct" else (self.kind,)


# ---- loading -------------------------------------------------------------------------------------------------------
def load_image(image: Any) -> np.ndarray:
    """A path (str / Path), a PIL image, or a numpy uint8 array (HxW gray, HxWx1, HxWx3 RGB, HxWx4 RGBA) -> HxWx3
    uint8 RGB. Alpha is dropped (PIL's convert("RGB"), as upstream's loader does). Raises RuntimeInputError."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise RuntimeInputError(f"image file {path} does not exist; pass the path of a JPEG/PNG picture")
        try:
            with warnings.catch_warnings():   # Pillow warns above its own limit; ours (below it) refuses first
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path) as pil:     # reads the header only
                    check_pixels(pil.width, pil.height, str(path))
                    return np.asarray(pil.convert("RGB"), dtype=np.uint8).copy()
        except Image.DecompressionBombError as exc:   # Pillow's own check, in open(), past twice its limit
            size = "".join(c for c in str(exc).split(" pixels")[0] if c.isdigit())
            raise RuntimeInputError(f"{path} is {int(size or 0) / 1e6:.1f} megapixels, above the limit of "
                                    f"{_limit()}; downscale it (MoVA's largest input is 1024x1024)") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
            raise RuntimeInputError(f"{path} is not an image PIL can read ({type(exc).__name__}); pass a JPEG/PNG "
                                    "picture") from None
    if isinstance(image, Image.Image):
        check_pixels(image.width, image.height, "the PIL image")
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    if isinstance(image, np.ndarray):
        if image.ndim >= 2:
            check_pixels(image.shape[1], image.shape[0], "the image array")
        return _rgb_array(image)
    raise RuntimeInputError(f"cannot read an image from a {type(image).__name__}; pass a file path, a PIL image or "
                            "a numpy HxWx3 uint8 array")


def _limit() -> str:
    side = math.isqrt(MAX_IMAGE_PIXELS)
    return f"{MAX_IMAGE_PIXELS / 1e6:.1f} megapixels" + (f" ({side}x{side})" if side * side == MAX_IMAGE_PIXELS else "")


def check_pixels(width: int, height: int, what: str) -> None:
    """RuntimeInputError when a picture has more than MAX_IMAGE_PIXELS pixels (before anything is decoded)."""
    if width * height > MAX_IMAGE_PIXELS:
        raise RuntimeInputError(f"{what} is {width}x{height} = {width * height / 1e6:.1f} megapixels, above the limit "
                                f"of {_limit()}; downscale it (MoVA's largest input is 1024x1024)")


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


def expand2square(image: Image.Image, color: tuple[int, int, int]) -> Image.Image:
    """LLaVA's expand2square: paste the picture centred on a square canvas of its longer side."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), color)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def _resize_crop(image: Image.Image, row: ImageInput, cfg: PreprocessConfig) -> dict[str, np.ndarray]:
    side = row.side or cfg.image_feat_size * PATCH_SIDE
    height, width = _shortest_edge_size(image.height, image.width, side)
    pixels = np.asarray(image.resize((width, height), Image.Resampling.BICUBIC))
    top, left = (height - side) // 2, (width - side) // 2
    crop = pixels[top:top + side, left:left + side]          # never out of bounds: both edges are >= side
    scaled = (crop.astype(np.float64) * (1 / 255)).astype(np.float32)
    normalised = (scaled - np.asarray(row.mean, np.float32)) / np.asarray(row.std, np.float32)
    return {row.kind: np.ascontiguousarray(normalised.transpose(2, 0, 1)[None])}


def _shortest_edge_size(height: int, width: int, side: int) -> tuple[int, int]:
    """transformers' get_resize_output_image_size(default_to_square=False): (height, width)."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(side * long / short)
    return (new_long, side) if width <= height else (side, new_long)


def _pix2struct(image: Image.Image, row: ImageInput, cfg: PreprocessConfig) -> dict[str, np.ndarray]:
    max_patches, patch = int(cfg.pix2struct_max_patches), PIX2STRUCT_PATCH
    # CHW view of the HWC pixels, as the processor holds them (np.mean / np.std sum in that memory order)
    pixels = np.moveaxis(np.asarray(image), -1, 0).astype(np.float32)
    std = max(np.std(pixels), 1.0 / math.sqrt(pixels.size))
    pixels = (pixels - np.mean(pixels)) / std
    rows, cols = _patch_grid(image.height, image.width, max_patches)
    resized = _resize_linear_antialias(pixels, rows * patch, cols * patch)
    patches = resized.reshape(3, rows, patch, cols, patch).transpose(1, 3, 2, 4, 0).reshape(rows * cols, -1)
    flat = np.zeros((max_patches, 2 + patches.shape[1]), np.float32)
    flat[:rows * cols, 0] = np.repeat(np.arange(1, rows + 1), cols)     # 1-based: 0 marks padding
    flat[:rows * cols, 1] = np.tile(np.arange(1, cols + 1), rows)
    flat[:rows * cols, 2:] = patches
    mask = (flat.sum(axis=-1) != 0).astype(np.float32)
    return {row.kind: flat[None], f"{row.kind}_mask": mask[None]}


def _patch_grid(height: int, width: int, max_patches: int) -> tuple[int, int]:
    """Pix2Struct's grid: the most patches that fit max_patches at the picture's aspect ratio (its float math)."""
    patch = PIX2STRUCT_PATCH
    scale = (max_patches * (patch / height) * (patch / width)) ** 0.5
    rows = max(min(int(scale * height / patch), max_patches), 1)
    cols = max(min(int(scale * width / patch), max_patches), 1)
    return rows, cols


def _resize_linear_antialias(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """torch.nn.functional.interpolate(x[None], (height, width), mode="bilinear", align_corners=False,
    antialias=True)[0] for float32 CHW x: separable, the width pass first; an unchanged axis is not resampled."""
    if x.shape[2] != width:
        x = _resample_axis(x, width, axis=2)
    if x.shape[1] != height:
        x = _resample_axis(x, height, axis=1)
    return x


def _resample_axis(x: np.ndarray, size: int, axis: int) -> np.ndarray:
    index, weight = _linear_antialias_taps(x.shape[axis], size)
    shape = [1] * x.ndim
    shape[axis] = size
    out = np.take(x, index[:, 0], axis=axis) * weight[:, 0].reshape(shape)
    for k in range(1, index.shape[1]):
        out += np.take(x, index[:, k], axis=axis) * weight[:, k].reshape(shape)
    return out


def _linear_antialias_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Input index and weight [out_size, K] per output pixel of torch's antialiased linear filter (ATen
    UpSampleKernel.cpp, _compute_indices_min_size_weights_aa) with its mix of float32 and float64 arithmetic, so
    the weights are torch's to the bit; taps past a pixel's support get weight 0 and a valid index."""
    f32, f64 = np.float32, np.float64
    scale = f32(in_size) / f32(out_size)
    support = scale if scale >= 1.0 else f32(1.0)          # the filter widens when downsampling
    invscale = f32(1.0 / f64(scale)) if scale >= 1.0 else f32(1.0)
    taps = math.ceil(support) * 2 + 1
    center = (f64(scale) * (np.arange(out_size) + 0.5)).astype(f32)
    start = np.maximum(((center - support).astype(f64) + 0.5).astype(np.int64), 0)
    count = np.minimum(((center + support).astype(f64) + 0.5).astype(np.int64), in_size) - start
    j = np.arange(taps)
    offset = ((start[:, None] + j).astype(f32) - center[:, None]).astype(f64) + 0.5
    distance = np.abs(offset * invscale).astype(f32)
    weight = np.where((distance < 1.0) & (j < count[:, None]), (1.0 - distance.astype(f64)).astype(f32), f32(0))
    total = np.zeros(out_size, f32)
    for k in range(taps):                                  # torch adds the raw weights one by one in float32
        total += weight[:, k]
    np.divide(weight, total[:, None], out=weight, where=total[:, None] != 0)
    return np.minimum(start[:, None] + j, in_size - 1), weight


_METHODS: dict[str, Callable[[Image.Image, ImageInput, PreprocessConfig], dict[str, np.ndarray]]] = {
    "resize_crop": _resize_crop,
    "pix2struct": _pix2struct,
}

# ---- public entry points -------------------------------------------------------------------------------------------
def preprocess_kind(image: Any, row: ImageInput, cfg: PreprocessConfig) -> dict[str, np.ndarray]:
    """The arrays of one table row (row.outputs -> float32 C-contiguous arrays) for one picture."""
    pil = Image.fromarray(load_image(image))
    if cfg.image_aspect_ratio == "pad":
        pil = expand2square(pil, row.pad_color)
    return _METHODS[row.method](pil, row, cfg)


def preprocess_input(image: Any, row: ImageInput, cfg: PreprocessConfig) -> list[np.ndarray]:
    """The arrays of one row in a tower's input order (row.outputs)."""
    out = preprocess_kind(image, row, cfg)
    return [out[name] for name in row.outputs]


def preprocess(image: Any, rows: Iterable[ImageInput], cfg: PreprocessConfig) -> dict[str, np.ndarray]:
    """Every array of the given rows for one picture, keyed by row output name."""
    rgb = load_image(image)
    out: dict[str, np.ndarray] = {}
    for row in rows:
        out.update(preprocess_kind(rgb, row, cfg))
    return out

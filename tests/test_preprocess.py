"""The numpy + PIL preprocessing against transformers' slow image processors (the construction the previous
implementation used, kept below as the reference) on the scikit-image sample photos and awkward frames, with and
without the square pad; the table of rows; and that the module runs with torch and transformers unimportable.

Measured bounds (this machine, torch 2.13 CPU): clip672 / dino672 / sam1024 are bit-identical (max |diff| 0);
pix2struct patches differ from the torch-computed resize by at most 9.5e-7 (rocket, one-pixel-wide: 1 ulp at
|value| ~ 8; 3 ulps of max(|value|, 1) anywhere); their row / column ids and the mask are identical."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import mova_export

from mova_export.errors import ComponentError
from mova_export.preprocess import (CLIP_MEAN, CLIP_STD, IMAGE_INPUTS, IMAGENET_MEAN, IMAGENET_STD, INPUT_KINDS,
                                    ImageInput, load_image, pix2struct_patches, preprocess, preprocess_kind,
                                    pixel_values, tower_inputs)

PAD = SimpleNamespace(image_feat_size=48, image_aspect_ratio="pad", pix2struct_max_patches=2025)
PLAIN = SimpleNamespace(image_feat_size=48, image_aspect_ratio="none", pix2struct_max_patches=2025)
REPO = Path(mova_export.__file__).resolve().parents[1]   # the subprocess imports this checkout's package
# 2 float32 ulps of the largest patch values (~8): torch's compiled loop fuses some multiply-adds, numpy does not
PIX2STRUCT_BOUND = 2e-6


# ---- the reference: transformers' processors, built as the previous implementation built them -----------------
def _reference_pil(rgb: np.ndarray, mean, cfg):
    from PIL import Image

    from mova_export.preprocess import expand2square, pad_color

    pil = Image.fromarray(load_image(rgb))
    return expand2square(pil, pad_color(mean)) if cfg.image_aspect_ratio == "pad" else pil


def reference_pixel_values(rgb: np.ndarray, kind: str, cfg) -> np.ndarray:
    from transformers.image_utils import PILImageResampling
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    cls, mean, std, side = {"clip672": (CLIPImageProcessorPil, CLIP_MEAN, CLIP_STD, None),
                            "dino672": (BitImageProcessorPil, IMAGENET_MEAN, IMAGENET_STD, None),
                            "sam1024": (CLIPImageProcessorPil, CLIP_MEAN, CLIP_STD, 1024)}[kind]
    side = side or cfg.image_feat_size * 14
    proc = cls(size={"shortest_edge": side}, crop_size={"height": side, "width": side}, do_resize=True,
               do_center_crop=True, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
               image_mean=list(mean), image_std=list(std), resample=PILImageResampling.BICUBIC, do_convert_rgb=True)
    out = proc(images=_reference_pil(rgb, mean, cfg), return_tensors="np")["pixel_values"]
    return np.ascontiguousarray(out, dtype=np.float32)


def reference_pix2struct(rgb: np.ndarray, cfg) -> tuple[np.ndarray, np.ndarray]:
    from transformers.models.pix2struct.image_processing_pil_pix2struct import Pix2StructImageProcessorPil

    proc = Pix2StructImageProcessorPil(patch_size={"height": 16, "width": 16}, max_patches=cfg.pix2struct_max_patches,
                                       is_vqa=False, do_normalize=True, do_convert_rgb=True)
    out = proc(images=_reference_pil(rgb, CLIP_MEAN, cfg), max_patches=cfg.pix2struct_max_patches,
               return_tensors="np")
    return (np.ascontiguousarray(out["flattened_patches"], dtype=np.float32),
            np.ascontiguousarray(out["attention_mask"], dtype=np.float32))


# ---- frames ----------------------------------------------------------------------------------------------------
def _awkward_frames() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 256, (6, 9, 3)), np.ones((37, 41, 1))).astype(np.uint8)   # 222 x 369
    return {
        "wide_odd": smooth[:101, :367],
        "tall_odd": np.ascontiguousarray(smooth[:221, :97].transpose(1, 0, 2)[:, ::-1]),
        "tiny_3x5": rng.integers(0, 256, (3, 5, 3), dtype=np.uint8),
        "one_pixel_wide": rng.integers(0, 256, (9, 1, 3), dtype=np.uint8),
        "one_pixel_high": rng.integers(0, 256, (1, 7, 3), dtype=np.uint8),
        "single_pixel": np.full((1, 1, 3), 200, np.uint8),
        "gray": rng.integers(0, 256, (63, 45), dtype=np.uint8),
        "rgba": np.concatenate([smooth[:80, :120], rng.integers(0, 256, (80, 120, 1), dtype=np.uint8)], axis=2),
        "flat_colour": np.full((50, 70, 3), 123, np.uint8),           # std 0: the 1/sqrt(N) floor
    }


@pytest.fixture(scope="module")
def samples() -> dict[str, np.ndarray]:
    from mova_export.reference import sample_images

    return sample_images()


FRAMES = list(_awkward_frames())
SAMPLES = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "page"]


def _frame(name: str, samples) -> np.ndarray:
    return samples[name] if name in samples else _awkward_frames()[name]


# ---- parity ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [PAD, PLAIN], ids=["pad", "no-pad"])
@pytest.mark.parametrize("name", SAMPLES + FRAMES)
def test_square_inputs_are_bit_identical_to_transformers(name, cfg, samples):
    rgb = _frame(name, samples)
    for kind in ("clip672", "dino672", "sam1024"):
        ours, theirs = pixel_values(rgb, kind, cfg), reference_pixel_values(rgb, kind, cfg)
        side = 1024 if kind == "sam1024" else 672
        assert ours.shape == theirs.shape == (1, 3, side, side), kind
        assert ours.dtype == np.float32 and ours.flags["C_CONTIGUOUS"], kind
        assert np.array_equal(ours, theirs), (kind, float(np.abs(ours - theirs).max()))


@pytest.mark.parametrize("cfg", [PAD, PLAIN], ids=["pad", "no-pad"])
@pytest.mark.parametrize("name", SAMPLES + FRAMES)
def test_pix2struct_patches_match_transformers(name, cfg, samples):
    rgb = _frame(name, samples)
    patches, mask = pix2struct_patches(rgb, cfg)
    ref_patches, ref_mask = reference_pix2struct(rgb, cfg)
    assert patches.shape == ref_patches.shape == (1, 2025, 770) and mask.shape == ref_mask.shape == (1, 2025)
    assert patches.dtype == mask.dtype == np.float32
    assert patches.flags["C_CONTIGUOUS"] and mask.flags["C_CONTIGUOUS"]
    assert np.array_equal(mask, ref_mask)
    assert np.array_equal(patches[..., :2], ref_patches[..., :2])              # row / column ids, zero padding
    assert float(np.abs(patches - ref_patches).max()) <= PIX2STRUCT_BOUND


def test_pix2struct_grid_follows_the_aspect_ratio(samples):
    """coffee (400 x 600) unpadded: a 3:2 grid with zero rows behind it; padded: all 45 x 45 patches."""
    patches, mask = pix2struct_patches(samples["coffee"], PLAIN)
    rows, cols = int(patches[0, :, 0].max()), int(patches[0, :, 1].max())
    assert (rows, cols) == (36, 55) and mask.sum() == rows * cols
    assert np.all(patches[0, rows * cols:] == 0) and np.all(mask[0, rows * cols:] == 0)
    patches, mask = pix2struct_patches(samples["coffee"], PAD)
    assert mask.sum() == 2025 and patches[0, :, 0].max() == 45 and patches[0, :, 1].max() == 45


# ---- the table -------------------------------------------------------------------------------------------------
def test_preprocess_gives_every_kind_and_tower_inputs(samples):
    out = preprocess(samples["chelsea"], PAD)
    assert tuple(out) == INPUT_KINDS == ("clip672", "dino672", "sam1024", "pix2struct", "pix2struct_mask")
    assert np.array_equal(out["dino672"], pixel_values(samples["chelsea"], "dino672", PAD))
    assert [a.shape for a in tower_inputs(out, "pix2struct")] == [(1, 2025, 770), (1, 2025)]
    assert [a.shape for a in tower_inputs(out, "clip672")] == [(1, 3, 672, 672)]


def test_a_new_row_is_one_table_entry(samples):
    """A CLIP-style input at another size and mean needs no code: the row alone, checked against transformers'
    CLIP processor built with those parameters; side None follows image_feat_size."""
    from PIL import Image
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from mova_export.preprocess import expand2square

    row = ImageInput("siglip384", "resize_crop", 384, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    out = preprocess(samples["rocket"], PAD, rows=[row])
    assert list(out) == ["siglip384"] and out["siglip384"].shape == (1, 3, 384, 384)
    proc = CLIPImageProcessorPil(size={"shortest_edge": 384}, crop_size={"height": 384, "width": 384},
                                 image_mean=[0.5] * 3, image_std=[0.5] * 3, rescale_factor=1 / 255)
    padded = expand2square(Image.fromarray(samples["rocket"]), (127, 127, 127))
    assert np.array_equal(out["siglip384"], proc(images=padded, return_tensors="np")["pixel_values"])
    small = SimpleNamespace(image_feat_size=4, image_aspect_ratio="pad", pix2struct_max_patches=64)
    assert preprocess_kind(samples["rocket"], IMAGE_INPUTS["clip672"], small)["clip672"].shape == (1, 3, 56, 56)
    assert preprocess_kind(samples["rocket"], IMAGE_INPUTS["pix2struct"], small)["pix2struct"].shape == (1, 64, 770)


def test_pad_colour_is_the_rows_mean():
    """A picture filled with a row's pad colour pads invisibly: every pixel normalises to ~0 (int(255 m) / 255)."""
    for kind in ("clip672", "dino672", "sam1024"):
        row = IMAGE_INPUTS[kind]
        frame = np.full((30, 80, 3), row.pad_color, np.uint8)
        assert np.abs(pixel_values(frame, kind, PAD)).max() < 0.02, kind
    assert IMAGE_INPUTS["dino672"].pad_color == (123, 116, 103) and IMAGE_INPUTS["clip672"].pad_color == (122, 116, 104)


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="bicubic"), r"method 'bicubic'; use one of \['pix2struct', 'resize_crop'\]"),
    (dict(side=0), r"side 0; use a positive pixel count"),
    (dict(std=None), r"needs a std of 3 positive values"),
    (dict(std=(0.5, 0.0, 0.5)), r"needs a std of 3 positive values"),
    (dict(mean=(0.5, 0.5)), r"mean of 2 values"),
])
def test_bad_rows_are_refused(kwargs, message):
    fields = dict(kind="x", method="resize_crop", side=224, mean=CLIP_MEAN, std=CLIP_STD) | kwargs
    with pytest.raises(ComponentError, match=message) as info:
        ImageInput(**fields)
    assert "\n" not in str(info.value)


# ---- no torch, no transformers ---------------------------------------------------------------------------------
def test_runs_without_torch_and_transformers():
    code = """
import json, sys
from types import SimpleNamespace
sys.modules["torch"] = None          # any import of them now raises ImportError
sys.modules["transformers"] = None
import numpy as np
from mova_export.preprocess import INPUT_KINDS, preprocess
cfg = SimpleNamespace(image_feat_size=4, image_aspect_ratio="pad", pix2struct_max_patches=64)
frame = np.random.default_rng(0).integers(0, 256, (40, 70, 3), dtype=np.uint8)
out = preprocess(frame, cfg)
assert tuple(out) == INPUT_KINDS
print(json.dumps({k: [list(v.shape), str(v.dtype)] for k, v in out.items()}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    shapes = json.loads(done.stdout)
    assert shapes == {"clip672": [[1, 3, 56, 56], "float32"], "dino672": [[1, 3, 56, 56], "float32"],
                      "sam1024": [[1, 3, 1024, 1024], "float32"], "pix2struct": [[1, 64, 770], "float32"],
                      "pix2struct_mask": [[1, 64], "float32"]}

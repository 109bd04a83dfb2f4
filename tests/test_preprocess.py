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
from mova_export.components import image_input_table
from mova_export.components.layers import CLIP_MEAN, CLIP_STD
from mova_export.core.errors import ComponentError
from mova_export.core.image_inputs import ImageInput, preprocess, preprocess_input, preprocess_kind
from mova_export.reference.preprocess import preprocess_input as reference_input

PAD = SimpleNamespace(image_feat_size=48, image_aspect_ratio="pad", pix2struct_max_patches=2025)
PLAIN = SimpleNamespace(image_feat_size=48, image_aspect_ratio="none", pix2struct_max_patches=2025)
REPO = Path(mova_export.__file__).resolve().parents[1]   # the subprocess imports this checkout's package
# 2 float32 ulps of the largest patch values (~8): torch's compiled loop fuses some multiply-adds, numpy does not
PIX2STRUCT_BOUND = 2e-6
ROWS = image_input_table()      # the registry's rows: clip672, dino672, sam1024, pix2struct


# ours, and the reference's transformers processors (mova_export.reference.preprocess), on one row
def pixel_values(rgb: np.ndarray, kind: str, cfg) -> np.ndarray:
    return preprocess_input(rgb, ROWS[kind], cfg)[0]


def pix2struct_patches(rgb: np.ndarray, cfg) -> tuple[np.ndarray, np.ndarray]:
    patches, mask = preprocess_input(rgb, ROWS["pix2struct"], cfg)
    return patches, mask


def reference_pixel_values(rgb: np.ndarray, kind: str, cfg) -> np.ndarray:
    return reference_input(rgb, ROWS[kind], cfg)[0]


def reference_pix2struct(rgb: np.ndarray, cfg) -> tuple[np.ndarray, np.ndarray]:
    patches, mask = reference_input(rgb, ROWS["pix2struct"], cfg)
    return patches, mask


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
    from mova_export.source.photos import sample_images

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
def test_preprocess_gives_every_kind_of_the_registry(samples):
    out = preprocess(samples["chelsea"], ROWS.values(), PAD)
    assert tuple(out) == ("clip672", "dino672", "sam1024", "pix2struct", "pix2struct_mask")
    assert np.array_equal(out["dino672"], pixel_values(samples["chelsea"], "dino672", PAD))
    assert [a.shape for a in preprocess_input(samples["chelsea"], ROWS["pix2struct"], PAD)] == [(1, 2025, 770),
                                                                                             (1, 2025)]
    assert [ROWS[k].upstream for k in ROWS] == ["CLIPImageProcessor", "BitImageProcessor", "CLIPImageProcessor",
                                               "Pix2StructImageProcessor"]


def test_a_new_row_is_one_table_entry(samples):
    """A CLIP-style input at another size and mean needs no code: the row alone, checked against transformers'
    CLIP processor built with those parameters; side None follows image_feat_size."""
    from PIL import Image
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from mova_export.core.image_inputs import expand2square

    row = ImageInput("siglip384", "resize_crop", 384, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    out = preprocess(samples["rocket"], [row], PAD)
    assert list(out) == ["siglip384"] and out["siglip384"].shape == (1, 3, 384, 384)
    proc = CLIPImageProcessorPil(size={"shortest_edge": 384}, crop_size={"height": 384, "width": 384},
                                 image_mean=[0.5] * 3, image_std=[0.5] * 3, rescale_factor=1 / 255)
    padded = expand2square(Image.fromarray(samples["rocket"]), (127, 127, 127))
    assert np.array_equal(out["siglip384"], proc(images=padded, return_tensors="np")["pixel_values"])
    small = SimpleNamespace(image_feat_size=4, image_aspect_ratio="pad", pix2struct_max_patches=64)
    assert preprocess_kind(samples["rocket"], ROWS["clip672"], small)["clip672"].shape == (1, 3, 56, 56)
    assert preprocess_kind(samples["rocket"], ROWS["pix2struct"], small)["pix2struct"].shape == (1, 64, 770)


def test_pad_colour_is_the_rows_mean():
    """A picture filled with a row's pad colour pads invisibly: every pixel normalises to ~0 (int(255 m) / 255)."""
    for kind in ("clip672", "dino672", "sam1024"):
        row = ROWS[kind]
        frame = np.full((30, 80, 3), row.pad_color, np.uint8)
        assert np.abs(pixel_values(frame, kind, PAD)).max() < 0.02, kind
    assert ROWS["dino672"].pad_color == (123, 116, 103) and ROWS["clip672"].pad_color == (122, 116, 104)


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
from mova_export.core.image_inputs import ImageInput, preprocess
rows = [ImageInput.from_json(r) for r in json.loads(sys.argv[1])]
cfg = SimpleNamespace(image_feat_size=4, image_aspect_ratio="pad", pix2struct_max_patches=64)
frame = np.random.default_rng(0).integers(0, 256, (40, 70, 3), dtype=np.uint8)
out = preprocess(frame, rows, cfg)
print(json.dumps({k: [list(v.shape), str(v.dtype)] for k, v in out.items()}))
"""
    rows = json.dumps([row.to_json() for row in ROWS.values()])   # the rows travel as a bundle carries them
    done = subprocess.run([sys.executable, "-c", code, rows], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    shapes = json.loads(done.stdout)
    assert shapes == {"clip672": [[1, 3, 56, 56], "float32"], "dino672": [[1, 3, 56, 56], "float32"],
                      "sam1024": [[1, 3, 1024, 1024], "float32"], "pix2struct": [[1, 64, 770], "float32"],
                      "pix2struct_mask": [[1, 64], "float32"]}

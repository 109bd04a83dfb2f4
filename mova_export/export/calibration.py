"""Calibration sets: real images and the questions asked about them.

`--calib DIR` is a folder of images (jpg, jpeg, png, bmp, webp) plus an optional `questions.txt`: one line per image
as `file name<TAB>question`, or plain lines taken in the images' sorted order; images without a question get a
generic one. Without `--calib`, the built-in set is the 28 pictures of source/photos.py (scenes, documents, counting,
charts, medical images, segmentation and greetings), so every expert sees inputs of its own domain.

The first PARITY_IMAGES images are the parity images: the export proves every graph on them against PyTorch. Every
image calibrates (and the quantization gate holds some out, quantize/feeds.py). The adapter is calibrated on the real
features of the earlier components, not on noise. A set's identity (`digest`) is a hash of its pixels and questions,
so a changed picture, file or question changes every unit that read it.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import CalibrationError, ExportError
from ..core.image_inputs import load_image
from ..source.photos import CALIBRATION_PHOTOS, sample_images

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
QUESTIONS_FILE = "questions.txt"
GENERIC_QUESTION = "What is shown in this image?"


PARITY_IMAGES = 3                    # the first images of a set: the export's parity proof runs on these


@dataclass(frozen=True)
class CalibrationSet:
    labels: tuple[str, ...]          # image names (file stems or sample names)
    samples: tuple[Any, ...]         # sample names or image paths
    questions: tuple[str, ...]
    source: str                      # "built-in" or the folder

    @cached_property
    def _images(self) -> tuple[np.ndarray, ...]:

        names = [s for s in self.samples if not isinstance(s, Path)]
        known = sample_images(names) if names else {}
        return tuple(known[s] if not isinstance(s, Path) else load_image(s) for s in self.samples)

    def images(self) -> list[tuple[str, np.ndarray]]:
        """(label, HxWx3 uint8) of every image of the set (loaded once)."""
        return list(zip(self.labels, self._images))

    @cached_property
    def _digest(self) -> str:
        h = hashlib.sha256()
        for label, image, question in zip(self.labels, self._images, self.questions):
            h.update(f"{label}\0{question}\0{image.shape}\0".encode())
            h.update(np.ascontiguousarray(image).tobytes())
        return h.hexdigest()

    def digest(self) -> str:
        """Identity of the set for unit keys: labels, questions and the decoded pixels of every image."""
        return self._digest

    def parity(self) -> "CalibrationSet":
        """The first PARITY_IMAGES images: what the export proves its graphs on."""
        k = min(PARITY_IMAGES, len(self.labels))
        return CalibrationSet(self.labels[:k], self.samples[:k], self.questions[:k], self.source)

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "images": list(self.labels), "questions": list(self.questions),
                "parity_images": list(self.labels[:PARITY_IMAGES]), "sha256": self.digest()}


def builtin_calibration() -> CalibrationSet:

    names = tuple(p.name for p in CALIBRATION_PHOTOS)
    return CalibrationSet(names, names, tuple(p.question for p in CALIBRATION_PHOTOS),
                          f"built-in ({len(names)} pictures from scikit-image and matplotlib)")


def calibration_from_dir(folder: str | Path) -> CalibrationSet:
    folder = Path(folder)
    if not folder.is_dir():
        raise CalibrationError(f"calibration folder {folder} does not exist; pass a folder of images (and an "
                               f"optional {QUESTIONS_FILE}) or leave --calib out for the built-in set")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if len(images) < 2:
        raise CalibrationError(f"calibration folder {folder} has {len(images)} image(s); calibration needs at least "
                               "2 (one is held out to check the accuracy budget): add images")
    questions = [GENERIC_QUESTION] * len(images)
    qfile = folder / QUESTIONS_FILE
    if qfile.is_file():
        lines = [line.rstrip("\n") for line in qfile.read_text(encoding="utf-8").splitlines() if line.strip()]
        if all("\t" in line for line in lines):
            by_name = dict(line.split("\t", 1) for line in lines)
            unknown = sorted(set(by_name) - {p.name for p in images})
            if unknown:
                raise CalibrationError(f"{qfile} names image(s) {unknown[:3]} that are not in {folder}; fix the "
                                       "file names in its first column")
            questions = [by_name.get(p.name, GENERIC_QUESTION).strip() for p in images]
        elif len(lines) == len(images):
            questions = [line.strip() for line in lines]
        else:
            raise CalibrationError(f"{qfile} has {len(lines)} question line(s) for {len(images)} image(s); give one "
                                   "line per image, or 'file name<TAB>question' lines")
    return CalibrationSet(tuple(p.stem for p in images), tuple(images), tuple(questions), str(folder))


def load_calibration(folder: str | Path | None) -> CalibrationSet:
    return builtin_calibration() if folder is None else calibration_from_dir(folder)


def read_feeds(npz_path: str | Path) -> list[dict[str, np.ndarray]]:
    """The per-image feeds an npz of input name -> arrays stacked on axis 0 holds (an export unit's calibration
    feeds, a bundle's checks), as a list of dicts."""

    path = Path(npz_path)
    if not path.is_file():
        raise ExportError(f"feeds file {path} not found; rebuild (the export stage writes the calibration feeds)")
    with np.load(path) as data:
        stacked = {k: data[k] for k in data.files}
    counts = {k: v.shape[0] if v.ndim else 0 for k, v in stacked.items()}
    if not stacked or len(set(counts.values())) != 1 or 0 in counts.values():
        raise ExportError(f"{path}: the arrays must share a non-zero leading sample axis, got {counts}")
    return [{k: v[i] for k, v in stacked.items()} for i in range(next(iter(counts.values())))]


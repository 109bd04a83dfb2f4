"""Calibration sets: real images and the questions asked about them.

`--calib DIR` is a folder of images (jpg, jpeg, png, bmp, webp) plus an optional `questions.txt`: one line per image
as `file name<TAB>question`, or plain lines taken in the images' sorted order; images without a question get a
generic one. Without `--calib`, the built-in set is six photographs scikit-image ships (natural scenes, a micrograph,
a scanned page), so every expert sees inputs of its own domain.

The images are run through the components' PyTorch modules during export (export/component.py), so the experts
and the adapter are calibrated on the real features of the earlier components, not on noise.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CalibrationError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
QUESTIONS_FILE = "questions.txt"
GENERIC_QUESTION = "What is shown in this image?"


@dataclass(frozen=True)
class CalibrationSet:
    labels: tuple[str, ...]          # image names (file stems or sample names)
    samples: tuple[Any, ...]         # sample names or image paths
    questions: tuple[str, ...]
    source: str                      # "built-in" or the folder

    def digest(self) -> str:
        """Identity of the set for stage reuse: image bytes (or sample names) and questions."""
        h = hashlib.sha256()
        for sample, question in zip(self.samples, self.questions):
            h.update(Path(sample).read_bytes() if isinstance(sample, Path) else str(sample).encode())
            h.update(question.encode())
        return h.hexdigest()

    def images(self) -> list[tuple[str, np.ndarray]]:
        """(label, HxWx3 uint8) of every image of the set."""
        from ..preprocess import load_image
        from ..samples import sample_images

        names = [s for s in self.samples if not isinstance(s, Path)]
        known = sample_images(names) if names else {}
        return [(label, known[s] if not isinstance(s, Path) else load_image(s))
                for label, s in zip(self.labels, self.samples)]

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "images": list(self.labels), "questions": list(self.questions),
                "sha256": self.digest()}


def builtin_calibration() -> CalibrationSet:
    from ..samples import SAMPLE_QUESTIONS

    names = tuple(SAMPLE_QUESTIONS)
    return CalibrationSet(names, names, tuple(SAMPLE_QUESTIONS[n] for n in names), "built-in (scikit-image samples)")


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
    from ..errors import ExportError

    path = Path(npz_path)
    if not path.is_file():
        raise ExportError(f"feeds file {path} not found; rebuild (the export stage writes the calibration feeds)")
    with np.load(path) as data:
        stacked = {k: data[k] for k in data.files}
    counts = {k: v.shape[0] if v.ndim else 0 for k, v in stacked.items()}
    if not stacked or len(set(counts.values())) != 1 or 0 in counts.values():
        raise ExportError(f"{path}: the arrays must share a non-zero leading sample axis, got {counts}")
    return [{k: v[i] for k, v in stacked.items()} for i in range(next(iter(counts.values())))]


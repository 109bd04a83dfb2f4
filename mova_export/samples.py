"""Real photographs shipped with scikit-image (no download) and a question for each: the demo's, the export's
parity images and the built-in calibration set. scikit-image is imported only when the pictures are asked for."""
from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

# natural scenes, a micrograph (BiomedCLIP's domain) and a scanned page (text: Vary / Pix2Struct)
SAMPLE_QUESTIONS = {
    "astronaut": "What is the person in the image wearing?",
    "coffee": "What is in the cup?",
    "chelsea": "What animal is this?",
    "rocket": "What is the vehicle in the picture?",
    "immunohistochemistry": "What kind of medical image is this?",
    "page": "What does the text on the page say?",
}
PARITY_IMAGES = ("astronaut", "coffee", "chelsea")   # the export's parity images (build calibrates on all six)


def sample_images(names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """HxWx3 uint8 pictures by name (gray ones repeated to RGB)."""
    from skimage import data

    wanted = list(names) if names is not None else list(SAMPLE_QUESTIONS)
    images = {name: getattr(data, name)() for name in wanted}
    return {name: np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img for name, img in images.items()}


def iter_sample_questions(names: Iterable[str] | None = None) -> Iterator[tuple[str, str]]:
    """(image name, question) for the parity images, or for the given sample names."""
    for name in (names if names is not None else PARITY_IMAGES):
        yield name, SAMPLE_QUESTIONS[name]


# (sample image, question) pairs the demo and the benchmarks ask by default: one per question kind the tiny trained
# MoVA routes to its own experts, as a real MoVA routes these kinds (held-out phrasings: synth/trained.py never trains
# on them). Expected routing: A; C; B, D; F; G; none.
DEMO_QUESTIONS: tuple[tuple[str, str], ...] = (
    ("astronaut", "Describe the scene in this image."),
    ("coffee", "How many cups are on the table?"),
    ("page", "What does the text on the page say?"),
    ("immunohistochemistry", "What kind of cells are in the micrograph?"),
    ("chelsea", "Segment the cat from the background."),
    ("rocket", "Hello, who are you?"),
)


def demo_questions() -> list[tuple[str, str]]:
    return list(DEMO_QUESTIONS)

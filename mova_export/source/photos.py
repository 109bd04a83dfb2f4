"""Real pictures that ship with scikit-image and matplotlib (no download) and a question about each: the demo's
photos, the export's parity images and the built-in calibration set.

The calibration set covers every kind of question MoVA routes (natural scenes, documents, counting, charts, medical
images, segmentation, and questions that need no image): 28 pictures, each with a question of its kind. Charts are
drawn by matplotlib from the data files it ships (stock prices, an EEG recording, a polynomial table), so they are
real charts of real data, not noise. scikit-image and matplotlib are imported only when pictures are asked for.
"""
from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

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


@dataclass(frozen=True)
class Photo:
    name: str
    kind: str            # scene | document | counting | chart | medical | segmentation | greeting
    question: str


# The built-in calibration set, parity images first (the export proves every graph on those three against PyTorch).
CALIBRATION_PHOTOS: tuple[Photo, ...] = (
    Photo("astronaut", "scene", "What is the person in the image wearing?"),
    Photo("coffee", "counting", "How many cups are on the table?"),
    Photo("chelsea", "segmentation", "Segment the cat from the background."),
    Photo("rocket", "scene", "What is happening in this picture?"),
    Photo("page", "document", "What does the text on the page say?"),
    Photo("immunohistochemistry", "medical", "What kind of cells are in the micrograph?"),
    Photo("chart_msft", "chart", "What trend does the graph show?"),
    Photo("coins", "counting", "How many coins are there?"),
    Photo("horse", "segmentation", "Outline the horse."),
    Photo("camera", "scene", "What is the man doing?"),
    Photo("text", "document", "Read the words in this image."),
    Photo("retina", "medical", "What does this fundus photograph show?"),
    Photo("chart_stocks", "chart", "Which company has the highest share price in the chart?"),
    Photo("stereo_motorcycle", "scene", "What vehicle is in the picture?"),
    Photo("hubble_deep_field", "scene", "What can be seen in this image of the sky?"),
    Photo("cell", "medical", "What structure is visible in this microscopy image?"),
    Photo("chart_eeg", "chart", "How many signals does the plot show?"),
    Photo("grace_hopper", "scene", "Who is this person and what is she wearing?"),
    Photo("binary_blobs", "segmentation", "Segment each blob in the image."),
    Photo("mri_brain", "medical", "What kind of scan is this?"),
    Photo("moon", "scene", "What is this a photo of?"),
    Photo("chart_polynomials", "chart", "Which curve grows fastest?"),
    Photo("clock", "counting", "What time does the clock show?"),
    Photo("microaneurysms", "medical", "Are there lesions in this retinal image?"),
    Photo("present", "counting", "How many presents are in the picture?"),
    Photo("brick", "scene", "What material is this wall made of?"),
    Photo("gravel", "greeting", "Hello, who are you?"),
    Photo("colorwheel", "greeting", "Thank you, that is all."),
)


def _mpl_data(name: str) -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "sample_data" / name


def _read_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def _mri_brain() -> np.ndarray:
    """matplotlib's s1045.ima.gz: one 256x256 16-bit MRI slice, scaled to 8 bits."""
    with gzip.open(_mpl_data("s1045.ima.gz")) as f:
        slice16 = np.frombuffer(f.read(), np.uint16).reshape(256, 256).astype(np.float64)
    return np.round(slice16 / max(slice16.max(), 1.0) * 255).astype(np.uint8)


def _render(draw: Callable[[object], None], size: tuple[int, int] = (640, 480)) -> np.ndarray:
    """A chart drawn by `draw(axes)` on a white 640x480 canvas: matplotlib's object API (no global backend) in its
    default style (whatever the process set in rcParams), so the pixels are the same in every process."""
    from matplotlib import style
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with style.context("default"):
        fig = Figure(figsize=(size[0] / 100, size[1] / 100), dpi=100)
        canvas = FigureCanvasAgg(fig)
        draw(fig.add_subplot(1, 1, 1))
        fig.tight_layout()
        canvas.draw()
        return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _chart_msft() -> np.ndarray:
    rows = [line.split(",") for line in _mpl_data("msft.csv").read_text().splitlines()[1:] if line.strip()]
    close = [float(r[4]) for r in reversed(rows)]

    def draw(ax: object) -> None:
        ax.plot(range(len(close)), close, color="tab:blue")
        ax.set(title="MSFT closing price, Aug-Sep 2003", xlabel="trading day", ylabel="USD")
        ax.grid(True)
    return _render(draw)


def _chart_stocks() -> np.ndarray:
    lines = [line for line in _mpl_data("Stocks.csv").read_text().splitlines() if line and not line.startswith("#")]
    names = lines[0].split(",")[1:]
    last = [float(v) if v else np.nan for v in lines[-1].split(",")[1:]]
    keep = [(n, v) for n, v in zip(names, last) if not n.startswith("^") and np.isfinite(v)]

    def draw(ax: object) -> None:
        ax.bar([n for n, _ in keep], [v for _, v in keep], color="tab:green")
        ax.set(title="Share price at the end of the record", ylabel="USD")
    return _render(draw)


def _chart_eeg() -> np.ndarray:
    traces = np.frombuffer(_mpl_data("eeg.dat").read_bytes(), "<f8").reshape(800, 4).T   # 800 samples x 4 channels

    def draw(ax: object) -> None:
        for i, trace in enumerate(traces):
            ax.plot(trace / (np.abs(trace).max() or 1) + 2.5 * i, linewidth=0.8)
        ax.set(title="EEG, four channels", xlabel="sample", yticks=[])
    return _render(draw)


def _chart_polynomials() -> np.ndarray:
    table = np.loadtxt(_mpl_data("data_x_x2_x3.csv"))

    def draw(ax: object) -> None:
        for column, label in zip(table.T, ("x", "x^2", "x^3")):
            ax.plot(table[:, 0], column, marker="o", label=label)
        ax.set(title="x, x^2 and x^3", xlabel="x", yscale="log")
        ax.legend()
    return _render(draw)


_LOADERS: dict[str, Callable[[], np.ndarray]] = {
    "grace_hopper": lambda: _read_rgb(_mpl_data("grace_hopper.jpg")),
    "present": lambda: _read_rgb(_mpl_data("Minduka_Present_Blue_Pack.png")),
    "mri_brain": _mri_brain,
    "chart_msft": _chart_msft,
    "chart_stocks": _chart_stocks,
    "chart_eeg": _chart_eeg,
    "chart_polynomials": _chart_polynomials,
}


def _skimage(name: str) -> np.ndarray:
    from skimage import data

    # binary_blobs draws random blobs: seeded, so the set (and every unit key that hashes it) is the same each time
    img = data.binary_blobs(length=512, rng=0) if name == "binary_blobs" else getattr(data, name)()
    if isinstance(img, tuple):          # stereo_motorcycle: (left, right, disparity)
        img = img[0]
    img = np.asarray(img)
    if img.dtype == bool:               # masks (horse, binary_blobs): white shape on black
        img = img.astype(np.uint8) * 255
    return img


def sample_images(names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """HxWx3 uint8 pictures by name (gray ones repeated to RGB, RGBA ones without alpha): scikit-image's samples,
    matplotlib's sample photos and the charts drawn from its sample data."""
    wanted = list(names) if names is not None else list(SAMPLE_QUESTIONS)
    out = {}
    for name in wanted:
        img = _LOADERS[name]() if name in _LOADERS else _skimage(name)
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        out[name] = np.ascontiguousarray(img[..., :3])
    return out


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

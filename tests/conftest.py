"""Session fixtures: one tiny synthetic MoVA and ONE work folder, so every export and build of the session reuses the
units an earlier one finished (the adapter's 64-mask parity sweep alone takes minutes on 2 cores; it runs once).

    tiny_checkpoint   synth --scale tiny-trained (random towers and adapter; the LLM routes and answers by question
                      kind, so runtime and parity tests see real routing)
    calib_dir         three real photos + questions.txt: the calibration set of every export and build here
    work_dir          the session's work folder (pass it to every export / build, never the user's default)
    export_only       export_bundle: fp32 + fp16 graphs of every component, tokenizers, no LLM; it computes every
                      features / export unit, so every build below reuses them (the builds depend on it)
    cpu_build         build --target cpu (INT8 vision graphs, Q4_K_M LLM)
    parity_build      build --target cpu plus fp32 graphs and an f32 GGUF: with an F32 KV cache it answers exactly
                      like the PyTorch reference (RUNTIME_EXACT are the runtime options for that)
    orin_build, rtx4090_build   build --target jetson-orin / rtx-4090 (TensorRT targets: checks/ feeds; rtx-4090
                      compiles TensorRT-RTX engines ahead of time where its bindings import)

The one-line-error helpers live in helpers.py (plain functions, importable by every test file).
"""
from __future__ import annotations

from pathlib import Path

import pytest

# (sample photo, question): a small calibration folder (the built-in set has six photos; three halve the export)
CALIB = {"astronaut": "What is the person wearing?", "chelsea": "What animal is this?",
         "coffee": "What is in the cup?"}
# Runtime options (MoVARuntime.from_bundle / RuntimeOptions fields) under which parity_build answers like the
# reference. One thread for the vision graphs and llama.cpp: on these shared 2-core machines their spinning thread
# pools are slowed down by other processes far more than one thread is (measured under load 4: llama.cpp's routing
# pass 5.1 s with 2 threads, 0.04 s with 1; the adapter graph 1.0 s vs 0.4 s); the figures do not depend on it.
RUNTIME_EXACT = {"backend": "onnxruntime", "precision": "fp32", "llm_quant": "f32",
                 "llm": {"f32_kv": True, "n_threads": 1}, "vision_threads": 1}


def pytest_configure(config):
    """torch single-threaded too (the reference and the export's torch side), for the same reason."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def session_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mova-session")


@pytest.fixture(scope="session")
def tiny_checkpoint(session_root) -> Path:
    from mova_export.core.progress import NULL
    from mova_export.synth import write_synthetic_checkpoint

    return Path(write_synthetic_checkpoint(session_root / "checkpoint", scale="tiny-trained", console=NULL))


@pytest.fixture(scope="session")
def calib_dir(session_root) -> Path:
    from PIL import Image

    from mova_export.source.photos import sample_images

    folder = session_root / "calib"
    folder.mkdir()
    images = sample_images(CALIB)
    for name in CALIB:
        Image.fromarray(images[name]).save(folder / f"{name}.png")
    (folder / "questions.txt").write_text("".join(f"{name}.png\t{q}\n" for name, q in CALIB.items()))
    return folder


def pytest_addoption(parser):
    parser.addoption("--mova-work-dir", default=None, metavar="DIR",
                     help="work folder for the session's exports and builds (default: a fresh temp folder). A kept "
                          "folder makes later runs reuse its units; units are keyed by their inputs, not by the code, "
                          "so use a fresh one after changing export, quantize or GGUF code.")


@pytest.fixture(scope="session")
def work_dir(session_root, request) -> Path:
    kept = request.config.getoption("--mova-work-dir")
    return Path(kept) if kept else session_root / "work"


@pytest.fixture(scope="session")
def builds(session_root) -> Path:
    return session_root / "builds"


@pytest.fixture(scope="session")
def export_only(tiny_checkpoint, calib_dir, work_dir, builds) -> Path:
    from mova_export.pipeline import BuildRequest, export_bundle

    out = builds / "export"
    export_bundle(BuildRequest(checkpoint=tiny_checkpoint, out=out, export_precisions=("fp32", "fp16"), calib=calib_dir,
                               work_dir=work_dir, quiet=True))
    return out


def _build(checkpoint: Path, target: str, out: Path, calib: Path, work: Path, **kw):
    from mova_export.pipeline import BuildRequest, build

    return build(BuildRequest(checkpoint=checkpoint, target=target, out=out, calib=calib, work_dir=work, quiet=True,
                              **kw))


@pytest.fixture(scope="session")
def cpu_build(tiny_checkpoint, calib_dir, work_dir, builds, export_only):
    """BuildResult of `build --target cpu` (its .bundle is the folder)."""
    return _build(tiny_checkpoint, "cpu", builds / "cpu", calib_dir, work_dir)


@pytest.fixture(scope="session")
def parity_build(tiny_checkpoint, calib_dir, work_dir, builds, cpu_build):
    """The cpu bundle plus fp32 graphs and an f32 GGUF (every unit but the f32 GGUF reused from cpu_build)."""
    return _build(tiny_checkpoint, "cpu", builds / "parity", calib_dir, work_dir, also_precisions=("fp32",),
                  also_llm=("f32",))


@pytest.fixture(scope="session")
def parity_bundle(parity_build) -> Path:
    return parity_build.bundle


@pytest.fixture(scope="session")
def orin_build(tiny_checkpoint, calib_dir, work_dir, builds, export_only):
    return _build(tiny_checkpoint, "jetson-orin", builds / "jetson-orin", calib_dir, work_dir)


@pytest.fixture(scope="session")
def rtx4090_build(tiny_checkpoint, calib_dir, work_dir, builds, export_only):
    return _build(tiny_checkpoint, "rtx-4090", builds / "rtx-4090", calib_dir, work_dir)


@pytest.fixture(scope="session")
def reference(tiny_checkpoint):
    """The PyTorch reference on the tiny checkpoint (modules built lazily, kept for the session)."""
    from mova_export.reference import ReferencePipeline

    return ReferencePipeline(tiny_checkpoint)


@pytest.fixture(scope="session")
def images():
    from mova_export.source.photos import sample_images

    return sample_images()

"""What both benchmarks share: inputs, statistics, the machine and bundle they ran on, the reference, plots."""
from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from ..bundle import MANIFEST, load_bundle, sha256_file, tool_versions
from ..core.errors import RuntimeInputError
from ..core.gpu import nvidia_smi
from ..core.image_inputs import load_image
from ..core.progress import Log, quiet  # noqa: F401  (re-exported for latency and parity)
from ..source.photos import SAMPLE_QUESTIONS, sample_images

DEFAULT_QUESTION = "Describe the image."


def load_images(specs: Sequence[Any] | None, default: Sequence[tuple[str, str]],
                question: str | None = None) -> list[tuple[str, np.ndarray, str]]:
    """(label, HxWx3 uint8, question) per image: scikit-image sample names (with their questions) or paths
    (with `question`, else DEFAULT_QUESTION). default: (sample name, question) pairs used when specs is empty."""
    if not specs:
        pictures = sample_images(dict.fromkeys(name for name, _ in default))
        return [(f"{name}: {q}", pictures[name], question or q) for name, q in default]
    out = []
    for spec in specs:
        if isinstance(spec, str) and spec in SAMPLE_QUESTIONS and not Path(spec).exists():
            out.append((spec, sample_images([spec])[spec], question or SAMPLE_QUESTIONS[spec]))
        elif isinstance(spec, (str, Path)):
            if not Path(spec).is_file():
                raise RuntimeInputError(f"image {spec!r} is neither a file nor a sample name "
                                        f"({', '.join(SAMPLE_QUESTIONS)})")
            out.append((Path(spec).name, load_image(spec), question or DEFAULT_QUESTION))
        else:
            out.append((f"image{len(out)}", load_image(spec), question or DEFAULT_QUESTION))
    return out


def stats(values: Iterable[float]) -> dict[str, float]:
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        return {"n": 0}
    return {"n": int(v.size), "p50": float(np.percentile(v, 50)), "p95": float(np.percentile(v, 95)),
            "mean": float(v.mean()), "min": float(v.min()), "max": float(v.max())}


def rounded(obj: Any, nd: int = 3) -> Any:
    if isinstance(obj, float):
        return round(obj, nd)
    if isinstance(obj, dict):
        return {k: rounded(v, nd) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [rounded(v, nd) for v in obj]
    return obj


def gpu_name() -> str | None:

    values = nvidia_smi(["name"])
    return values[0] if values else None


def gpu_memory_mib() -> dict[str, float] | None:
    """Device-wide used GPU memory (covers ONNX Runtime, TensorRT and llama.cpp), from nvidia-smi."""

    values = nvidia_smi(["memory.used", "memory.total"])
    try:
        used, total = (float(v) for v in values or ())
    except ValueError:
        return None
    return {"device_used_mib": used, "device_total_mib": total}


def machine() -> dict[str, Any]:

    info: dict[str, Any] = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                            "cpus": os.cpu_count(), "tools": tool_versions()}
    gpu = gpu_name()
    if gpu:
        info["gpu"] = gpu
    return info


def bundle_info(path: Path) -> dict[str, Any]:
    m = load_bundle(path, verify=False).manifest
    target = (m.target or {}).get("recipe")
    precisions = sorted(set(m.runtime.precision.values()))
    return {"path": str(path), "manifest_sha256": sha256_file(path / MANIFEST), "scale": m.scale, "target": target,
            "llm_qtype": m.llm.qtype if m.llm else None, "precision": m.runtime.precision,
            "title": f"{target or 'export'} bundle ({'/'.join(precisions)} graphs, LLM {m.llm.qtype if m.llm else '-'},"
                     f" {m.scale} scale)",
            "source_checkpoint": m.source_checkpoint.get("path")}


def run_title(info: Mapping[str, Any], runtime: Mapping[str, Any]) -> str:
    """The title of what a runtime actually ran (overrides of precision and LLM included)."""
    precisions = sorted({g["precision"] for g in runtime["graphs"].values()})
    return (f"{info['target'] or 'export'} bundle ({'/'.join(precisions)} graphs, LLM {runtime['llm']['qtype']}, "
            f"{runtime['device']}, {info['scale']} scale)")


def reference_pipeline(bundle_path: Path, log: Log) -> Any:
    """The PyTorch reference on the bundle's source checkpoint, or None (with a log line) when it is not here or
    torch is not installed (a device-only install)."""
    source = load_bundle(bundle_path, verify=False).manifest.source_checkpoint.get("path")
    if not source or not Path(source, "config.json").is_file():
        log(f"reference skipped: the bundle's source checkpoint {source} is not on this machine")
        return None
    try:
        from ..reference import ReferencePipeline
    except ImportError as exc:
        log(f"reference skipped: the PyTorch reference needs the build side ({exc.name} is not installed)")
        return None
    return ReferencePipeline(source)


def write_figure(path: Path, draw: Callable[[Any], None], height: float) -> bool:
    """Draw a matplotlib figure into a PNG; False (and no file) where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig = plt.figure(figsize=(9, height))
    draw(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def barh(ax: Any, labels: Sequence[str], series: Mapping[str, Sequence[float]], xlabel: str, *,
         log: bool = False, errors: Mapping[str, Sequence[float]] | None = None) -> None:
    """Horizontal grouped bars, one group per label; NaN leaves a gap (not measured)."""
    y = np.arange(len(labels))
    height = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        err = None if errors is None else [np.zeros(len(values)), errors[name]]
        ax.barh(y + i * height, values, height, xerr=err, label=name, capsize=2)
    ax.set_yticks(y + height * (len(series) - 1) / 2, labels)
    ax.invert_yaxis()
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    if len(series) > 1:
        ax.legend(fontsize=8)

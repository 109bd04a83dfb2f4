"""How close a quantized graph is to its fp32 graph on held-out feeds, measured the way the target executes it."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..core.errors import ExportError
from ..core.tolerance import ParityReport, Tolerance
from ..runners.compare import NO_THRESHOLD, compare_runners
from ..runners.ort import OrtRunner
from .fp8_sim import simulate_fp8
from .qdq import QuantResult

Feed = Mapping[str, np.ndarray]


def as_runner(graph: Any, qdq: str = "float") -> Any:
    """A runner as it is, or a graph path in ONNX Runtime with Q/DQ run as `qdq`."""
    return graph if hasattr(graph, "infer") else OrtRunner(Path(graph), qdq=qdq)


def accuracy_check(fp32: Any, candidate: Any, held_out: Sequence[Feed], tolerance: Tolerance = NO_THRESHOLD, *,
                   component: str = "graph", precision: str = "quantized", qdq: str = "float",
                   labels: Sequence[str] | None = None) -> ParityReport:
    """Parity of `candidate` (a graph path or a runner) against `fp32` (a graph path, a runner, or its outputs on
    each feed) on each held-out feed: max abs, rel L2 and cosine per output and sample. A candidate path runs with
    Q/DQ as `qdq` ("float": the graph's own figures on any CPU; "fused": ONNX Runtime's integer kernels, what the
    cpu runtime executes). Returns the report unchecked; `report.check()` raises when any output misses
    `tolerance`."""
    held_out = list(held_out)
    if not held_out:
        raise ExportError(f"{component}: no held-out feeds to measure {precision} parity on; hold out at least one")
    labels = list(labels) if labels is not None else [f"held_out{i}" for i in range(len(held_out))]
    reference = fp32 if isinstance(fp32, list) else as_runner(fp32)
    return compare_runners(as_runner(candidate, qdq), held_out, reference, tolerance, graph=component,
                           precision=precision, labels=labels)


def measure(reference: Any, result: QuantResult, held_out: Sequence[Feed], tolerance: Tolerance, *, component: str,
            qdq: str, labels: Sequence[str] | None = None) -> tuple[ParityReport, str]:
    """The figures of a Q/DQ graph: by running it when ONNX Runtime can ("ort"), else through its float twin
    ("simulated-fp8", fp8_sim)."""
    if result.parity_method == "ort":
        return accuracy_check(reference, result.path, held_out, tolerance, component=component,
                              precision=result.precision, qdq=qdq, labels=labels), "ort"
    with tempfile.TemporaryDirectory() as tmp:
        sim = simulate_fp8(result.path, Path(tmp) / "sim.onnx")
        return accuracy_check(reference, sim, held_out, tolerance, component=component, precision=result.precision,
                              labels=labels), "simulated-fp8"

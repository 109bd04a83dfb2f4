"""Engine parity: each engine against the ONNX graph it was built from, on the bundle's real feeds.

Where a CUDA GPU of the engine's compute capability is present, `engine_parity` runs the engine (TensorRTRunner) and
the graph (ONNX Runtime CPU, Q/DQ as float math: runners.OrtRunner(qdq="float")) on the same feeds through
runners.compare_runners and keeps the report's worst cosine and max abs; elsewhere it returns an "unverified" record
saying why. `check_engine_parity` refuses a verified engine below the budget.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..core.errors import CompileError
from ..core.tolerance import ParityReport
from ..runners import OrtRunner, TensorRTRunner, compare_runners
from .host import DeviceInfo


@dataclass(frozen=True)
class EngineParity:
    status: str                          # "verified" | "unverified"
    cosine: float | None = None          # worst over outputs and feeds
    max_abs: float | None = None
    samples: int = 0
    reason: str = ""                     # why unverified

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_report(cls, report: ParityReport) -> "EngineParity":
        """A verified record from the engine-vs-graph report: its worst cosine and max abs (-1 / inf when an output
        is non-finite)."""
        worst = report.summary()
        finite = all(f.finite for f in report.per_output().values())
        return cls("verified", worst["cosine"] if finite else -1.0, worst["max_abs"] if finite else math.inf,
                   len(report.samples))


def engine_parity(engine_path: str | Path, onnx_path: str | Path, feeds: Sequence[Mapping[str, np.ndarray]], *,
                  compute_capability: str, device: DeviceInfo, flavor: str, dla_core: int | None = None,
                  runtime_cache: str | Path | None = None) -> EngineParity:
    """Run the engine and its ONNX graph on `feeds`; "unverified" (with the reason) where no GPU of the engine's
    compute capability is here or there are no feeds."""
    if device.gpu_name is None or device.compute_capability != compute_capability:
        found = "no CUDA GPU" if device.gpu_name is None else f"{device.gpu_name} ({device.compute_capability})"
        return EngineParity("unverified", reason=f"{found} here; `mova-export compile` on a GPU of compute "
                            f"capability {compute_capability} verifies it")
    if not feeds:
        return EngineParity("unverified", reason="no feeds to compare on (the bundle's checks/ has none)")
    engine = TensorRTRunner(engine_path, flavor=flavor, dla_core=dla_core, runtime_cache=runtime_cache)
    graph = OrtRunner(Path(onnx_path), qdq="float")
    report = compare_runners(engine, feeds, graph, graph=Path(engine_path).name, precision="engine")
    engine.save_runtime_cache()
    return EngineParity.from_report(report)


def check_engine_parity(result: EngineParity, component: str, precision: str, min_cosine: float) -> None:
    """Refuse a verified engine whose cosine against its graph is below the recipe's budget for `precision`."""
    if result.status == "verified" and (result.cosine is None or result.cosine < min_cosine):
        raise CompileError(f"{component} ({precision}) engine departs from its ONNX graph: cosine {result.cosine:.6f} "
                           f"< {min_cosine} (accuracy.{precision}.min_cosine); build it from the fp16 graph (recipe "
                           f"precision.{component}: fp16) or report the TensorRT version")


__all__ = ["EngineParity", "check_engine_parity", "engine_parity"]

"""Engine parity: each engine against the ONNX graph it was built from, on the bundle's real feeds.

Where a CUDA GPU of the engine's compute capability is present, `engine_parity` runs the engine (TensorRTRunner) and
the graph (ONNX Runtime CPU, Q/DQ as float math: quantize.ort_session) on the same feeds and returns the worst cosine
and max abs over outputs and feeds; elsewhere it returns an "unverified" record saying why. `check_engine_parity`
refuses a verified engine below the budget.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import CompileError
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
        return EngineParity("unverified", reason="no feeds to compare on (bundle calibration/ is empty)")
    from ..quantize import OrtGraph
    from ..runtime.runners import TensorRTRunner
    from ..validate import parity

    engine = TensorRTRunner(engine_path, flavor=flavor, dla_core=dla_core, runtime_cache=runtime_cache)
    graph = OrtGraph(Path(onnx_path))
    cosine, max_abs = 1.0, 0.0
    for feed in feeds:
        feed = {k: np.ascontiguousarray(v) for k, v in feed.items()}
        expected, got = graph.infer(feed), engine.infer(feed)
        for name, value in expected.items():
            fig = parity(value, got[name])
            cosine = min(cosine, fig.cosine if fig.finite else -1.0)
            max_abs = max(max_abs, fig.max_abs if fig.finite else math.inf)
    engine.save_runtime_cache()
    return EngineParity("verified", cosine, max_abs, len(feeds))


def check_engine_parity(result: EngineParity, component: str, precision: str, min_cosine: float) -> None:
    """Refuse a verified engine whose cosine against its graph is below the recipe's budget for `precision`."""
    if result.status == "verified" and (result.cosine is None or result.cosine < min_cosine):
        raise CompileError(f"{component} ({precision}) engine departs from its ONNX graph: cosine {result.cosine:.6f} "
                           f"< {min_cosine} (accuracy.{precision}.min_cosine); build it from the fp16 graph (recipe "
                           f"precision.{component}: fp16) or report the TensorRT version")


__all__ = ["EngineParity", "check_engine_parity", "engine_parity"]

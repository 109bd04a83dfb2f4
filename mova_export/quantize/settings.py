"""How one graph is quantized and judged, resolved once from the recipe: nothing "auto" is left in it.

The quantize unit's key is a hash of exactly this object (pipeline.stages.quantize), so a setting that changes the
Q/DQ graph or the verdict on it cannot change without the key changing: the backend that writes the graph
(nvidia-modelopt when it imports, ONNX Runtime otherwise, decided here and not inside the writer), the float base
around the Q/DQ pairs, the way the gate runs the graphs and the budget.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from ..core.errors import ExportError, RecipeError
from ..core.tolerance import Tolerance
from ..recipe.schema import FALLBACKS

if TYPE_CHECKING:  # pragma: no cover
    from ..recipe import Recipe

PRECISIONS = ("int8", "fp8")
METHODS = ("minmax", "entropy", "percentile")
BACKENDS = ("onnxruntime", "modelopt")
BASES = ("fp32", "fp16")
# The float precision around the Q/DQ pairs, per runtime (recipe.runtime). Strongly typed TensorRT (11.x, RTX, FP8
# builds) runs every op outside the pairs in the graph's own type: an fp32 base leaves ~78% of the compute layers of
# a tiny CLIP fp32 against 14% on an fp16 base. ONNX Runtime CPU fuses fp32-base Q/DQ into integer kernels: the
# same tiny CLIP ran 22.5 ms fp32-base INT8 against 32.7 ms fp16-base (p50, 2 threads), so the cpu target keeps fp32.
QDQ_BASE = {"tensorrt": "fp16", "onnxruntime-cpu": "fp32"}
# How the gate runs a Q/DQ graph: the way the target executes it. The cpu runtime runs ONNX Runtime's fused integer
# kernels; TensorRT implements Q/DQ as float math on dequantized values (runners.ort's module docstring).
QDQ_MODE = {"tensorrt": "float", "onnxruntime-cpu": "fused"}


def modelopt_module() -> Any:
    """nvidia-modelopt's ONNX quantization package, or None where it does not import (the default here)."""
    try:
        from modelopt.onnx import quantization  # type: ignore[import-not-found]
    except Exception:  # not installed, or its onnxruntime-gpu clashes with onnxruntime: treat as absent
        return None
    return quantization


def resolve_backend(backend: str) -> str:
    """"auto" -> "modelopt" when nvidia-modelopt imports, else "onnxruntime"; an explicit backend is checked."""
    if backend == "auto":
        return "modelopt" if modelopt_module() is not None else "onnxruntime"
    if backend not in BACKENDS:
        raise ExportError(f"unknown quantization backend {backend!r}; use auto or one of {', '.join(BACKENDS)}")
    return backend


@dataclass(frozen=True)
class QuantSettings:
    precision: str                  # int8 | fp8
    method: str                     # minmax | entropy | percentile
    base: str                       # fp32 | fp16: the float precision around the Q/DQ pairs (QDQ_BASE)
    backend: str                    # onnxruntime | modelopt: resolved, never "auto"
    qdq: str                        # fused | float: how the gate runs the graphs (QDQ_MODE)
    budget: Tolerance               # every held-out sample must meet it (the gate judges the worst one)
    samples: int = 32               # calibration samples the recipe asks for
    held_out: int = 8               # held-out samples the gate judges on
    max_excluded: int = 8           # at most this many nodes left unquantized before the fallback
    max_tries: int = 5
    augment_calibration: bool = False   # also calibrate on the held-out feeds (then the figures are not independent)
    fallback: str = "fp16"          # fp16 | fp32 | none: what ships when every try misses the budget (none: fp32
                                    # is measured and the build refuses it)

    def __post_init__(self) -> None:
        for value, allowed, what in ((self.precision, PRECISIONS, "quantization precision"),
                                     (self.method, METHODS, "calibration method"),
                                     (self.base, BASES, "Q/DQ base precision"),
                                     (self.backend, BACKENDS, "quantization backend"),
                                     (self.qdq, ("fused", "float"), "Q/DQ mode"),
                                     (self.fallback, FALLBACKS, "fallback precision")):
            if value not in allowed:
                raise ExportError(f"unknown {what} {value!r}; use one of {', '.join(allowed)}")
        if self.precision == "fp8" and self.method == "entropy":
            raise ExportError("FP8 calibration supports 'minmax' and 'percentile' (amax/448 scales), not 'entropy'")
        if self.backend == "modelopt" and self.method == "percentile":
            raise ExportError("modelopt calibrates with 'minmax' (max) or 'entropy'; use one of those")

    @classmethod
    def from_recipe(cls, recipe: "Recipe", component: str, precision: str | None = None,
                    backend: str | None = None) -> "QuantSettings":
        """The settings of `component` (at `precision`, default the recipe's) for `recipe`."""
        precision = precision or recipe.precision_of(component)
        if precision not in recipe.accuracy:
            raise RecipeError(f"recipe {recipe.name}: accuracy.{precision} is missing; give it a min_cosine")
        cal = recipe.calibration
        return cls(precision=precision, method=cal.method, base=QDQ_BASE[recipe.runtime],
                   backend=resolve_backend(backend or cal.backend), qdq=QDQ_MODE[recipe.runtime],
                   budget=recipe.accuracy[precision], samples=cal.samples, held_out=cal.held_out,
                   fallback=cal.fallback)

    def with_(self, **changes: Any) -> "QuantSettings":
        return replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        return {"precision": self.precision, "method": self.method, "base": self.base, "backend": self.backend,
                "qdq": self.qdq, "budget": self.budget.to_json(), "samples": self.samples,
                "held_out": self.held_out, "max_excluded": self.max_excluded, "max_tries": self.max_tries,
                "augment_calibration": self.augment_calibration, "fallback": self.fallback}

"""Plain declarations shared by the build side and the device runtime (pure Python, no torch).

PRECISIONS: the graph precisions a bundle ships; BYTES_PER_PRECISION: what one weight takes in each.

TensorSpec: a graph input/output (name, shape, numpy dtype name); a dimension may be a string, the name of an
axis that takes one of a few static sizes (the text encoder's length buckets).
GraphForm: one graph a component exports as (most components have one; the adapter three).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

PRECISIONS = ("int8", "fp8", "fp16", "fp32")
BYTES_PER_PRECISION = {"int8": 1, "fp8": 1, "fp16": 2, "fp32": 4}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | str, ...]
    dtype: str = "float32"  # numpy dtype name: float32, int64, ...

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> "TensorSpec":
        return cls(str(raw["name"]), tuple(raw["shape"]), str(raw.get("dtype", "float32")))

    def describe(self) -> str:
        return f"{self.name}{list(self.shape)}:{self.dtype}"


@dataclass(frozen=True)
class GraphForm:
    """One exported graph of a component: its name in the bundle, its role in the two passes (tower, text,
    adapter_routing, adapter_answer, adapter_fallback), its declared I/O, how the component's loaded module becomes
    the traced module (`wrap`), how a feed's reference outputs are computed (`reference(module, feed)`, default:
    the wrapped module itself), the static sizes of symbolic dimensions (`axes`), a label (`form`) and seeded random
    feeds (`sample_inputs`, default: the component's own when the I/O is its own)."""
    name: str
    role: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    wrap: Callable[[Any], Any] | None = None
    reference: Callable[[Any, Mapping[str, Any]], dict[str, Any]] | None = None
    axes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    form: str | None = None
    sample_inputs: Callable[[Any, int], Mapping[str, Any]] | None = None   # seeded random feed (cfg, seed)

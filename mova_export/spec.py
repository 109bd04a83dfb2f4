"""Plain declarations shared by the build side and the device runtime (pure Python, no torch).

TensorSpec: a graph input/output (name, shape, numpy dtype name); a dimension may be a string, the name of an
axis that takes one of a few static sizes (the text encoder's length buckets).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping


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

"""Plain declarations shared by the build side and the device runtime (pure Python, no torch).

TensorSpec: a graph input/output (name, shape, numpy dtype name); a dimension may be a string, the name of an
axis that takes one of a few static sizes (the text encoder's length buckets).
ImageInput: one preprocessed image input (a row of the preprocessing table): which processor, at what side, with
which mean/std; the towers declare the rows they consume and the bundle carries them to the device.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
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


@dataclass(frozen=True)
class ImageInput:
    """One preprocessed image input. method: "clip" (CLIPImageProcessor: shortest edge + centre crop, bicubic,
    /255, mean/std), "bit" (BitImageProcessor, the same steps), "pix2struct" (flattened 16x16 patches + their
    mask; mean is only the pad colour). side None means image_feat_size * 14 (672 for MoVA). arrays: the names of
    the arrays the row produces, in the order the tower takes them."""
    kind: str
    method: str
    side: int | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float] | None
    arrays: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> "ImageInput":
        return cls(str(raw["kind"]), str(raw["method"]), None if raw.get("side") is None else int(raw["side"]),
                   tuple(float(v) for v in raw["mean"]),
                   None if raw.get("std") is None else tuple(float(v) for v in raw["std"]),
                   tuple(str(a) for a in raw["arrays"]))

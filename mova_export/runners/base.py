"""One interface for every backend that runs a graph: `infer(feed) -> outputs`, numpy in, numpy out.

ONNX Runtime (`ort.OrtRunner`), TensorRT engines (`tensorrt.TensorRTRunner`), PyTorch modules
(`pytorch.TorchRunner`) and quantize's float-Q/DQ view of a graph are all `Runner`s, so comparing two of them is
one loop (`compare.compare_runners`) wherever it happens: export, quantize, compile and the benchmarks.
"""
from __future__ import annotations

from typing import Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from ..core.errors import RuntimeInputError

Feed = Mapping[str, np.ndarray]


@runtime_checkable
class Runner(Protocol):
    name: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]

    def infer(self, feed: Feed) -> dict[str, np.ndarray]:
        """Run one feed (input name -> array) and return every output by name."""

    def close(self) -> None:
        """Free what the runner holds (sessions, device buffers); later calls may fail."""


def check_feed(runner: str, expected: Sequence[str], feed: Feed) -> None:
    """Refuse a feed whose input names differ from the graph's, naming both sides."""
    missing = [n for n in expected if n not in feed]
    extra = [n for n in feed if n not in expected]
    if missing or extra:
        raise RuntimeInputError(f"{runner}: feed has wrong inputs (missing {missing}, unexpected {extra}); "
                                f"expected {list(expected)}")

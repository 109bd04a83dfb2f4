"""A PyTorch module behind the Runner interface (numpy in, numpy out): the export's and the benchmarks' reference,
compared with ONNX Runtime and TensorRT in the same loop. torch is imported when a feed runs."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..core.errors import ExportError
from .base import Feed, check_feed


class TorchRunner:
    """A component module (fp32 reference). Inputs are passed positionally in `input_names` order."""

    def __init__(self, module: Any, input_names: Sequence[str], output_names: Sequence[str], name: str = "torch"):
        self.module = module
        self.input_names = tuple(input_names)
        self.output_names = tuple(output_names)
        self.name = name

    def infer(self, feed: Feed) -> dict[str, np.ndarray]:
        import torch

        check_feed(self.name, self.input_names, feed)
        with torch.inference_mode():
            out = self.module(*(torch.from_numpy(np.ascontiguousarray(feed[n])) for n in self.input_names))
        if isinstance(out, torch.Tensor):
            out = (out,)
        if len(out) != len(self.output_names):
            raise ExportError(f"{self.name}: module returned {len(out)} tensors, spec declares {self.output_names}")
        return {n: t.detach().float().cpu().numpy() if t.is_floating_point() else t.detach().cpu().numpy()
                for n, t in zip(self.output_names, out)}

    def close(self) -> None:
        self.module = None

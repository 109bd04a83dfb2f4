"""An ONNX graph in ONNX Runtime, with an explicit choice of how Q/DQ pairs run.

qdq="fused" (the default, what the cpu runtime executes): ONNX Runtime fuses QuantizeLinear/DequantizeLinear pairs
into integer kernels. Their results depend on the CPU: x86 without AVX512-VNNI takes u8s8 paths that can saturate
(a held-out cosine of 0.9817 on one machine against 0.9999 on a VNNI machine for the same graph).
qdq="float": Q/DQ nodes run as written, the float math on dequantized values that TensorRT implements
(`session.disable_quant_qdq`); the figures are then the graph's on any CPU. The quantization gate measures a graph
the way its target executes it (quantize.settings.QuantSettings.qdq).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from ..core.errors import ExportError, RuntimeInputError
from .base import Feed, check_feed

_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
QDQ_MODES = ("fused", "float")


class OrtRunner:
    """An ONNX graph in ONNX Runtime. `device="cuda"` asks for the CUDA EP and falls back to CPU with a warning
    (`fell_back` is then True) unless `strict=True`, which raises instead. `qdq`: see the module docstring.
    `memory_arena`: ONNX Runtime's CPU arena, off unless asked for. Its outputs wrap the arena's buffers, so one kept
    output pins the whole arena after the session is gone (0.27 GiB of Co-DETR outputs held 3.6 GiB), and a build's
    sessions are short-lived with outputs that outlive them (references, probes: an OOM kill at full size). Same
    kernels, same results, same speed at full size; the runtime asks for it for its repeated runs."""

    def __init__(self, path: str | Path, device: str = "cpu", *, qdq: str = "fused", strict: bool = False,
                 threads: int | None = None, name: str | None = None, memory_arena: bool = False):
        import onnxruntime as ort

        if device not in _PROVIDERS:
            raise RuntimeInputError(f"unknown ONNX Runtime device {device!r}; use one of {sorted(_PROVIDERS)}")
        self.path = Path(path)
        if not self.path.is_file():
            raise ExportError(f"ONNX graph {self.path} not found")
        self.name = name or self.path.name
        requested = [_PROVIDERS[device]] + (["CPUExecutionProvider"] if device != "cpu" else [])
        available = ort.get_available_providers()
        providers = [p for p in requested if p in available] or ["CPUExecutionProvider"]
        if qdq not in QDQ_MODES:
            raise RuntimeInputError(f"unknown Q/DQ mode {qdq!r}; use one of {', '.join(QDQ_MODES)}")
        self.qdq = qdq
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if qdq == "float":
            opts.add_session_config_entry("session.disable_quant_qdq", "1")
        if threads:
            opts.intra_op_num_threads = threads
        opts.enable_cpu_mem_arena = memory_arena
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise ExportError(f"ONNX Runtime cannot load {self.path}: {str(exc).splitlines()[0]}") from None
        self.providers = tuple(self.session.get_providers())
        self.requested = requested[0]
        self.fell_back = self.requested not in self.providers
        if self.fell_back:
            message = (f"{self.name}: {self.requested} is not available in this onnxruntime "
                       f"(available: {available}); running on {self.providers[0]}")
            if strict:
                raise RuntimeInputError(message + "; install onnxruntime-gpu or use device='cpu'")
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self.output_names = tuple(o.name for o in self.session.get_outputs())

    def infer(self, feed: Feed) -> dict[str, np.ndarray]:
        check_feed(self.name, self.input_names, feed)
        outs = self.session.run(list(self.output_names), {n: np.ascontiguousarray(feed[n]) for n in self.input_names})
        return dict(zip(self.output_names, outs))

    def close(self) -> None:
        self.session = None


def runs_in_ort(path: str | Path, feed: Feed, qdq: str = "float") -> bool:
    """True when ONNX Runtime CPU loads the graph and runs one feed with finite outputs (a float8 graph may have
    no CPU kernel for one of its ops)."""
    try:
        outs = OrtRunner(path, qdq=qdq).infer(feed)
    except Exception:  # no CPU kernel for a float8 op, etc.
        return False
    return all(np.isfinite(np.asarray(o, np.float64)).all() for o in outs.values()
               if np.issubdtype(o.dtype, np.floating))



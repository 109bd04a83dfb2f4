"""The device runtime's backends behind one interface: `infer(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]`.

OrtRunner wraps an ONNX graph (CPU, or the CUDA execution provider when asked for and present; it says when it fell
back), TensorRTRunner a serialized engine (a TensorRT flavor is imported only when one is made). The PyTorch
component runner lives with the reference (mova_export.reference); comparing backends is one loop over runners with
the same feed.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import ExportError, RuntimeInputError


def check_feed(runner: str, expected: Sequence[str], feed: dict[str, np.ndarray]) -> None:
    missing = [n for n in expected if n not in feed]
    extra = [n for n in feed if n not in expected]
    if missing or extra:
        raise RuntimeInputError(f"{runner}: feed has wrong inputs (missing {missing}, unexpected {extra}); "
                                f"expected {list(expected)}")


def tensorrt_available() -> bool:
    """True when a TensorRT flavor (tensorrt, or TensorRT for RTX) imports."""
    import importlib.util

    return any(importlib.util.find_spec(name) is not None for name in ("tensorrt", "tensorrt_rtx_bindings"))


_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


class OrtRunner:
    """An ONNX graph in ONNX Runtime. `device="cuda"` asks for the CUDA EP and falls back to CPU with a warning
    (`fell_back` is then True) unless `strict=True`, which raises instead."""

    def __init__(self, path: str | Path, device: str = "cpu", *, strict: bool = False, threads: int | None = None,
                 name: str | None = None):
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
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
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

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feed(self.name, self.input_names, feed)
        outs = self.session.run(list(self.output_names), {n: np.ascontiguousarray(feed[n]) for n in self.input_names})
        return dict(zip(self.output_names, outs))


class TensorRTRunner:
    """A serialized TensorRT engine (built on the target device). Needs the `tensorrt` package and a CUDA device;
    buffers live in CUDA tensors of torch (a CUDA build of torch on the device)."""

    def __init__(self, engine_path: str | Path, name: str | None = None):
        try:
            import tensorrt as trt  # noqa: F401
        except ImportError:
            raise ExportError("TensorRTRunner needs the TensorRT Python package, which is not importable here; "
                              "install it on the target device (pip install 'mova-export[tensorrt]') or use "
                              "OrtRunner") from None
        import torch

        if not torch.cuda.is_available():
            raise ExportError("TensorRTRunner needs a CUDA device and a CUDA build of torch; none found")
        self.path = Path(engine_path)
        if not self.path.is_file():
            raise ExportError(f"TensorRT engine {self.path} not found")
        self.name = name or self.path.name
        self._trt = trt
        logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise ExportError(f"TensorRT could not deserialize {self.path}; engines are tied to the GPU and TensorRT "
                              "version that built them: rebuild it on this device")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = tuple(n for n in names if is_input[n])
        self.output_names = tuple(n for n in names if not is_input[n])

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        trt = self._trt
        check_feed(self.name, self.input_names, feed)
        keep = []
        for n in self.input_names:
            dtype = trt.nptype(self.engine.get_tensor_dtype(n))
            t = torch.from_numpy(np.ascontiguousarray(feed[n], dtype=dtype)).cuda()
            self.context.set_input_shape(n, tuple(t.shape))
            self.context.set_tensor_address(n, t.data_ptr())
            keep.append(t)
        outs = {}
        for n in self.output_names:
            dtype = trt.nptype(self.engine.get_tensor_dtype(n))
            shape = tuple(self.context.get_tensor_shape(n))
            t = torch.from_numpy(np.empty(shape, dtype=dtype)).cuda()
            self.context.set_tensor_address(n, t.data_ptr())
            outs[n] = t
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise ExportError(f"{self.name}: TensorRT execution failed")
        stream.synchronize()
        return {n: t.cpu().numpy() for n, t in outs.items()}

"""A serialized TensorRT engine behind the Runner interface, for every flavor (tensorrt 10.x, 11.x, TensorRT-RTX).

Device buffers and copies go through cuda-python, not torch, so the device runtime needs neither; TensorRT and
cuda-python are imported only when a runner is made. Written against the TensorRT 10.3 / 11.x / RTX 1.7 and
cuda-python 12.9 APIs; not run here (no GPU on the machines that test it): the README says so.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import ExportError
from ..core.tensorrt_flavors import FLAVORS, import_flavor
from .base import Feed, check_feed


def tensorrt_available() -> bool:
    """True when a TensorRT flavor (tensorrt, or TensorRT for RTX) imports."""
    return any(importlib.util.find_spec(name) is not None for name in ("tensorrt", "tensorrt_rtx_bindings"))


def _cudart() -> Any:
    """NVIDIA's cuda-python runtime bindings (wheels for x86-64 and Jetson): `cuda.bindings.runtime` from 12.6 on,
    `cuda.cudart` before."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            raise ExportError("TensorRTRunner needs cuda-python for its device buffers; install it on the device "
                              "(pip install 'mova-export[cuda]') or use OrtRunner") from None
    return cudart


def _cuda_call(cudart: Any, result: Any, what: str) -> Any:
    """cuda-python calls return (cudaError_t, value...); raise on an error, return the value(s)."""
    err, *values = result
    if int(err) != 0:
        raise ExportError(f"CUDA {what} failed: {cudart.cudaGetErrorString(err)[1].decode()}")
    return values[0] if len(values) == 1 else tuple(values)


class TensorRTRunner:
    """A serialized TensorRT engine on this machine's GPU, for any flavor (`tensorrt_flavors`: tensorrt-10, tensorrt,
    tensorrt-rtx; imported lazily). Device buffers and copies go through cuda-python, not torch, so the device
    runtime needs neither. `dla_core`: the engine's DLA core (engine metadata), set on the runtime before
    deserialising. `runtime_cache` (TensorRT-RTX): the file its kernels, specialised for this GPU at first run, are
    kept in between runs (loaded when it matches this GPU and driver, written back by `save_runtime_cache`).
    Written against the TensorRT 10.3/11.x/RTX 1.7 and cuda-python 12.9 APIs; not run here (no GPU)."""

    def __init__(self, engine_path: str | Path, name: str | None = None, *, flavor: str = "tensorrt",
                 dla_core: int | None = None, runtime_cache: str | Path | None = None):
        self.path = Path(engine_path)
        if not self.path.is_file():
            raise ExportError(f"TensorRT engine {self.path} not found")
        self.name = name or self.path.name
        trt = import_flavor(flavor)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        if dla_core is not None:
            if dla_core >= runtime.num_DLA_cores:
                raise ExportError(f"{self.name} runs on DLA core {dla_core} but this device has "
                                  f"{runtime.num_DLA_cores} DLA core(s); rebuild it without DLA for this device")
            runtime.DLA_core = dla_core
        self.engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise ExportError(f"TensorRT could not deserialize {self.path} (TensorRT's log above says why: no CUDA "
                              "GPU, or an engine of another flavor, version or GPU); rebuild it with `mova-export "
                              "compile` for this device")
        cudart = _cudart()
        self._trt, self._cudart = trt, cudart
        self.runtime_cache_path = Path(runtime_cache) if runtime_cache is not None else None
        self._runtime_cache = None
        if FLAVORS[flavor].runtime_cache and self.runtime_cache_path is not None:
            config = self.engine.create_runtime_config()
            self._runtime_cache = config.create_runtime_cache()
            if self.runtime_cache_path.is_file():  # False (kept empty) when written by another GPU / driver / version
                self._runtime_cache.deserialize(self.runtime_cache_path.read_bytes())
            config.set_runtime_cache(self._runtime_cache)
            self.context = self.engine.create_execution_context(config)
        else:
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = tuple(n for n in names if is_input[n])
        self.output_names = tuple(n for n in names if not is_input[n])
        self._stream = _cuda_call(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")

    def _device_copy(self, array: np.ndarray) -> int:
        cudart = self._cudart
        ptr = _cuda_call(cudart, cudart.cudaMalloc(max(array.nbytes, 1)), "cudaMalloc")
        _cuda_call(cudart, cudart.cudaMemcpy(ptr, array.ctypes.data, array.nbytes,
                                             cudart.cudaMemcpyKind.cudaMemcpyHostToDevice), "cudaMemcpy H2D")
        return ptr

    def infer(self, feed: Feed) -> dict[str, np.ndarray]:
        trt, cudart = self._trt, self._cudart
        check_feed(self.name, self.input_names, feed)
        buffers = []
        try:
            for n in self.input_names:
                array = np.ascontiguousarray(feed[n], dtype=trt.nptype(self.engine.get_tensor_dtype(n)))
                self.context.set_input_shape(n, tuple(array.shape))
                buffers.append(self._device_copy(array))
                self.context.set_tensor_address(n, buffers[-1])
            outs = {}
            for n in self.output_names:
                outs[n] = np.empty(tuple(self.context.get_tensor_shape(n)),
                                   dtype=trt.nptype(self.engine.get_tensor_dtype(n)))
                buffers.append(_cuda_call(cudart, cudart.cudaMalloc(max(outs[n].nbytes, 1)), "cudaMalloc"))
                self.context.set_tensor_address(n, buffers[-1])
            if not self.context.execute_async_v3(int(self._stream)):
                raise ExportError(f"{self.name}: TensorRT execution failed")
            _cuda_call(cudart, cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
            for array, ptr in zip(outs.values(), buffers[len(self.input_names):]):
                _cuda_call(cudart, cudart.cudaMemcpy(array.ctypes.data, ptr, array.nbytes,
                                                     cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost), "cudaMemcpy D2H")
            return outs
        finally:
            for ptr in buffers:
                cudart.cudaFree(ptr)

    def save_runtime_cache(self) -> Path | None:
        """Write the TensorRT-RTX runtime cache (kernels specialised for this GPU) to `runtime_cache`."""
        if self._runtime_cache is None or self.runtime_cache_path is None:
            return None
        self.runtime_cache_path.parent.mkdir(parents=True, exist_ok=True)
        self.runtime_cache_path.write_bytes(memoryview(self._runtime_cache.serialize()))
        return self.runtime_cache_path

    def close(self) -> None:
        if getattr(self, "_stream", None) is not None:
            self._cudart.cudaStreamDestroy(self._stream)
            self._stream = None
        self.context = self.engine = None

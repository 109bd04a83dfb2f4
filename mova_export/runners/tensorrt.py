"""A serialized TensorRT engine behind the Runner interface, for every flavor (tensorrt 10.x, 11.x, TensorRT-RTX), run
as device code: buffers allocated once, pinned staging, and outputs that stay on the GPU for the next engine.

* Each I/O tensor gets one device buffer for the engine's life, sized for its largest shape (the profile's max for
  the text encoder's length buckets; the other graphs are static), and one pinned host buffer (cudaMallocHost) for
  the copies that must happen: host inputs up, outputs the host keeps (the frame cache, the LLM's embeddings) down,
  all on the runner's stream and synchronised once per call.
* `DeviceTensor`: an output left in its runner's buffer, valid until that runner runs again. A feed may hand one in
  place of an array: its address becomes the input's address (no copy), e.g. the base tower's features as the
  routing adapter's and the slot adapter's `base`. `DeviceSlots` fills an input on the device from several outputs
  (zeros, then cudaMemcpy2DAsync per slot): the routed experts' [1, N, C_j] features into the slot adapter's
  [K, N, Cmax] `slot_features`, whose rows are wider than an expert's (C_j <= Cmax), so no single address serves.
* `DeviceChain` is how the runtime uses both without changing what its callers see: it remembers the arrays the
  runners returned (read-only from then on) and swaps an array handed back in for the device tensor still holding it.
* `engine_runner` checks an engine's recorded platform (core.platforms) against this device before loading it.
* A runtime's runners share one activation allocation (`context_memory`, runners/trt_memory.py) instead of each
  context holding its engine's peak for its whole life.

Device buffers and copies go through cuda-python, not torch, so the device runtime needs neither; TensorRT and
cuda-python are imported only when a runner is made. Written against the TensorRT 10.3 / 11.x / RTX 1.7 Python APIs
(engine I/O names, shapes and dtypes checked against engines TensorRT-RTX builds here) and cuda-python 12.9
(cudaMalloc, cudaMallocHost, cudaMemcpyAsync, cudaMemcpy2DAsync, cudaMemsetAsync); the buffer logic is tested here
against a simulated device (tests/test_targets.py). Not run on a GPU: none was lent to the machines that test it.
"""
from __future__ import annotations

import contextlib
import ctypes
import importlib.util
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..core.errors import ExportError
from ..core.platforms import DeviceInfo, EnginePlatform, check_platform, current_device
from ..core.tensorrt_flavors import FLAVORS, import_flavor
from .base import check_feed
from .trt_memory import ContextMemory


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


# What TensorRT-RTX's IRuntime::getEngineValidity (1.1+) can say about an engine before it is deserialised.
_INVALID_BECAUSE = {"VERSION_MISMATCH": "it was built by another TensorRT-RTX version",
                    "UNSUPPORTED_CC": "it was built for another compute capability",
                    "OLD_CUDA_DRIVER": "the CUDA driver is older than it needs",
                    "OLD_CUDA_RUNTIME": "the CUDA runtime is older than it needs",
                    "INSUFFICIENT_GPU_MEMORY": "there is not enough free GPU memory",
                    "MALFORMED_ENGINE": "the file is not a whole engine"}


def _refuse_invalid(trt: Any, runtime: Any, blob: bytes, name: str) -> None:
    """Where the runtime can tell (TensorRT-RTX), refuse an engine it calls invalid here, saying why. Without a GPU
    it reports INVALID with no diagnostic bit (measured): deserialisation then fails with its own message."""
    check = getattr(runtime, "get_engine_validity", None)
    if check is None or not hasattr(trt, "EngineValidity"):
        return
    validity, diagnostics = check(blob)
    if validity != trt.EngineValidity.INVALID:
        return
    flags = trt.EngineInvalidityDiagnostics
    reasons = [why for key, why in _INVALID_BECAUSE.items() if int(diagnostics) & int(getattr(flags, key, 0))]
    if reasons:
        raise ExportError(f"{name}: TensorRT-RTX cannot run this engine here: {'; '.join(reasons)}; rebuild it for "
                          "this GPU with `mova-export compile BUNDLE`")


@dataclass(eq=False)
class DeviceTensor:
    """An output left in a runner's device buffer; valid until that runner runs again or closes."""
    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype
    runner: "TensorRTRunner"
    generation: int

    @property
    def valid(self) -> bool:
        return self.runner.generation == self.generation and self.runner.context is not None


@dataclass(eq=False)
class DeviceSlots:
    """An input [K, ..., C] filled on the device: zeros, then each (slot, tensor [..., c <= C]) copied into the
    leading c channels of every row of slot `slot`."""
    shape: tuple[int, ...]
    dtype: np.dtype
    parts: tuple[tuple[int, DeviceTensor], ...]


@dataclass(eq=False)
class _Buffers:
    """One I/O tensor's device buffer and pinned host buffer, both sized for its largest shape."""
    name: str
    is_input: bool
    dtype: np.dtype
    max_shape: tuple[int, ...]
    device: int = 0
    host: int = 0

    @property
    def capacity(self) -> int:
        return max(int(np.prod(self.max_shape)) * self.dtype.itemsize, 1)

    def fits(self, shape: Sequence[int]) -> bool:
        return len(shape) == len(self.max_shape) and all(0 <= d <= m for d, m in zip(shape, self.max_shape))

    def host_view(self, shape: Sequence[int]) -> np.ndarray:
        """The pinned host buffer as an array of `shape` (no copy)."""
        count = int(np.prod(shape))
        raw = (ctypes.c_byte * max(count * self.dtype.itemsize, 1)).from_address(self.host)
        return np.frombuffer(raw, dtype=self.dtype, count=count).reshape(tuple(shape))


class TensorRTRunner:
    """A serialized TensorRT engine on this machine's GPU, for any flavor (`tensorrt_flavors`: tensorrt-10, tensorrt,
    tensorrt-rtx; imported lazily), with its buffers allocated once (module doc). `dla_core`: the engine's DLA core
    (engine metadata), set on the runtime before deserialising. `runtime_cache` (TensorRT-RTX): the file its kernels,
    specialised for this GPU at first run, are kept in between runs (loaded when it matches this GPU and driver,
    written back by `save_runtime_cache`). Written against the TensorRT 10.3/11.x/RTX 1.7 and cuda-python 12.9 APIs;
    not run on a GPU here (none lent)."""

    def __init__(self, engine_path: str | Path, name: str | None = None, *, flavor: str = "tensorrt",  # noqa: PLR0913 (engine options)
                 dla_core: int | None = None, runtime_cache: str | Path | None = None,
                 memory: ContextMemory | None = None):
        self.path = Path(engine_path)
        if not self.path.is_file():
            raise ExportError(f"TensorRT engine {self.path} not found")
        self.name = name or self.path.name
        self.context = self.engine = self._stream = None
        self._memory = memory
        self._buffers: dict[str, _Buffers] = {}
        self.generation = 0
        self.last: dict[str, DeviceTensor] = {}
        trt = import_flavor(flavor)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        if dla_core is not None:
            if dla_core >= runtime.num_DLA_cores:
                raise ExportError(f"{self.name} runs on DLA core {dla_core} but this device has "
                                  f"{runtime.num_DLA_cores} DLA core(s); rebuild it without DLA for this device")
            runtime.DLA_core = dla_core
        blob = self.path.read_bytes()
        _refuse_invalid(trt, runtime, blob, self.name)
        self.engine = runtime.deserialize_cuda_engine(blob)
        del blob   # on unified memory (Jetson, DGX Spark) the file's bytes share the pool with the engine
        if self.engine is None:
            raise ExportError(f"TensorRT could not deserialize {self.path} (TensorRT's log above says why: no CUDA "
                              "GPU, or an engine of another flavor, version or GPU); rebuild it with `mova-export "
                              "compile` for this device")
        cudart = _cudart()
        self._trt, self._cudart = trt, cudart
        self.runtime_cache_path = Path(runtime_cache) if runtime_cache is not None else None
        self._runtime_cache = None
        allocation = trt.ExecutionContextAllocationStrategy
        strategy = allocation.USER_MANAGED if memory is not None else allocation.STATIC
        if FLAVORS[flavor].runtime_cache and self.runtime_cache_path is not None:
            config = self.engine.create_runtime_config()
            self._runtime_cache = config.create_runtime_cache()
            if self.runtime_cache_path.is_file():  # False (kept empty) when written by another GPU / driver / version
                self._runtime_cache.deserialize(self.runtime_cache_path.read_bytes())
            config.set_runtime_cache(self._runtime_cache)
            config.set_execution_context_allocation_strategy(strategy)
            self.context = self.engine.create_execution_context(config)
        else:
            self.context = self.engine.create_execution_context(strategy)
        if memory is not None:
            memory.attach(self)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = tuple(n for n in names if is_input[n])
        self.output_names = tuple(n for n in names if not is_input[n])
        self._stream = _cuda_call(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._allocate()

    # ---- buffers ----------------------------------------------------------------------------------------------------
    def _max_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every I/O tensor's largest shape: the engine's static shape, the optimization profile's max for an input
        with symbolic dimensions, and each output's shape with those inputs at their max."""
        shapes = {}
        for n in self.input_names:
            shape = tuple(self.engine.get_tensor_shape(n))
            if any(d < 0 for d in shape):
                shape = tuple(self.engine.get_tensor_profile_shape(n, 0)[2])
                self.context.set_input_shape(n, shape)
            shapes[n] = shape
        return {**shapes, **{n: tuple(self.context.get_tensor_shape(n)) for n in self.output_names}}

    def _allocate(self) -> None:
        cudart, trt = self._cudart, self._trt
        for n, shape in self._max_shapes().items():
            buf = _Buffers(n, n in self.input_names, np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))), shape)
            self._buffers[n] = buf   # registered first: close() frees whatever was allocated if a call fails
            buf.device = int(_cuda_call(cudart, cudart.cudaMalloc(buf.capacity), "cudaMalloc"))
            buf.host = int(_cuda_call(cudart, cudart.cudaMallocHost(buf.capacity), "cudaMallocHost"))
            self.context.set_tensor_address(n, buf.device)

    def accepts(self, name: str, value: DeviceTensor | DeviceSlots) -> bool:
        """Whether input `name` can read `value` on the device: same dtype, a shape within its buffer, still valid."""
        buf = self._buffers.get(name)
        if buf is None or not buf.is_input or np.dtype(value.dtype) != buf.dtype or not buf.fits(value.shape):
            return False
        if isinstance(value, DeviceTensor):
            return value.valid
        rows = int(np.prod(value.shape[1:-1]))
        return all(0 <= slot < value.shape[0] and t.valid and np.dtype(t.dtype) == buf.dtype
                   and t.shape[-1] <= value.shape[-1] and int(np.prod(t.shape[:-1])) == rows
                   for slot, t in value.parts)

    def _copy(self, dst: int, src: int, nbytes: int, kind: str) -> None:
        cudart = self._cudart
        _cuda_call(cudart, cudart.cudaMemcpyAsync(dst, src, nbytes, getattr(cudart.cudaMemcpyKind, kind),
                                                  self._stream), kind)

    def _fill_slots(self, buf: _Buffers, slots: DeviceSlots) -> None:
        cudart, item = self._cudart, buf.dtype.itemsize
        per_slot = int(np.prod(slots.shape[1:])) * item
        _cuda_call(cudart, cudart.cudaMemsetAsync(buf.device, 0, slots.shape[0] * per_slot, self._stream),
                   "cudaMemsetAsync")
        for slot, t in slots.parts:
            width = t.shape[-1] * item
            _cuda_call(cudart, cudart.cudaMemcpy2DAsync(
                buf.device + slot * per_slot, slots.shape[-1] * item, t.ptr, width, width,
                int(np.prod(t.shape[:-1])), cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice, self._stream),
                "cudaMemcpy2DAsync")

    def _stage(self, name: str, value: Any) -> None:
        """Put one input where the engine reads it: a device tensor's own address, slots filled on the device, or a
        host array through the pinned buffer."""
        buf = self._buffers[name]
        if isinstance(value, (DeviceTensor, DeviceSlots)):
            if not self.accepts(name, value):
                raise ExportError(f"{self.name}: input {name} cannot read that device tensor ({np.dtype(value.dtype)} "
                                  f"{list(value.shape)}; it takes {buf.dtype} up to {list(buf.max_shape)}, or it is "
                                  "stale); pass the array")
            if isinstance(value, DeviceSlots):
                self._fill_slots(buf, value)
            address, shape = (value.ptr, value.shape) if isinstance(value, DeviceTensor) else (buf.device, value.shape)
        else:
            array = np.ascontiguousarray(value, dtype=buf.dtype)
            if not buf.fits(array.shape):
                raise ExportError(f"{self.name}: input {name} has shape {list(array.shape)}; the engine takes "
                                  f"{list(buf.max_shape)} at most")
            np.copyto(buf.host_view(array.shape), array)
            self._copy(buf.device, buf.host, array.nbytes, "cudaMemcpyHostToDevice")
            address, shape = buf.device, array.shape
        if not self.context.set_input_shape(name, tuple(shape)):
            raise ExportError(f"{self.name}: TensorRT refused shape {list(shape)} for input {name}")
        self.context.set_tensor_address(name, address)

    # ---- running ----------------------------------------------------------------------------------------------------
    def run(self, feed: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """`infer` that also takes DeviceTensor / DeviceSlots inputs and leaves every output on the device
        (`self.last`, valid until the next run): one stream, one synchronisation, no allocation."""
        if self.context is None:
            raise ExportError(f"{self.name} is closed; make a new TensorRTRunner")
        check_feed(self.name, self.input_names, feed)
        self.generation += 1
        for n in self.input_names:
            self._stage(n, feed[n])
        shapes = {n: tuple(self.context.get_tensor_shape(n)) for n in self.output_names}
        with self._memory.lock if self._memory is not None else contextlib.nullcontext():
            if not self.context.execute_async_v3(int(self._stream)):
                raise ExportError(f"{self.name}: TensorRT execution failed")
            for n, shape in shapes.items():
                buf = self._buffers[n]
                self._copy(buf.host, buf.device, int(np.prod(shape)) * buf.dtype.itemsize, "cudaMemcpyDeviceToHost")
            _cuda_call(self._cudart, self._cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        self.last = {n: DeviceTensor(self._buffers[n].device, shape, self._buffers[n].dtype, self, self.generation)
                     for n, shape in shapes.items()}
        return {n: self._buffers[n].host_view(shape).copy() for n, shape in shapes.items()}

    def infer(self, feed: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return self.run(feed)

    def save_runtime_cache(self) -> Path | None:
        """Write the TensorRT-RTX runtime cache (kernels specialised for this GPU) to `runtime_cache`."""
        if self._runtime_cache is None or self.runtime_cache_path is None:
            return None
        self.runtime_cache_path.parent.mkdir(parents=True, exist_ok=True)
        self.runtime_cache_path.write_bytes(memoryview(self._runtime_cache.serialize()))
        return self.runtime_cache_path

    def close(self) -> None:
        """Free the device and pinned buffers and the stream (the context first: nothing runs after a run returns)."""
        if self._memory is not None:
            self._memory.detach(self)
            self._memory = None
        self.context = self.engine = None
        cudart = getattr(self, "_cudart", None)
        for buf in self._buffers.values():
            if cudart is not None and buf.device:
                cudart.cudaFree(buf.device)
            if cudart is not None and buf.host:
                cudart.cudaFreeHost(buf.host)
            buf.device = buf.host = 0
        self._buffers = {}
        if self._stream is not None and cudart is not None:
            cudart.cudaStreamDestroy(self._stream)
        self._stream = None

    def __del__(self) -> None:   # the runtime drops an unloaded expert's runner without closing it
        if getattr(self, "_buffers", None) or getattr(self, "_stream", None) is not None:
            self.close()


@dataclass
class DeviceChain:
    """Which arrays the TensorRT runners returned, and the device tensors still holding them: an array handed back in
    a later feed is read on the device instead of copied up again (base -> routing and slot adapter), and the slot
    adapter's slot_features is filled on the device from the routed experts' outputs. Outputs it remembers are made
    read-only (as the runtime's frame cache does), so the host array and its device copy cannot drift apart."""
    held: dict[int, tuple[np.ndarray, DeviceTensor]] = field(default_factory=dict)

    def _device(self, array: Any) -> DeviceTensor | None:
        found = self.held.get(id(array)) if isinstance(array, np.ndarray) else None
        return found[1] if found is not None and found[0] is array and found[1].valid else None

    def run(self, runner: TensorRTRunner, feed: Mapping[str, Any]) -> dict[str, np.ndarray]:
        swapped = {}
        for name, value in feed.items():
            tensor = self._device(value)
            swapped[name] = tensor if tensor is not None and runner.accepts(name, tensor) else value
        out = runner.run(swapped)
        self.held = {k: v for k, v in self.held.items() if v[1].valid}   # the runner's earlier outputs are gone
        for name, array in out.items():
            array.flags.writeable = False
            self.held[id(array)] = (array, runner.last[name])
        return out

    def slots(self, runner: TensorRTRunner, name: str, host: np.ndarray, parts: Sequence[np.ndarray]
              ) -> np.ndarray | DeviceSlots:
        """`host` (slots filled on the host) as DeviceSlots when every part (slot i's source) is still on the device
        in a form input `name` takes; else `host` itself."""
        tensors = [self._device(p) for p in parts]
        if any(t is None for t in tensors):
            return host
        slots = DeviceSlots(tuple(host.shape), host.dtype, tuple(enumerate(tensors)))
        return slots if runner.accepts(name, slots) else host

    def clear(self) -> None:
        self.held.clear()


@lru_cache(maxsize=1)
def this_device() -> DeviceInfo:
    """current_device(), asked once per process (cuda-python, nvidia-smi and dpkg are slow to ask per engine)."""
    return current_device()


def context_memory() -> ContextMemory:
    """A ContextMemory on this GPU (cudaMalloc / cudaFree), for the runners of one runtime to share."""
    cudart = _cudart()
    return ContextMemory(lambda n: int(_cuda_call(cudart, cudart.cudaMalloc(n), "cudaMalloc")),
                         lambda ptr: _cuda_call(cudart, cudart.cudaFree(ptr), "cudaFree"))


def engine_runner(root: str | Path, entry: Mapping[str, Any], name: str, *,
                  device: DeviceInfo | None = None, memory: ContextMemory | None = None) -> TensorRTRunner:
    """The engine of a manifest `engines` entry, its recorded platform checked against this device first (a JetPack
    6.2 engine on JetPack 7.2, an SM89 engine on SM120: BundleError naming the command that rebuilds it), then loaded
    with its own flavor and DLA core."""
    platform = EnginePlatform.from_json({**entry, **(entry.get("platform") or {})})
    check_platform(platform, device if device is not None else this_device(), f"engine for {name}",
                   str(entry.get("recipe") or ""), root)
    return TensorRTRunner(Path(root) / str(entry["engine"]), name, flavor=platform.flavor,
                          dla_core=entry.get("dla_core"), memory=memory)


__all__ = ["ContextMemory", "DeviceChain", "DeviceSlots", "DeviceTensor", "TensorRTRunner", "context_memory",
           "engine_runner", "tensorrt_available", "this_device"]

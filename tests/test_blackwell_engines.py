"""Blackwell engines ahead of time, as CI builds them: `build --target rtx-5090` and `--target dgx-spark` compile the
tiny bundle's graphs (FP8 towers, FP16 text encoder and adapter) with TensorRT-RTX for SM120 and SM121, the INT8
graphs of the Orin bundle compile for both too, and every engine's metadata records the platform it was built for.
Then the runtime's engine path on a simulated GPU (cuda-python's calls on host memory, each engine executed by ONNX
Runtime from its real TensorRT-RTX I/O): buffers allocated once, the base features read by both adapters where the
base engine left them, the slot adapter's slots filled from the experts' outputs on the device, and the results
bit-identical to the same engines fed through the host (what is no longer copied up, measured: the base features
into both adapters, the slot tensor, the text features into the slot adapter)."""
from __future__ import annotations

import ctypes
import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mova_export.bundle import load_bundle
from mova_export.cli import main
from mova_export.cli.inspect import describe_bundle
from mova_export.compile import compile_bundle, current_device, inspect_graph, installed_flavors
from mova_export.core.platforms import DeviceInfo, host_platform
from mova_export.recipe import load_recipe

HAS_RTX = "tensorrt-rtx" in installed_flavors()
needs_rtx = pytest.mark.skipif(not HAS_RTX, reason="TensorRT-RTX is not importable (pip install "
                                                   "'mova-export[tensorrt-rtx]')")
BLACKWELL = {"rtx-5090": "12.0", "dgx-spark": "12.1"}
INT8_GRAPHS = ["base", "expert_A", "text_encoder"]     # the Orin bundle's INT8 graphs compiled for SM120 / SM121


@pytest.fixture(scope="module")
def blackwell_builds(tiny_checkpoint, calib_dir, work_dir, builds, export_only):
    """`build --target rtx-5090` and `--target dgx-spark`: every unit but the engines is the rtx-4090 build's (same
    quantize settings, same GGUF), so this costs the compile stage."""
    from mova_export.pipeline import BuildRequest, build

    return {t: build(BuildRequest(checkpoint=tiny_checkpoint, target=t, out=builds / t, calib=calib_dir,
                                  work_dir=work_dir, quiet=True)) for t in BLACKWELL}


def _metadata(bundle: Path, entry: dict) -> dict:
    return json.loads((bundle / entry["metadata"]).read_text())


@pytest.mark.tensorrt
def test_rtx5090_and_dgx_spark_builds_write_engines_like_the_4090(blackwell_builds):
    if not HAS_RTX:
        for result in blackwell_builds.values():
            assert not result.manifest.engines and result.manifest.stages["compile"]["status"] == "skipped"
        pytest.skip("TensorRT-RTX is not importable: no engines to check")
    import tensorrt_rtx_bindings as trt

    for target, cc in BLACKWELL.items():
        result = blackwell_builds[target]
        m, bundle = result.manifest, result.bundle
        assert m.stages["compile"]["status"] == "compiled" and m.stages["compile"]["flavor"] == "tensorrt-rtx"
        assert set(m.engines) == set(m.graphs) and m.target["recipe"] == target
        seconds = 0.0
        for name, entry in m.engines.items():
            meta = _metadata(bundle, entry)
            assert entry["precision"] == m.runtime.precision[name] == meta["precision"]
            assert (entry["flavor"], entry["tensorrt_version"], entry["compute_capability"]) == \
                ("tensorrt-rtx", trt.__version__, cc)
            assert meta["builder"]["compute_capability"] == cc and meta["builder"]["strongly_typed"]
            assert entry["platform"] == {"flavor": "tensorrt-rtx", "tensorrt_version": trt.__version__,
                                         "compute_capability": cc, "gpu_name": None, "cuda_major": 12,
                                         "jetpack": None, "l4t": None, "built_on": host_platform()}
            assert meta["engine_bytes"] > 10_000 and entry["engine"] in m.files and meta["build_s"] > 0
            assert meta["parity"]["status"] in ("verified", "unverified") and meta["layers"]["compute_layers"] > 0
            graph = inspect_graph(bundle / meta["source_graph"])
            if meta["precision"] == "fp8":   # the FP8 towers really are FP8 Q/DQ graphs (fp16 where one fell back)
                assert graph.qdq == ("fp8",), name
            seconds += meta["build_s"]
        towers = [n for n in m.graphs if n == "base" or n.startswith("expert_")]
        assert sum(m.runtime.precision[n] == "fp8" for n in towers) >= len(towers) - 2, m.runtime.precision
        info = describe_bundle(bundle)
        assert {e["compute_capability"] for e in info["engines"]} == {cc}
        assert {e["platform"]["describe"] for e in info["engines"]} == {
            f"SM{cc.replace('.', '')}, tensorrt-rtx {trt.__version__}, CUDA 12"}
        shown = CliRunner().invoke(main, ["inspect", str(bundle), "--no-verify"], env={"COLUMNS": "80"}).output
        lines = shown.splitlines()
        table = lines[next(i for i, line in enumerate(lines) if line.startswith("TensorRT engines (")):]
        rows = {line.split()[0]: line.split() for line in table if line.split()[:1] and line.split()[0] in m.engines}
        assert set(rows) == set(m.engines) and all(r[2] == cc for r in rows.values()), shown   # 80 columns
        assert f"engines built for SM{cc.replace('.', '')}, tensorrt-rtx {trt.__version__}, CUDA 12" in shown
        print(f"{target}: {len(m.engines)} engines for SM{cc.replace('.', '')} in {seconds:.1f} s of build time")


@pytest.mark.tensorrt
@needs_rtx
@pytest.mark.parametrize("target", sorted(BLACKWELL))
def test_int8_graphs_compile_for_sm120_and_sm121(orin_build, tmp_path, target):
    bundle = Path(shutil.copytree(orin_build.bundle, tmp_path / "bundle"))
    cc = BLACKWELL[target]
    metas = compile_bundle(bundle, load_recipe(target), INT8_GRAPHS, device=current_device())
    assert [m.component for m in metas] == INT8_GRAPHS
    for meta in metas:
        assert (meta.precision, meta.flavor, meta.compute_capability, meta.cuda_major) == \
            ("int8", "tensorrt-rtx", cc, 12)
        assert inspect_graph(bundle / meta.source_graph).qdq == ("int8",)
        assert meta.builder["strongly_typed"] and meta.builder["compute_capability"] == cc
        assert meta.engine_bytes > 10_000 and meta.layers["attention_matmuls_fp32"] == 0
    assert load_bundle(bundle).manifest.target["recipe"] == target   # the bundle now says what it was compiled for


# ---- the runtime's engine path on a simulated GPU -------------------------------------------------------------------
class FakeCuda:
    """The cuda-python runtime calls TensorRTRunner makes, on host memory: "device" pointers are real addresses of
    host buffers kept here, so every copy is a memmove. It counts what it is asked and checks each copy's direction."""

    class cudaMemcpyKind:  # noqa: N801 - cuda-python's name
        cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice = "h2d", "d2h", "d2d"

    def __init__(self):
        self.blocks: dict[int, tuple[np.ndarray, str]] = {}
        self.calls: Counter = Counter()
        self.bytes: Counter = Counter()

    def _alloc(self, n, space):
        buf = np.zeros(n, np.uint8)
        self.blocks[buf.ctypes.data] = (buf, space)
        return (0, buf.ctypes.data)

    def space(self, ptr):
        return next((space for start, (buf, space) in self.blocks.items() if start <= ptr < start + buf.size), None)

    def cudaMalloc(self, n):  # noqa: N802 - cuda-python's names from here on
        self.calls["malloc"] += 1
        return self._alloc(n, "device")

    def cudaMallocHost(self, n):  # noqa: N802
        self.calls["malloc_host"] += 1
        return self._alloc(n, "pinned")

    def cudaFree(self, ptr):  # noqa: N802
        assert self.blocks.pop(ptr)[1] == "device"
        return (0,)

    def cudaFreeHost(self, ptr):  # noqa: N802
        assert self.blocks.pop(ptr)[1] == "pinned"
        return (0,)

    def cudaStreamCreate(self):  # noqa: N802
        return (0, 7)

    def cudaStreamDestroy(self, stream):  # noqa: N802
        return (0,)

    def cudaStreamSynchronize(self, stream):  # noqa: N802
        self.calls["sync"] += 1
        return (0,)

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):  # noqa: N802
        want = {"h2d": ("device", "pinned"), "d2h": ("pinned", "device"), "d2d": ("device", "device")}[kind]
        assert (self.space(dst), self.space(src)) == want, kind   # pinned staging both ways, never pageable
        self.calls[kind] += 1
        self.bytes[kind] += n
        ctypes.memmove(dst, src, n)
        return (0,)

    def cudaMemcpy2DAsync(self, dst, dpitch, src, spitch, width, height, kind, stream):  # noqa: N802
        assert kind == "d2d" and self.space(dst) == self.space(src) == "device" and width <= min(dpitch, spitch)
        for row in range(height):
            ctypes.memmove(dst + row * dpitch, src + row * spitch, width)
        self.calls["2d"] += 1
        self.bytes["d2d"] += width * height
        return (0,)

    def cudaMemsetAsync(self, ptr, value, n, stream):  # noqa: N802
        assert self.space(ptr) == "device"
        ctypes.memset(ptr, value, n)
        return (0,)

    def cudaGetErrorString(self, err):  # noqa: N802
        return (0, b"simulated")


def _view(ptr: int, shape, dtype) -> np.ndarray:
    count = int(np.prod(shape))
    raw = (ctypes.c_byte * (count * np.dtype(dtype).itemsize)).from_address(ptr)
    return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)


class FakeEngine:
    """An engine as TensorRT-RTX describes it (I/O names, shapes, dtypes from its real parse of the graph), executed by
    ONNX Runtime on the simulated device memory (Q/DQ as float math, what TensorRT runs)."""

    def __init__(self, trt, graph: Path, buckets):
        from mova_export.runners.ort import OrtRunner

        logger = trt.Logger(trt.Logger.ERROR)
        network = trt.Builder(logger).create_network(0)
        assert trt.OnnxParser(network, logger).parse_from_file(str(graph))
        tensors = [network.get_input(i) for i in range(network.num_inputs)] + \
                  [network.get_output(i) for i in range(network.num_outputs)]
        self.io = [(t.name, tuple(t.shape), t.dtype, t.is_network_input) for t in tensors]
        self.trt, self.buckets, self.ort = trt, buckets, OrtRunner(graph, qdq="float")
        self.num_io_tensors = len(self.io)
        self.device_memory_size_v2 = graph.stat().st_size // 4 // 256 * 256   # activations, made up per engine

    def _row(self, name):
        return next(row for row in self.io if row[0] == name)

    def get_tensor_name(self, i):
        return self.io[i][0]

    def get_tensor_mode(self, name):
        return self.trt.TensorIOMode.INPUT if self._row(name)[3] else self.trt.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return self._row(name)[2]

    def get_tensor_shape(self, name):
        return self._row(name)[1]

    def get_tensor_profile_shape(self, name, profile):
        shape = self._row(name)[1]
        pick = [tuple(d if d >= 0 else size for d in shape) for size in (min(self.buckets), min(self.buckets),
                                                                          max(self.buckets))]
        return pick

    def create_execution_context(self, strategy):
        return FakeContext(self, strategy)


class FakeContext:
    def __init__(self, engine: FakeEngine, strategy):
        self.engine, self.shapes, self.addresses, self.executed = engine, {}, {}, []
        self.strategy, self.memory = strategy, None

    def set_device_memory(self, ptr, size):
        assert size >= self.engine.device_memory_size_v2
        self.memory = (ptr, size)

    def set_input_shape(self, name, shape):
        static = self.engine._row(name)[1]
        ok = len(shape) == len(static) and all(s < 0 or s == d for s, d in zip(static, shape))
        if ok:
            self.shapes[name] = tuple(shape)
        return ok

    def get_tensor_shape(self, name):
        shape = self.engine._row(name)[1]
        return self.shapes.get(name, shape) if self.engine._row(name)[3] else shape

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr

    def execute_async_v3(self, stream):
        trt = self.engine.trt
        if self.strategy == trt.ExecutionContextAllocationStrategy.USER_MANAGED:   # runs in memory it was given
            assert self.memory is not None and self.memory[1] >= self.engine.device_memory_size_v2
        feed = {name: _view(self.addresses[name], self.get_tensor_shape(name), trt.nptype(dtype)).copy()
                for name, _, dtype, is_input in self.engine.io if is_input}
        self.executed.append(dict(self.addresses))
        for name, value in self.engine.ort.infer(feed).items():
            np.copyto(_view(self.addresses[name], value.shape, value.dtype), value)
        return True


class FakeTensorRT:
    """tensorrt_rtx_bindings with its Runtime simulated: the real enums, dtypes and nptype."""

    def __init__(self, real, graphs: dict[str, Path], buckets):
        self._real, self._graphs, self._buckets = real, graphs, buckets

    def __getattr__(self, name):
        return getattr(self._real, name)

    def Runtime(self, logger):  # noqa: N802 - TensorRT's name
        outer = self

        class Runtime:
            num_DLA_cores, DLA_core = 0, -1

            def get_engine_validity(self, blob):
                return outer._real.EngineValidity.VALID, 0

            def deserialize_cuda_engine(self, blob):
                return FakeEngine(outer._real, outer._graphs[hashlib.sha256(blob).hexdigest()], outer._buckets)

        return Runtime()


def _request(vision, images, mask):
    facts = vision.facts
    arrays = {kind: vision.preprocess(images["chelsea"], kind) for kind in facts.image_inputs}
    feed = lambda tower: [a for kind in tower.image_inputs for a in arrays[kind]]  # noqa: E731
    base = vision.base(feed(facts.base))
    image_tokens, routing_tokens = vision.adapter_routing(base)
    text = vision.text("What animal is this?")
    experts = {i: vision.expert(t.component, feed(t)) for i, (t, on) in enumerate(zip(facts.experts, mask)) if on}
    return {"base": base, "image_tokens": image_tokens, "routing_tokens": routing_tokens, "text": text,
            **{f"expert_{i}": f for i, f in experts.items()}, "answer": vision.adapter_answer(base, text, mask, experts)}


@pytest.mark.tensorrt
@needs_rtx
def test_engines_on_a_simulated_gpu_allocate_once_and_hand_outputs_on(blackwell_builds, images, monkeypatch):
    import tensorrt_rtx_bindings as real

    import mova_export.runners.tensorrt as trt_runner
    import mova_export.runtime.vision as vision_module
    from mova_export.runners.tensorrt import DeviceChain, TensorRTRunner
    from mova_export.runtime.vision import BundleVision

    bundle = load_bundle(blackwell_builds["rtx-5090"].bundle)
    graphs = {}
    for entry in bundle.manifest.engines.values():
        blob = (bundle.path / entry["engine"]).read_bytes()
        graphs[hashlib.sha256(blob).hexdigest()] = bundle.path / _metadata(bundle.path, entry)["source_graph"]
    cuda = FakeCuda()
    monkeypatch.setattr(trt_runner, "import_flavor", lambda flavor: FakeTensorRT(real, graphs,
                                                                                 bundle.manifest.model.text_buckets))
    monkeypatch.setattr(trt_runner, "_cudart", lambda: cuda)
    monkeypatch.setattr(trt_runner, "this_device", lambda: DeviceInfo.of(
        "NVIDIA GeForce RTX 5090", "12.0", {"tensorrt-rtx": real.__version__}, cuda={"tensorrt-rtx": 12}))
    monkeypatch.setattr(vision_module, "tensorrt_available", lambda: True)
    mask = [1, 0, 0, 1, 1, 0, 0]      # A, D, E: 32, 32 and 48 channels into slots of 48

    vision = BundleVision(bundle, device="cuda", backend="tensorrt")
    vision.load()
    runners = {name: r for name, r in vision._runners.items()}
    assert all(isinstance(r, TensorRTRunner) for r in runners.values())
    io = sum(len(r.input_names) + len(r.output_names) for r in runners.values())
    device_blocks = lambda: sum(space == "device" for _, space in cuda.blocks.values())  # noqa: E731
    assert cuda.calls["malloc_host"] == io                              # one pinned buffer per tensor,
    assert device_blocks() == io + 1                                    # one device buffer, and the activations:
    needs = [r.engine.device_memory_size_v2 for r in runners.values()]
    shared = {r.context.memory for r in runners.values()}               # every context in one allocation, as large
    assert shared == {(vision._context_memory.ptr, max(needs))} and cuda.space(vision._context_memory.ptr) == "device"
    assert len(set(needs)) > 1 and sum(needs) > 2 * max(needs)          # as the largest engine needs, not the sum
    allocated = cuda.calls["malloc"]
    first = _request(vision, images, mask)
    second = _request(vision, images, mask)
    assert cuda.calls["malloc"] == allocated                            # nothing allocated per call
    for key in first:
        np.testing.assert_array_equal(first[key], second[key], err_msg=key)
    base_out = runners[vision.base_graph.name]._buffers["features"].device
    for graph in (vision.routing_graph, vision.answer_graph):          # both adapters read base where it was left
        assert runners[graph.name].context.executed[-1]["base"] == base_out
    assert cuda.calls["2d"] == 2 * sum(mask)                           # each routed expert copied into its slot
    slot_input = runners[vision.answer_graph.name]._buffers["slot_features"].device
    assert runners[vision.answer_graph.name].context.executed[-1]["slot_features"] == slot_input
    uploaded = cuda.bytes["h2d"]

    # the same engines fed through the host (no device chain) give the same bits
    monkeypatch.setattr(DeviceChain, "run", lambda self, runner, feed: runner.run(feed))
    monkeypatch.setattr(DeviceChain, "slots", lambda self, runner, name, host, parts: host)
    plain = BundleVision(bundle, device="cuda", backend="tensorrt")
    before = cuda.bytes["h2d"]
    host_fed = _request(plain, images, mask)
    for key in first:
        np.testing.assert_array_equal(first[key], host_fed[key], err_msg=key)
    saved = (cuda.bytes["h2d"] - before) - uploaded // 2           # what one request no longer copies up
    slots = runners[vision.answer_graph.name]._buffers["slot_features"]
    # base into both adapters, the slots, and the text features into the slot adapter
    assert saved == 2 * first["base"].nbytes + int(np.prod(slots.max_shape)) * 4 + first["text"].nbytes, saved
    for runner in runners.values():
        runner.close()
    vision.close()
    plain.close()
    assert not cuda.blocks                                             # every device and pinned buffer freed


class _Context:
    memory = None

    def set_device_memory(self, ptr, size):
        self.memory = (ptr, size)


class _Runner:
    def __init__(self, need):
        self.engine, self.context = type("Engine", (), {"device_memory_size_v2": need})(), _Context()


def test_shared_context_memory_grows_for_a_larger_engine_and_is_freed_with_its_last_user():
    from mova_export.runners.trt_memory import ContextMemory

    cuda = FakeCuda()
    memory = ContextMemory(lambda n: cuda.cudaMalloc(n)[1], lambda ptr: cuda.cudaFree(ptr))
    small, large, medium = _Runner(1024), _Runner(4096), _Runner(2048)
    memory.attach(small)
    assert small.context.memory == (memory.ptr, 1024) and len(cuda.blocks) == 1
    memory.attach(large)                     # a lazily loaded expert needs more: one larger block, both moved to it
    assert small.context.memory == large.context.memory == (memory.ptr, 4096) and len(cuda.blocks) == 1
    memory.attach(medium)                    # fits: no allocation
    assert medium.context.memory == (memory.ptr, 4096) and cuda.calls["malloc"] == 2
    for runner in (large, medium):
        memory.detach(runner)
    assert len(cuda.blocks) == 1             # still in use by the small engine
    memory.detach(small)
    assert not cuda.blocks and memory.size == 0

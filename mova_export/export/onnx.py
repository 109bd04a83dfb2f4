"""Static ONNX graphs from torch modules and their fp16 variants, checked against their declaration.

Loaders in the Polygraphy style: `onnx_from_component` (torch module -> checked fp32 graph), `fp16_from_onnx`
(fp32 graph -> fp16 graph with fp32 islands), `check_graph` (graph vs the declared inputs and outputs).

Exporter: the TorchScript exporter (`dynamo=False`). The dynamo exporter gives smaller raw graphs but fails on the
SAM towers ("Failed to decompose the FX graph", measured on torch 2.13), so one exporter is used for every
component; onnxslim then folds the shape arithmetic the TorchScript exporter leaves behind.
"""
from __future__ import annotations

import contextlib
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np

from ..errors import ExportError

if TYPE_CHECKING:  # pragma: no cover
    import onnx
    import torch

    from ..components import ComponentSpec
    from ..config import MoVAConfig
    from ..spec import TensorSpec

OPSET = 18
EXPORTER = "torchscript"
PROTO_LIMIT = 2**31 - 1          # protobuf's hard limit: larger graphs keep their weights in one external file
SIMPLIFY_LIMIT = PROTO_LIMIT - (256 << 20)  # onnxslim works on the in-memory proto: graphs without external data
# Ops with data-dependent control flow or output shapes: a static graph has none.
DYNAMIC_OPS = frozenset({"If", "Loop", "Scan", "NonZero", "Unique", "Compress", "NonMaxSuppression"})

# fp16 conversion keeps these in fp32 (as the reference computes them): the bilinear alignment, norms and softmax
# (the gate softmax with its -1e6 logits; attention softmax too, which costs two casts and protects against overflow).
FP32_OPS = ("Resize", "LayerNormalization", "GroupNormalization", "InstanceNormalization", "Softmax",
            "ReduceMean", "Pow", "Sqrt", "Reciprocal")
# Decomposed norms (SAM's channels-first LayerNorm, Pix2Struct's RMSNorm) show up as elementwise nodes under a
# module scope whose name contains "norm"; their weight-free arithmetic stays fp32 too.
_NORM_SCOPE = re.compile(r"/[^/]*norm[^/]*/", re.IGNORECASE)
_NORM_SCOPE_OPS = frozenset({"Sub", "Add", "Mul", "Div", "Sqrt", "Pow", "ReduceMean", "Reciprocal", "Cast"})


Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


# ---------------------------------------------------------------------------------------------------------------
# files

def graph_files(path: Path) -> list[Path]:
    """The graph file and the external data files it references (relative locations, next to it)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    locations = set()
    for tensor in _all_initializers(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    locations.add(entry.value)
    return [path, *(path.parent / loc for loc in sorted(locations))]


def _all_initializers(graph: "onnx.GraphProto") -> Iterable["onnx.TensorProto"]:
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.t is not None and attr.HasField("t"):
                yield attr.t


def _weights_bytes(model: "onnx.ModelProto") -> int:
    return sum(t.ByteSize() for t in model.graph.initializer)


def _too_large(model: "onnx.ModelProto") -> bool:
    """True when the proto cannot be one file (2 GB protobuf limit, with a margin for the graph itself)."""
    return _weights_bytes(model) > PROTO_LIMIT - (256 << 20) or model.ByteSize() > PROTO_LIMIT - (64 << 20)


def save_model(model: "onnx.ModelProto", path: Path) -> list[Path]:
    """Save a graph; weights go to one `<name>.data` file beside it when the proto would pass 2 GB."""
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    if _too_large(model):
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
        data.chmod(0o644)  # onnx creates it owner-only; a bundle is meant to be copied and read by others
    else:
        onnx.save_model(model, str(path))
    return graph_files(path)


# ---------------------------------------------------------------------------------------------------------------
# torch -> ONNX

def example_args(inputs: Sequence["TensorSpec"], feed: dict[str, Any], name: str) -> tuple["torch.Tensor", ...]:
    """Positional example tensors for tracing, in the declared input order."""
    import torch

    args = []
    for t in inputs:
        if t.name not in feed:
            raise ExportError(f"{name}: example feed lacks input {t.name!r}")
        value = feed[t.name]
        args.append(value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value)))
    return tuple(args)


def dynamic_axes(specs: Sequence["TensorSpec"]) -> dict[str, dict[int, str]]:
    """torch.onnx.export's dynamic_axes for the declared symbolic dimensions (a str dim, e.g. text_length)."""
    return {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)} for t in specs
            if any(isinstance(d, str) for d in t.shape)}


def onnx_from_module(module: "torch.nn.Module", path: str | Path, inputs: Sequence["TensorSpec"],
                     outputs: Sequence["TensorSpec"], args: Sequence["torch.Tensor"], *, name: str,
                     opset: int = OPSET, simplify: bool = True, step: Callable[[str], None] = _quiet,
                     log: Log = _quiet) -> list[Path]:
    """Export a module to an ONNX graph at `path` with the declared inputs/outputs (static shapes except declared
    symbolic dimensions), checked and shape-inferred. `step(what)` is called after each phase (trace, simplify,
    check) for progress. Returns the written files (graph first, then its external data if any). Raises ExportError
    naming the graph when tracing, the checker, shape inference or the declaration disagree."""
    import onnx
    import torch

    if opset < 18:
        raise ExportError(f"opset {opset} is too old: LayerNormalization/Resize semantics need opset >= 18")
    path = Path(path)
    scratch = path.parent / f".{path.stem}.export"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    raw = scratch / "raw.onnx"
    try:
        start = time.perf_counter()
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")  # TracerWarnings on shape asserts, and the exporter's deprecation notes
            try:
                torch.onnx.export(module.eval(), tuple(args), str(raw), input_names=[t.name for t in inputs],
                                  output_names=[t.name for t in outputs], opset_version=opset, dynamo=False,
                                  do_constant_folding=True, dynamic_axes=dynamic_axes([*inputs, *outputs]) or None)
            except Exception as exc:
                raise ExportError(f"{name}: torch.onnx.export failed: {type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
        log(f"{name}: traced in {time.perf_counter() - start:.1f} s")
        step("trace")
        model = onnx.load(str(raw))  # pulls in the per-tensor files the exporter writes for >2 GB graphs
        shutil.rmtree(scratch, ignore_errors=True)
        if simplify and _weights_bytes(model) < SIMPLIFY_LIMIT:
            model = _simplify(model, name, log)
        step("simplify")
        files = save_model(model, path)
        del model
        check_graph(path, inputs, outputs, name)
        step("check")
        return files
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def onnx_from_component(spec: "ComponentSpec", module: "torch.nn.Module", cfg: "MoVAConfig", path: str | Path, *,
                        feed: dict[str, Any] | None = None, opset: int = OPSET, simplify: bool = True,
                        log: Log = _quiet) -> list[Path]:
    """onnx_from_module with the component's declared I/O, traced on `feed` (default: its seed-0 sample inputs)."""
    if feed is None:
        if spec.sample_inputs is None:
            raise ExportError(f"component {spec.name!r} declares no sample_inputs; cannot trace it")
        feed = spec.sample_inputs(cfg, 0)
    inputs = spec.inputs(cfg)
    return onnx_from_module(module, path, inputs, spec.outputs(cfg), example_args(inputs, feed, spec.name),
                            name=spec.name, opset=opset, simplify=simplify, log=log)


def _simplify(model: "onnx.ModelProto", name: str, log: Log) -> "onnx.ModelProto":
    """onnxslim: constant folding, shape-arithmetic elimination, dead nodes (no graph surgery of our own)."""
    try:
        import onnxslim
    except ImportError:  # optional: graphs are valid without it, only larger
        log(f"{name}: onnxslim not installed; graph left unsimplified")
        return model
    before = len(model.graph.node)
    with warnings.catch_warnings(), contextlib.redirect_stdout(None):
        warnings.simplefilter("ignore")
        slim = onnxslim.slim(model)
    log(f"{name}: onnxslim {before} -> {len(slim.graph.node)} nodes")
    return slim


# ---------------------------------------------------------------------------------------------------------------
# checks

def check_graph(path: Path, inputs: Sequence["TensorSpec"], outputs: Sequence["TensorSpec"], name: str) -> None:
    """onnx.checker (full, path-based so >2 GB works), shape inference in place, then the declaration check:
    input/output names in order, static shapes equal to the spec, dtypes; no data-dependent control flow."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
        onnx.shape_inference.infer_shapes_path(str(path), str(path), strict_mode=True, data_prop=True)
    except Exception as exc:  # onnx raises ValidationError / InferenceError
        raise ExportError(f"{name}: {path.name} fails the ONNX checker or shape inference: "
                          f"{str(exc).splitlines()[0]}") from None
    model = onnx.load(str(path), load_external_data=False)
    dynamic = sorted({n.op_type for n in model.graph.node if n.op_type in DYNAMIC_OPS})
    if dynamic:
        raise ExportError(f"{name}: graph has data-dependent ops {dynamic}; a static export must not")
    problems = []
    for kind, declared, actual in (("input", inputs, _graph_inputs(model)), ("output", outputs, model.graph.output)):
        got = [(v.name, *_value_shape_dtype(v)) for v in actual]
        want = [(t.name, tuple(t.shape), t.dtype) for t in declared]
        if got != want:
            problems.append(f"{kind}s are {_fmt(got)}, the spec declares {_fmt(want)}")
    if problems:
        raise ExportError(f"{name}: exported graph does not match its declaration: {'; '.join(problems)}")


def _graph_inputs(model: "onnx.ModelProto") -> list:
    inits = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in inits]


def _value_shape_dtype(value: Any) -> tuple[tuple, str]:
    import onnx

    tensor = value.type.tensor_type
    dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim)
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)).name if tensor.elem_type else "?"
    return dims, dtype


def _fmt(items: list[tuple]) -> str:
    return "[" + ", ".join(f"{n}{list(s)}:{d}" for n, s, d in items) + "]"


# ---------------------------------------------------------------------------------------------------------------
# fp32 -> fp16

def _toposorted(model: "onnx.ModelProto") -> "onnx.ModelProto":
    """The float16 converter appends its Cast nodes at the end; onnx_ir puts the graph back in topological order."""
    import onnx_ir as ir

    graph = ir.from_proto(model)
    graph.graph.sort()
    return ir.to_proto(graph)


def fp16_block_nodes(model: "onnx.ModelProto") -> list[str]:
    return [n.name for n in model.graph.node if n.op_type in _NORM_SCOPE_OPS and _NORM_SCOPE.search(n.name or "")]


def fp16_from_onnx(src: Path, dst: Path, inputs: Sequence["TensorSpec"], outputs: Sequence["TensorSpec"],
                   name: str, log: Log = _quiet) -> list[Path]:
    """fp16 variant of a checked fp32 graph: onnxruntime.transformers.float16 with fp32 graph inputs/outputs
    (keep_io_types) and the FP32_OPS / norm-scope nodes blocked, so they run in fp32 between casts."""
    import onnx
    from onnxruntime.transformers import float16

    model = onnx.load(str(src))
    large = _too_large(model)
    block_nodes = fp16_block_nodes(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the model contains values clamped to the fp16 range" (the -1e6 logits)
        half = float16.convert_float_to_float16(
            model, keep_io_types=True, disable_shape_infer=large,
            op_block_list=list(float16.DEFAULT_OP_BLOCK_LIST) + list(FP32_OPS), node_block_list=block_nodes)
    del model
    half = _toposorted(half)
    log(f"{name}: fp16 with {len(block_nodes)} norm nodes and ops {', '.join(FP32_OPS)} kept in fp32")
    files = save_model(half, dst)
    del half
    check_graph(dst, inputs, outputs, name)
    return files

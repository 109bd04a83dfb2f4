"""Explicit Q/DQ graphs (INT8, FP8 E4M3) from checked fp32 graphs, their accuracy on held-out feeds, and the budget.

Loaders in the Polygraphy style:

- `qdq_from_onnx(src, dst, precision, calibration)`: an explicit Q/DQ graph for TensorRT. Only weight-bearing
  MatMul/Gemm/Conv nodes are quantized (the layers TensorRT runs in INT8/FP8), on their inputs only: per-tensor
  symmetric activations, per-output-channel symmetric weights, Convs only where TensorRT has kernels for them
  (`conv_quantizable`, ModelOpt's rule). Outputs stay in the base precision, so Resize, LayerNormalization,
  Softmax, decomposed norms (export.FP32_OPS, export.fp16_block_nodes) are fp32 islands with no Q/DQ on their inputs.
  The base (`QDQ_BASE` per runtime) is fp16 for TensorRT, whose strongly typed builds run everything outside the
  Q/DQ pairs in the graph's type, and fp32 for ONNX Runtime CPU, whose integer kernels want fp32 scales.
  * INT8, backend "onnxruntime": `quant_pre_process` + `quantize_static` (QDQ, QInt8/QInt8, per-channel,
    ActivationSymmetric, no bias or output quantization).
  * FP8, backend "onnxruntime": onnxruntime's float8 path accepts only its Distribution calibrator (MinMax is refused:
    "Only Distribution calibration method is supported for float quantization"; the Distribution one failed on the
    tiny CLIP, shared/notes/onnx-quant.md), so the FP8 graph is written here with standard ONNX ops at opset 19:
    QuantizeLinear/DequantizeLinear pairs with FLOAT8E4M3FN zero points before the activation input (scale = amax/448
    from calibration; "percentile" uses the 99.999th percentile of |x|), weights stored as FLOAT8E4M3FN initializers
    with a per-channel DequantizeLinear (scale = channel amax/448), on the same nodes INT8 would quantize.
  * backend "modelopt": nvidia-modelopt's `modelopt.onnx.quantization.quantize` (optional extra, imported lazily;
    "auto" uses it when importable, onnxruntime otherwise). Not exercised on this CPU machine.
- `simulate_fp8(qdq, dst)`: an fp32 twin of any float8 Q/DQ graph, for parity where float8 kernels are missing
  (see its docstring for what it covers). ONNX Runtime CPU 1.32 does run our FP8 graphs, so parity is measured by
  running the Q/DQ graph ("ort") whenever it loads and runs, and by the simulation ("simulated-fp8") otherwise.
- `accuracy_check(fp32, candidate, held_out)`: a validate.ParityReport over held-out feeds.
- `quantize_with_budget(...)`: quantize, measure, exclude the most error-adding nodes (bounded tries), fall back to
  fp16 (export.fp16_from_onnx), and return a JSON-serialisable decision for the manifest.
- `split_feeds`, `load_calibration`: calibration / held-out feeds (bundle calibration/<component>.npz).
"""
from __future__ import annotations

import contextlib
import io
import inspect
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from .errors import ExportError
from .export.onnx import FP32_OPS, _too_large, _toposorted, fp16_block_nodes, fp16_from_onnx, save_model
from .validate import Parity, ParityReport, Tolerance, parity, worst

if TYPE_CHECKING:  # pragma: no cover
    import onnx

Log = Callable[[str], None]
Feed = Mapping[str, np.ndarray]

PRECISIONS = ("int8", "fp8")
METHODS = ("minmax", "entropy", "percentile")
BACKENDS = ("auto", "onnxruntime", "modelopt")
# Layers TensorRT runs in INT8/FP8 with Q/DQ on their inputs; only nodes with a constant weight (input 1) qualify,
# so attention's activation x activation MatMuls stay in the float precision the engine picks.
QUANT_OP_TYPES = ("Conv", "MatMul", "Gemm")
DEFAULT_FP32_OPS = tuple(FP32_OPS)
FP8_MAX = 448.0                      # largest finite float8 E4M3FN value
FP8_OPSET = 19                       # first opset with float8 QuantizeLinear/DequantizeLinear
PERCENTILE = 99.999
BASES = ("fp32", "fp16")
# The float precision around the Q/DQ pairs, per runtime (recipe.runtime). Strongly typed TensorRT (11.x, RTX, FP8
# builds) runs every op outside the pairs in the graph's own type: an fp32 base leaves ~78% of the compute layers of
# a tiny CLIP fp32 against 14% on an fp16 base. ONNX Runtime CPU fuses fp32-base Q/DQ into integer kernels: the
# same tiny CLIP ran 22.5 ms fp32-base INT8 against 32.7 ms fp16-base (p50, 2 threads), so the cpu target keeps fp32.
QDQ_BASE = {"tensorrt": "fp16", "onnxruntime-cpu": "fp32"}
FP16_QDQ_OPSET = 19                  # first opset with float16 scales on QuantizeLinear/DequantizeLinear


def _quiet(_: str) -> None:
    pass


# ---------------------------------------------------------------------------------------------------------------
# results

@dataclass
class QuantResult:
    """One Q/DQ graph: what was quantized, how, and how its parity is to be measured on this machine."""
    path: Path
    files: list[Path]
    precision: str
    backend: str                      # "onnxruntime" | "onnx-qdq" (our FP8 writer) | "modelopt"
    method: str
    quantized_nodes: list[str]
    excluded_nodes: list[str]         # asked-for exclusions among the quantizable nodes
    fp32_islands: list[str]           # FP32_OPS / norm-scope nodes (never quantized)
    num_q: int
    num_dq: int
    opset: int
    calibration_samples: int
    parity_method: str                # "ort": the Q/DQ graph runs in ONNX Runtime; "simulated-fp8": simulate_fp8
    seconds: float
    base: str = "fp32"                # float precision outside the quantized ops (QDQ_BASE)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["path"] = str(self.path)
        out["files"] = [str(f) for f in self.files]
        out["fp32_islands"] = len(self.fp32_islands)
        return out


@dataclass
class QuantDecision:
    """What `quantize_with_budget` shipped and why; `to_json()` goes into the manifest."""
    component: str
    requested: str
    final: str                        # "<precision>" | "<precision>-partial" | "fp16"
    path: Path
    excluded_nodes: list[str]
    measured: dict[str, float]        # worst over outputs and held-out feeds, of the shipped graph
    budget: dict[str, float | None]
    budget_met: bool
    tries: int                        # quantization attempts (the fp16 fallback is not counted)
    parity_method: str                # how the shipped graph's figures were measured ("ort" | "simulated-fp8")
    calibration: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["path"] = str(self.path)
        return out


# ---------------------------------------------------------------------------------------------------------------
# feeds

def split_feeds(feeds: Sequence[Feed], held_out: float | int = 0.25) -> tuple[list[dict], list[dict]]:
    """Deterministic split into (calibration, held_out): `held_out` is a count (int >= 1) or a fraction in (0, 1)
    (at least one feed). Held-out feeds are spread evenly over the sequence (3 feeds -> the middle one is held out);
    at least one feed is left to calibrate on."""
    feeds = [dict(f) for f in feeds]
    n = len(feeds)
    if n < 2:
        raise ExportError(f"split_feeds needs at least 2 feeds (1 to calibrate, 1 to hold out), got {n}; "
                          "add calibration images or calibrate and measure on the same feeds without a split")
    if isinstance(held_out, bool) or not isinstance(held_out, (int, float)):
        raise ExportError(f"held_out must be a count or a fraction, got {held_out!r}")
    if isinstance(held_out, float) and not isinstance(held_out, int):
        if not 0.0 < held_out < 1.0:
            raise ExportError(f"held_out fraction {held_out} is outside (0, 1); pass e.g. 0.25 or a count")
        k = max(1, round(n * held_out))
    else:
        k = int(held_out)
    if not 1 <= k <= n - 1:
        raise ExportError(f"held_out={held_out} leaves {n - k} of {n} feeds to calibrate on; hold out 1..{n - 1}")
    picked = sorted({(2 * i + 1) * n // (2 * k) for i in range(k)})
    return [f for i, f in enumerate(feeds) if i not in picked], [feeds[i] for i in picked]


def _check_feeds(feeds: Sequence[Feed], inputs: Sequence[str], what: str, src: Path) -> list[dict[str, np.ndarray]]:
    feeds = list(feeds)
    if not feeds:
        raise ExportError(f"{what} feeds for {src.name} are empty; pass at least one real-image feed "
                          "(bundle calibration/<component>.npz)")
    out = []
    for i, feed in enumerate(feeds):
        if not isinstance(feed, Mapping):
            raise ExportError(f"{what} feed {i} for {src.name} is a {type(feed).__name__}, expected a dict of arrays")
        missing, extra = sorted(set(inputs) - set(feed)), sorted(set(feed) - set(inputs))
        if missing or extra:
            raise ExportError(f"{what} feed {i} for {src.name} has wrong inputs (missing {missing}, unexpected "
                              f"{extra}); the graph takes {list(inputs)}")
        out.append({k: np.ascontiguousarray(feed[k]) for k in inputs})
    return out


# ---------------------------------------------------------------------------------------------------------------
# node selection

def _initializers(model: "onnx.ModelProto") -> dict[str, "onnx.TensorProto"]:
    return {t.name: t for t in model.graph.initializer}


def _graph_input_names(model: "onnx.ModelProto") -> list[str]:
    inits = {t.name for t in model.graph.initializer}
    return [v.name for v in model.graph.input if v.name not in inits]


def _name_nodes(model: "onnx.ModelProto") -> None:
    """Nodes need unique names: exclusion lists and the sensitivity ranking refer to them."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.name or node.op_type}_q{i}"
        seen.add(node.name)


def conv_quantizable(precision: str, weight_dims: Sequence[int], group: int, reads_graph_input: bool) -> bool:
    """Whether TensorRT has fast INT8/FP8 kernels for a Conv, by ModelOpt's rule (NVIDIA/Model-Optimizer,
    modelopt/onnx/quantization/graph_utils.py, find_nodes_from_convs_to_exclude): input and output channels >= 16,
    except INT8 convs with channels % 8 == 0 and a square kernel that read the graph input or have one side >= 16
    (grouped: output channels % 8 and kernels >= 3); FP8 also needs kernel area <= 32 and both channel counts > 16.
    So FP8 leaves a ViT's 3-channel 14x14 patch embedding in the float base; INT8 keeps it."""
    out_ch, in_ch, kernel = weight_dims[0], weight_dims[1], tuple(weight_dims[2:]) or (1,)
    if out_ch < 16 or in_ch < 16:
        if precision != "int8":
            return False
        if group == 1:
            return ((out_ch % 8 == 0 or in_ch % 8 == 0) and (reads_graph_input or max(out_ch, in_ch) >= 16)
                    and len(set(kernel)) == 1)
        return out_ch % 8 == 0 and all(k >= 3 for k in kernel)
    if precision == "fp8":
        return math.prod(kernel) <= 32 and out_ch > 16 and in_ch > 16
    return True


def select_nodes(model: "onnx.ModelProto", *, exclude_nodes: Sequence[str] = (),
                 exclude_op_types: Sequence[str] = DEFAULT_FP32_OPS,
                 op_types: Sequence[str] = QUANT_OP_TYPES, precision: str = "int8") -> tuple[list[str], list[str]]:
    """(nodes to quantize, float islands). A node is quantized when its op type is in `op_types` and not in
    `exclude_op_types`, its input 1 is an fp32 initializer (a weight), it is neither in `exclude_nodes` nor in a
    norm scope (export.fp16_block_nodes), and a Conv passes `conv_quantizable` for `precision`. Islands: nodes of
    `exclude_op_types`, the norm-scope nodes and the convs TensorRT has no `precision` kernels for."""
    import onnx

    inits = _initializers(model)
    graph_inputs = set(_graph_input_names(model))
    unsupported = [n.name for n in model.graph.node if n.op_type == "Conv" and len(n.input) > 1
                   and n.input[1] in inits and not conv_quantizable(
                       precision, inits[n.input[1]].dims, next((a.i for a in n.attribute if a.name == "group"), 1),
                       n.input[0] in graph_inputs)]
    norm_nodes = set(fp16_block_nodes(model))
    blocked = norm_nodes | set(exclude_nodes) | set(unsupported)
    islands = [n.name for n in model.graph.node if n.op_type in exclude_op_types or n.name in norm_nodes] + unsupported
    chosen = []
    for node in model.graph.node:
        if node.op_type not in op_types or node.op_type in exclude_op_types or node.name in blocked:
            continue
        if len(node.input) < 2 or node.input[1] not in inits or node.input[0] in inits:
            continue
        if inits[node.input[1]].data_type != onnx.TensorProto.FLOAT:
            continue
        chosen.append(node.name)
    return chosen, islands


def _count_qdq(model: "onnx.ModelProto") -> tuple[int, int]:
    ops = [n.op_type for n in model.graph.node]
    return ops.count("QuantizeLinear"), ops.count("DequantizeLinear")


def _opset(model: "onnx.ModelProto") -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _at_least_opset(model: "onnx.ModelProto", opset: int, what: str) -> "onnx.ModelProto":
    """The model converted up to `opset` where it is older (what: the graph and the reason, for the error)."""
    from onnx import version_converter

    if _opset(model) >= opset:
        return model
    try:
        return version_converter.convert_version(model, opset)
    except Exception as exc:
        raise ExportError(f"cannot convert {what} to opset {opset}: {str(exc).splitlines()[0]}; export at opset "
                          f">= {opset}") from None


# ---------------------------------------------------------------------------------------------------------------
# Q/DQ graphs

def qdq_from_onnx(src: str | Path, dst: str | Path, precision: str, calibration: Sequence[Feed], *,
                  method: str = "minmax", exclude_nodes: Sequence[str] = (),
                  exclude_op_types: Sequence[str] = DEFAULT_FP32_OPS, op_types: Sequence[str] = QUANT_OP_TYPES,
                  backend: str = "auto", base: str = "fp32", log: Log = _quiet) -> QuantResult:
    """Explicit Q/DQ graph at `dst` from the fp32 graph `src`, calibrated on `calibration` (feeds: input -> array).

    `base` is the float precision outside the quantized ops (QDQ_BASE per runtime). Calibration always runs on the
    fp32 graph (onnxruntime's calibrators and our amax probe read fp32 tensors); with base "fp16" the finished Q/DQ
    graph is then converted like export.fp16_from_onnx (same fp32 blocks: FP32_OPS and the norm scopes stay fp32
    between casts) with fp16 scales, at opset 19.

    Raises ExportError on a missing graph, empty or mismatched feeds, an unknown precision/method/backend, nothing
    left to quantize, or a result that fails the ONNX checker."""
    import onnx

    src, dst = Path(src), Path(dst)
    if precision not in PRECISIONS:
        raise ExportError(f"unknown quantization precision {precision!r}; use one of {list(PRECISIONS)} "
                          "(fp16 comes from export.fp16_from_onnx)")
    if method not in METHODS:
        raise ExportError(f"unknown calibration method {method!r}; use one of {list(METHODS)}")
    if backend not in BACKENDS:
        raise ExportError(f"unknown quantization backend {backend!r}; use one of {list(BACKENDS)}")
    if base not in BASES:
        raise ExportError(f"unknown Q/DQ base precision {base!r}; use one of {list(BASES)}")
    if not src.is_file():
        raise ExportError(f"fp32 graph {src} not found; export the component first (export.onnx_from_component)")
    if src.resolve() == dst.resolve():
        raise ExportError(f"quantizing {src.name} would overwrite it; pass another dst")
    model = onnx.load(str(src))
    feeds = _check_feeds(calibration, _graph_input_names(model), "calibration", src)
    if backend == "auto":
        backend = "modelopt" if _modelopt() is not None else "onnxruntime"
    start = time.perf_counter()
    dst.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{dst.stem}.", dir=dst.parent))
    try:
        _name_nodes(model)
        chosen, islands = select_nodes(model, exclude_nodes=exclude_nodes, exclude_op_types=exclude_op_types,
                                       op_types=op_types, precision=precision)
        unknown = sorted(set(exclude_nodes) - {n.name for n in model.graph.node})
        if unknown:
            log(f"{src.name}: exclude_nodes not in the graph (ignored): {unknown[:5]}")
        if not chosen:
            raise ExportError(f"{src.name}: no {'/'.join(op_types)} node with a weight is left to quantize "
                              f"({len(exclude_nodes)} excluded); ship the fp16 graph instead")
        excluded = sorted(set(exclude_nodes) & {n.name for n in model.graph.node})
        if backend == "modelopt":
            out, producer = _modelopt_qdq(src, scratch, precision, feeds, method, excluded, islands, op_types)
        elif precision == "int8":
            out, producer = _ort_int8(model, scratch, feeds, method, chosen, islands, op_types, log), "onnxruntime"
        else:
            out, producer = _fp8_qdq(model, feeds, method, chosen, log), "onnx-qdq"
        del model
        if base == "fp16":
            out = _on_fp16_base(out, log)
        try:
            if not _too_large(out):  # a >2 GB graph is checked from its file below
                onnx.checker.check_model(out, full_check=True)
        except Exception as exc:  # onnx.checker.ValidationError, shape inference errors
            raise ExportError(f"{src.name}: the {precision} Q/DQ graph fails the ONNX checker: "
                              f"{str(exc).splitlines()[0]}") from None
        num_q, num_dq = _count_qdq(out)
        opset = _opset(out)
        files = save_model(out, dst)
        if _too_large(out):
            onnx.checker.check_model(str(dst), full_check=True)
        del out
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    method_ran = _ort_runs(dst, feeds[0])
    parity_method = "ort" if method_ran else "simulated-fp8"
    if not method_ran and precision == "int8":
        raise ExportError(f"{dst.name}: ONNX Runtime CPU cannot run the INT8 Q/DQ graph; it is not valid to ship")
    seconds = time.perf_counter() - start
    log(f"{src.name} -> {dst.name}: {precision} on an {base} base ({producer}, {method}) {len(chosen)} nodes "
        f"quantized, {len(excluded)} excluded, {num_q} Q / {num_dq} DQ, opset {opset}, parity by {parity_method}, "
        f"{seconds:.1f} s")
    return QuantResult(dst, files, precision, producer, method, chosen, excluded, islands, num_q, num_dq, opset,
                       len(feeds), parity_method, seconds, base)


def _on_fp16_base(model: "onnx.ModelProto", log: Log) -> "onnx.ModelProto":
    """A Q/DQ graph with fp16 activations and fp16 scales outside the quantized ops (the route NVIDIA's ModelOpt
    takes for strongly typed TensorRT); FP32_OPS and norm-scope nodes stay fp32 between casts, graph inputs and
    outputs stay fp32."""
    from onnxruntime.transformers import float16

    model = _at_least_opset(model, FP16_QDQ_OPSET, "the Q/DQ graph (for fp16 scales)")
    blocked = fp16_block_nodes(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # values clamped to the fp16 range (the -1e6 gate logits)
        half = float16.convert_float_to_float16(
            model, keep_io_types=True, disable_shape_infer=_too_large(model),
            op_block_list=list(float16.DEFAULT_OP_BLOCK_LIST) + list(FP32_OPS), node_block_list=blocked)
    log(f"fp16 base: {len(blocked)} norm nodes and ops {', '.join(FP32_OPS)} kept in fp32")
    return _toposorted(half)


class _Reader:
    """onnxruntime CalibrationDataReader over in-memory feeds (duck-typed: get_next / rewind)."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]):
        self.feeds = list(feeds)
        self.i = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= len(self.feeds):
            return None
        self.i += 1
        return self.feeds[self.i - 1]

    def rewind(self) -> None:
        self.i = 0


def _ort_int8(model: "onnx.ModelProto", scratch: Path, feeds: list[dict], method: str, chosen: list[str],
              islands: list[str], op_types: Sequence[str], log: Log) -> "onnx.ModelProto":
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    large = _too_large(model)
    named = scratch.absolute() / "named.onnx"
    save_model(model, named)
    pre = scratch.absolute() / "pre.onnx"
    try:  # shape inference only: ORT's graph optimizations would rename nodes (MatMul+Add -> Gemm) and add reshapes
        with _silenced(), _working_dir(scratch):
            quant_pre_process(str(named), str(pre), skip_optimization=True, save_as_external_data=large,
                              all_tensors_to_one_file=True)
    except Exception as exc:  # symbolic shape inference gives up on some graphs; the exported one is shape-inferred
        log(f"quant_pre_process failed ({type(exc).__name__}: {str(exc)[:120]}); quantizing the graph as exported")
        pre = named

    class Reader(_Reader, CalibrationDataReader):
        pass

    calib = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
             "percentile": CalibrationMethod.Percentile}[method]
    out = scratch / "int8.onnx"
    cached: dict[str, str] = {}
    if "calibration_cache_path" in inspect.signature(quantize_static).parameters:   # onnxruntime >= 1.24
        cached["calibration_cache_path"] = str(_calibration_cache(pre, scratch, feeds, calib, chosen, op_types,
                                                                  large, log))
    with _silenced():
        quantize_static(str(pre), str(out), Reader(feeds), **cached, quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(op_types), per_channel=True, reduce_range=False,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, nodes_to_quantize=chosen,
                        nodes_to_exclude=islands, use_external_data_format=large, calibrate_method=calib,
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
                                       "OpTypesToExcludeOutputQuantization": list(op_types),
                                       "CalibPercentile": PERCENTILE, "CalibTensorRangeSymmetric": True})
    result = onnx.load(str(out))
    rewired = _fp32_consumers_skip_qdq(result, set(chosen))
    if rewired:
        log(f"int8: {rewired} input(s) of fp32 nodes (norms, softmax, residual adds) that share a tensor with a "
            "quantized layer now read the tensor itself: onnxruntime had given them its int8-rounded copy")
    return result


def _calibration_cache(model_path: Path, scratch: Path, feeds: Sequence[dict[str, np.ndarray]], calibrate_method: Any,
                       chosen: Sequence[str], op_types: Sequence[str], large: bool, log: Log = _quiet) -> Path:
    """onnxruntime's activation ranges for exactly the tensors the chosen nodes read and write, one feed at a time,
    written as its calibration cache (quantize_static then skips its own calibration).

    quantize_static's calibrator keeps every input and output of every node of the quantized op types for every feed
    at once: at full size that includes the base encoder's attention MatMuls (16 x 2304 x 2304 scores, 340 MB each,
    two per layer), which took a full build's RSS past 23 GB and into the OOM killer. The same calibrator classes
    with the tensor selection narrowed to the chosen nodes, fed one sample per call (the histogram collector and
    the min/max ranges merge across calls), keep one sample of the tensors that get Q/DQ.
    """
    from onnxruntime.quantization import calibrate

    classes = {calibrate.CalibrationMethod.MinMax: (calibrate.MinMaxCalibrater, {}),
               calibrate.CalibrationMethod.Entropy: (calibrate.EntropyCalibrater,
                                                     {"num_bins": 128, "num_quantized_bins": 128}),
               calibrate.CalibrationMethod.Percentile: (calibrate.PercentileCalibrater,
                                                        {"num_bins": 2048, "percentile": PERCENTILE})}
    base, options = classes[calibrate_method]   # quantize_static's defaults for each, symmetric as we pass it
    wanted = set(chosen)

    class NarrowCalibrater(base):  # type: ignore[misc, valid-type]
        def select_tensors_to_calibrate(self, model: Any) -> Any:
            tensors, infos = super().select_tensors_to_calibrate(model)
            used = {t for node in model.graph.node if node.name in wanted for t in (*node.input, *node.output)}
            return tensors & used, infos

    with _silenced():
        calibrator = NarrowCalibrater(str(model_path), list(op_types),
                                      augmented_model_path=str(scratch.absolute() / "augmented.onnx"),
                                      use_external_data_format=large, symmetric=True, **options)
        calibrator.augment_graph()
        calibrator.create_inference_session()
    start = time.perf_counter()
    for i, feed in enumerate(feeds, 1):
        with _silenced():
            calibrator.collect_data(_Reader([feed]))
        log(f"int8 calibration: batch {i}/{len(feeds)} ({time.perf_counter() - start:.1f} s)")
    path = scratch / "calibration.json"
    with _silenced():
        calibrate.save_tensors_data(calibrator.compute_data(), path)
    del calibrator
    return path


@contextlib.contextmanager
def _working_dir(folder: Path) -> Any:
    """Run inside `folder`: onnxruntime's symbolic shape inference, when it gives up (the text encoder's symbolic
    length), dumps sym_shape_infer_temp.onnx and a <uuid>.data file into the working directory before raising."""
    previous = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


@contextlib.contextmanager
def _silenced() -> Any:
    """onnxruntime's calibrators report progress with print, tqdm (stderr) and the logging module ("Number of
    histogram bins : 128 ...", "Please consider to run pre-processing before quantization"); none of it says anything
    our own log line does not, so it is dropped: nothing from the library reaches the console."""
    previous = logging.root.manager.disable
    sink = io.StringIO()
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def _fp32_consumers_skip_qdq(model: "onnx.ModelProto", chosen: set[str]) -> int:
    """onnxruntime's QDQ quantizer hands the DQ output of a quantized tensor to every consumer, so a LayerNorm or
    Softmax sharing an input with a quantized MatMul would read int8-rounded values. Point such inputs (and graph
    outputs) back at the tensor before its QuantizeLinear; returns how many inputs were rewired."""
    producer = {o: n for n in model.graph.node for o in n.output}
    source = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in producer \
                and producer[node.input[0]].op_type == "QuantizeLinear":
            source[node.output[0]] = producer[node.input[0]].input[0]
    count = 0
    for node in model.graph.node:
        if node.name in chosen or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for i, name in enumerate(node.input):
            if name in source:
                node.input[i] = source[name]
                count += 1
    return count


# ---- FP8 ------------------------------------------------------------------------------------------------------

def _weight_axis(node: "onnx.NodeProto", rank: int) -> int:
    """The output-channel axis of a node's weight (input 1): Conv [O, I, ...] -> 0; MatMul [..., K, N] -> last;
    Gemm B [K, N] -> 1, or 0 with transB."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return rank - 1


def to_fp8(values: np.ndarray, scale: np.ndarray | float) -> np.ndarray:
    """values / scale saturated to +-448 and rounded (nearest even) to float8 E4M3FN, as QuantizeLinear-19 does."""
    import ml_dtypes

    scaled = np.asarray(values, np.float32) / np.asarray(scale, np.float32)
    return np.clip(scaled, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)


def _amax(model: "onnx.ModelProto", names: list[str], feeds: list[dict], method: str) -> dict[str, float]:
    """Per-tensor calibration range of intermediate tensors: max |x| ("minmax") or the 99.999th percentile of |x|
    ("percentile") over all feeds, from one ONNX Runtime session of the fp32 graph with the tensors as outputs."""
    import onnx

    if method == "entropy":
        raise ExportError("FP8 calibration supports 'minmax' and 'percentile' (amax/448 scales), not 'entropy'")
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                              for n in names if n not in present)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "probe.onnx"
        save_model(probe, path)
        del probe
        session = ort_session(path)
        ranges: dict[str, list[np.ndarray]] = {n: [] for n in names}
        for feed in feeds:
            for n, value in zip(names, session.run(names, feed)):
                a = np.abs(np.asarray(value, np.float32)).ravel()
                ranges[n].append(a if method == "percentile" else np.array([a.max() if a.size else 0.0]))
        del session
    return {n: float(np.percentile(np.concatenate(v), PERCENTILE) if method == "percentile"
                     else np.max(np.concatenate(v))) for n, v in ranges.items()}


def _fp8_qdq(model: "onnx.ModelProto", feeds: list[dict], method: str, chosen: list[str],
             log: Log) -> "onnx.ModelProto":
    """Insert FP8 E4M3 Q/DQ before the activation input of each chosen node and store its weight as float8 with a
    per-channel DequantizeLinear. The graph is converted to opset 19 first (float8 Q/DQ)."""
    import onnx
    from onnx import helper, numpy_helper

    model = _at_least_opset(model, FP8_OPSET, "the graph (for float8 Q/DQ)")
    graph = model.graph
    inits = _initializers(model)
    by_name = {n.name: n for n in graph.node}
    nodes = [by_name[name] for name in chosen]
    acts = list(dict.fromkeys(n.input[0] for n in nodes))
    amax = _amax(model, acts, feeds, method)
    fp8 = onnx.TensorProto.FLOAT8E4M3FN
    new_inits: list[onnx.TensorProto] = []
    head: list[onnx.NodeProto] = []       # weight DequantizeLinear nodes (inputs are all initializers)
    act_qdq: dict[str, tuple[str, list[onnx.NodeProto]]] = {}
    weight_dq: dict[str, str] = {}
    for x in acts:
        scale = amax[x] / FP8_MAX if amax[x] > 0 and math.isfinite(amax[x]) else 1.0
        base = _safe(x)
        new_inits += [numpy_helper.from_array(np.array(scale, np.float32), f"{base}_fp8_scale"),
                      helper.make_tensor(f"{base}_fp8_zp", fp8, [], [0])]
        q = helper.make_node("QuantizeLinear", [x, f"{base}_fp8_scale", f"{base}_fp8_zp"], [f"{base}_fp8"],
                             name=f"{base}_QuantizeLinear_fp8")
        dq = helper.make_node("DequantizeLinear", [f"{base}_fp8", f"{base}_fp8_scale", f"{base}_fp8_zp"],
                              [f"{base}_fp8_dq"], name=f"{base}_DequantizeLinear_fp8")
        act_qdq[x] = (f"{base}_fp8_dq", [q, dq])
    for node in nodes:
        w = node.input[1]
        if w in weight_dq:
            continue
        values = numpy_helper.to_array(inits[w]).astype(np.float32)
        axis = _weight_axis(node, values.ndim)
        others = tuple(i for i in range(values.ndim) if i != axis)
        ch_amax = np.abs(values).max(axis=others) if others else np.abs(values)
        scale = np.where(ch_amax > 0, ch_amax / FP8_MAX, 1.0).astype(np.float32)
        shape = [1] * values.ndim
        shape[axis] = -1
        base = _safe(w)
        new_inits += [numpy_helper.from_array(to_fp8(values, scale.reshape(shape)), f"{base}_fp8"),
                      numpy_helper.from_array(scale, f"{base}_fp8_scale"),
                      helper.make_tensor(f"{base}_fp8_zp", fp8, [scale.size], [0] * scale.size)]
        head.append(helper.make_node("DequantizeLinear", [f"{base}_fp8", f"{base}_fp8_scale", f"{base}_fp8_zp"],
                                     [f"{base}_fp8_dq"], name=f"{base}_DequantizeLinear_fp8", axis=axis))
        weight_dq[w] = f"{base}_fp8_dq"
    chosen_set = set(chosen)
    ordered: list[onnx.NodeProto] = list(head)
    emitted: set[str] = set()
    for node in graph.node:
        if node.name in chosen_set:
            x = node.input[0]
            if x not in emitted:
                ordered += act_qdq[x][1]
                emitted.add(x)
            node.input[0] = act_qdq[x][0]
            node.input[1] = weight_dq[node.input[1]]
        ordered.append(node)
    still_used = {i for n in ordered for i in n.input} | {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name in still_used]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    graph_inputs = [v for v in graph.input if v.name not in inits or v.name in still_used]
    del graph.input[:]
    graph.input.extend(graph_inputs)
    del graph.node[:]
    graph.node.extend(ordered)
    log(f"fp8: {len(acts)} activation Q/DQ pairs, {len(weight_dq)} float8 weights (per-channel amax/{FP8_MAX:g})")
    return model


def _safe(name: str) -> str:
    return name.strip("/").replace("/", "_").replace(":", "_") or "t"


# ---- modelopt (optional) ---------------------------------------------------------------------------------------

def _modelopt() -> Any:
    try:
        from modelopt.onnx import quantization  # type: ignore[import-not-found]
    except Exception:  # not installed (the default here), or its onnxruntime-gpu clashes: treat as absent
        return None
    return quantization


def _modelopt_qdq(src: Path, scratch: Path, precision: str, feeds: list[dict], method: str, excluded: list[str],
                  islands: list[str], op_types: Sequence[str]) -> tuple["onnx.ModelProto", str]:
    import onnx

    mq = _modelopt()
    if mq is None:
        raise ExportError("backend 'modelopt' needs nvidia-modelopt, which is not importable here; install it on "
                          "the device (pip install 'mova-export[modelopt]') or use backend='onnxruntime'")
    if method == "percentile":
        raise ExportError("modelopt calibrates with 'minmax' (max) or 'entropy'; use one of those")
    out = scratch / f"modelopt.{precision}.onnx"
    data = {k: np.concatenate([f[k] for f in feeds], axis=0) for k in feeds[0]}
    mq.quantize(onnx_path=str(src), quantize_mode=precision, calibration_data=data,
                calibration_method={"minmax": "max", "entropy": "entropy"}[method], output_path=str(out),
                nodes_to_exclude=list(excluded) + list(islands), op_types_to_quantize=list(op_types),
                calibration_eps=["cpu"])
    return onnx.load(str(out)), "modelopt"


# ---------------------------------------------------------------------------------------------------------------
# FP8 simulation

def simulate_fp8(qdq: str | Path, dst: str | Path) -> Path:
    """An fp32 twin of a float8 Q/DQ graph, for parity where float8 kernels are missing (e.g. a Transpose on a float8
    tensor in ONNX Runtime CPU).

    What it covers: every FLOAT8E4M3FN tensor becomes an fp32 tensor holding exactly the same values. Float8
    initializers (the weights) are decoded with ml_dtypes; each QuantizeLinear with a float8 zero point becomes
    x / scale, saturated to +-448 and rounded to nearest-even on the E4M3 grid (3 mantissa bits, subnormal step 2^-9)
    with fp32 ops (Abs, Max, Log, Floor, Pow, Round); each such DequantizeLinear becomes code * scale. Ops between Q
    and DQ (Transpose, Reshape) then run on fp32 codes. Per-axis scales are supported on initializers and on tensors
    of known rank. Not covered: the engine's own arithmetic (TensorRT accumulates FP8 GEMMs in fp32/fp16 with its
    own kernels and fusions), int8 Q/DQ nodes (left as they are), non-zero float8 zero points."""
    import onnx
    from onnx import helper, numpy_helper

    qdq, dst = Path(qdq), Path(dst)
    if not qdq.is_file():
        raise ExportError(f"Q/DQ graph {qdq} not found")
    model = onnx.load(str(qdq))
    graph = model.graph
    fp8 = onnx.TensorProto.FLOAT8E4M3FN
    inits = _initializers(model)
    float8 = {n for n, t in inits.items() if t.data_type == fp8}
    ranks = _ranks(model)
    new_inits: dict[str, onnx.TensorProto] = {}
    for n in float8:
        new_inits[n] = numpy_helper.from_array(numpy_helper.to_array(inits[n]).astype(np.float32), n)
    consts = {k: helper.make_tensor(k, onnx.TensorProto.FLOAT, [], [v]) for k, v in
              (("fp8sim_max", FP8_MAX), ("fp8sim_min", -FP8_MAX), ("fp8sim_tiny", 2.0 ** -6),
               ("fp8sim_ln2", math.log(2.0)), ("fp8sim_two", 2.0), ("fp8sim_mbits", 3.0))}

    def is_fp8_qdq(node: onnx.NodeProto) -> bool:
        if len(node.input) >= 3 and node.input[2] in float8:
            return True
        return node.op_type == "DequantizeLinear" and node.input[0] in float8

    def scale_for(node: onnx.NodeProto, rank: int | None) -> str:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        s = node.input[1]
        if s not in inits:
            raise ExportError(f"simulate_fp8: scale {s!r} of {node.name} is not an initializer; unsupported")
        values = numpy_helper.to_array(inits[s]).astype(np.float32)
        if values.size == 1:
            return s
        if rank is None:
            raise ExportError(f"simulate_fp8: rank of {node.input[0]!r} ({node.name}) is unknown; cannot broadcast "
                              "its per-axis scale")
        shape = [1] * rank
        shape[axis % rank] = -1
        name = f"{s}_fp8sim_r{rank}a{axis % rank}"
        new_inits[name] = numpy_helper.from_array(values.reshape(shape), name)
        return name

    out_nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or not is_fp8_qdq(node):
            out_nodes.append(node)
            continue
        x, y = node.input[0], node.output[0]
        p = f"{_safe(node.name or y)}_fp8sim"
        rank = ranks.get(x)
        if x in inits:
            rank = len(inits[x].dims)
        s = scale_for(node, rank)
        if node.op_type == "DequantizeLinear":
            out_nodes.append(helper.make_node("Mul", [x, s], [y], name=p))
            continue
        out_nodes += [
            helper.make_node("Div", [x, s], [f"{p}_v"], name=f"{p}_div"),
            helper.make_node("Clip", [f"{p}_v", "fp8sim_min", "fp8sim_max"], [f"{p}_c"], name=f"{p}_clip"),
            helper.make_node("Abs", [f"{p}_c"], [f"{p}_a"], name=f"{p}_abs"),
            helper.make_node("Max", [f"{p}_a", "fp8sim_tiny"], [f"{p}_am"], name=f"{p}_max"),
            helper.make_node("Log", [f"{p}_am"], [f"{p}_ln"], name=f"{p}_log"),
            helper.make_node("Div", [f"{p}_ln", "fp8sim_ln2"], [f"{p}_l2"], name=f"{p}_log2"),
            helper.make_node("Floor", [f"{p}_l2"], [f"{p}_e"], name=f"{p}_floor"),
            helper.make_node("Sub", [f"{p}_e", "fp8sim_mbits"], [f"{p}_e3"], name=f"{p}_sub"),
            helper.make_node("Pow", ["fp8sim_two", f"{p}_e3"], [f"{p}_step"], name=f"{p}_pow"),
            helper.make_node("Div", [f"{p}_c", f"{p}_step"], [f"{p}_u"], name=f"{p}_units"),
            helper.make_node("Round", [f"{p}_u"], [f"{p}_r"], name=f"{p}_round"),
            helper.make_node("Mul", [f"{p}_r", f"{p}_step"], [y], name=f"{p}_code"),
        ]
    used = {i for n in out_nodes for i in n.input}
    kept = [new_inits.pop(t.name, t) for t in graph.initializer if t.name in used]
    kept += [t for t in new_inits.values() if t.name in used] + [t for k, t in consts.items() if k in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    del graph.node[:]
    graph.node.extend(out_nodes)
    value_info = [v for v in graph.value_info if v.type.tensor_type.elem_type != fp8]
    del graph.value_info[:]
    graph.value_info.extend(value_info)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, dst)
    return dst


def _ranks(model: "onnx.ModelProto") -> dict[str, int]:
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model) if not _too_large(model) else model
    except Exception:
        inferred = model
    g = inferred.graph
    return {v.name: len(v.type.tensor_type.shape.dim) for v in [*g.input, *g.value_info, *g.output]
            if v.type.tensor_type.HasField("shape")}


# ---------------------------------------------------------------------------------------------------------------
# accuracy

def ort_session(path: Path) -> Any:
    """ONNX Runtime CPU session that runs Q/DQ as written: QuantizeLinear / DequantizeLinear nodes and float math on
    the dequantized values (`session.disable_quant_qdq`), the semantics TensorRT implements. Without it ORT fuses
    Q/DQ pairs into integer kernels whose results depend on the CPU (x86 without AVX512-VNNI takes u8s8 paths that
    can saturate: a held-out cosine of 0.9817 there against 0.9999 on a VNNI machine for the same graph), so the
    accuracy figures would measure the CPU, not the graph."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.disable_quant_qdq", "1")
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


class OrtGraph:
    """A graph in `ort_session`, behind the runners' `infer(feed) -> outputs` interface."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.name = self.path.name
        self.session = ort_session(self.path)
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self.output_names = tuple(o.name for o in self.session.get_outputs())

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(list(self.output_names), dict(feed))))


def _ort_runs(path: Path, feed: dict[str, np.ndarray]) -> bool:
    """True when ONNX Runtime CPU loads the graph and runs one feed with finite outputs."""
    try:
        outs = ort_session(path).run(None, feed)
    except Exception:  # no CPU kernel for a float8 op, etc.
        return False
    return all(np.isfinite(np.asarray(o, np.float64)).all() for o in outs if np.issubdtype(o.dtype, np.floating))


def _runner(graph: Any) -> Any:
    return graph if hasattr(graph, "infer") else OrtGraph(Path(graph))


def accuracy_check(fp32: str | Path | Any, candidate: str | Path | Any, held_out: Sequence[Feed],
                   tolerance: Tolerance | None = None, *, component: str = "graph",
                   precision: str = "quantized") -> ParityReport:
    """Parity of `candidate` (a graph path or a runner) against the fp32 graph (path or runner) on each held-out feed:
    max abs, rel L2 and cosine per output (validate.parity). Graph paths run in `ort_session`: Q/DQ as float math on
    dequantized values, so the figures are the graph's on any CPU (see ort_session). Returns the report without
    raising; `report.check()` raises when any output misses `tolerance` (default: no threshold)."""
    ref, cand = _runner(fp32), _runner(candidate)
    if not list(held_out):
        raise ExportError(f"{component}: no held-out feeds to measure {precision} parity on; hold out at least one")
    report = ParityReport(component, precision, tolerance or Tolerance(min_cosine=-1.0, max_rel_l2=math.inf), {})
    for i, feed in enumerate(held_out):
        feed = {k: np.ascontiguousarray(v) for k, v in feed.items()}
        expected, got = ref.infer(feed), cand.infer(feed)
        report.samples[f"held_out{i}"] = {n: parity(v, got[n]) if n in got else
                                          Parity(math.inf, math.inf, -1.0, False) for n, v in expected.items()}
    return report


def summary(report: ParityReport) -> dict[str, float]:
    """Worst figures over every output and sample: {"cosine", "rel_l2", "max_abs"}."""
    fig = worst(report.per_output().values())
    return {"cosine": fig.cosine, "rel_l2": fig.rel_l2, "max_abs": fig.max_abs}


def _measure(fp32: Any, result: QuantResult, held_out: Sequence[Feed], tol: Tolerance, component: str
             ) -> tuple[ParityReport, str]:
    """Figures of a Q/DQ graph: by running it when ONNX Runtime can, else through simulate_fp8."""
    if result.parity_method == "ort":
        return accuracy_check(fp32, result.path, held_out, tol, component=component,
                              precision=result.precision), "ort"
    with tempfile.TemporaryDirectory() as tmp:
        sim = simulate_fp8(result.path, Path(tmp) / "sim.onnx")
        return accuracy_check(fp32, sim, held_out, tol, component=component,
                              precision=result.precision), "simulated-fp8"


def node_sensitivity(fp32: str | Path, qdq: str | Path, feeds: Sequence[Feed], nodes: Sequence[str]
                     ) -> list[tuple[str, float]]:
    """Rank quantized nodes by the error they add, from one run of each graph: for node n with activation input x
    and output y, rel_l2(y_q, y_fp32) - rel_l2(x_q, x_fp32) (x is the tensor before its Q/DQ, present in both graphs).
    Largest first. `qdq` must run in ONNX Runtime (pass simulate_fp8's twin for a float8 graph that does not)."""
    import onnx

    fp32, qdq = Path(fp32), Path(qdq)
    model = onnx.load(str(fp32), load_external_data=False)
    by_name = {n.name: n for n in model.graph.node}
    if any(not n.name for n in model.graph.node):
        _name_nodes(model)
        by_name = {n.name: n for n in model.graph.node}
    pairs = [(name, by_name[name].input[0], by_name[name].output[0]) for name in nodes if name in by_name]
    tensors = list(dict.fromkeys(t for _, x, y in pairs for t in (x, y)))
    errors: dict[str, list[float]] = {t: [] for t in tensors}
    with tempfile.TemporaryDirectory() as tmp:
        outs = {}
        for label, path in (("ref", fp32), ("q", qdq)):
            probe = onnx.load(str(path))
            present = {o.name for o in probe.graph.output}
            probe.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                                      for t in tensors if t not in present)
            save_model(probe, Path(tmp) / f"{label}.onnx")
            del probe
            session = ort_session(Path(tmp) / f"{label}.onnx")
            outs[label] = [dict(zip(tensors, session.run(tensors, dict(f)))) for f in feeds]
            del session
    for ref, got in zip(outs["ref"], outs["q"]):
        for t in tensors:
            errors[t].append(parity(ref[t], got[t]).rel_l2)
    mean = {t: float(np.mean(v)) for t, v in errors.items()}
    ranking = [(name, mean[y] - mean[x]) for name, x, y in pairs]
    return sorted(ranking, key=lambda item: -item[1])


def _budget(budget: Tolerance | float) -> Tolerance:
    if isinstance(budget, Tolerance):
        return budget
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        return Tolerance(min_cosine=float(budget), max_rel_l2=math.inf)
    raise ExportError(f"budget must be a validate.Tolerance or a minimum cosine, got {budget!r}")


def _io(model: "onnx.ModelProto") -> tuple[list[Any], list[Any]]:
    """TensorSpec-like (name, shape, dtype) of a graph's inputs and outputs, for export.check_graph."""
    import onnx
    from types import SimpleNamespace

    def spec(v: Any) -> Any:
        t = v.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim)
        return SimpleNamespace(name=v.name, shape=shape,
                               dtype=np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)).name)

    inits = {t.name for t in model.graph.initializer}
    return [spec(v) for v in model.graph.input if v.name not in inits], [spec(v) for v in model.graph.output]


def quantize_with_budget(src: str | Path, dst_dir: str | Path, component: str, precision: str,
                         calibration: Sequence[Feed], held_out: Sequence[Feed], budget: Tolerance | float, *,
                         method: str = "minmax", max_excluded: int = 8, max_tries: int = 5,
                         augment_calibration: bool = False, backend: str = "auto", base: str = "fp32",
                         log: Log = _quiet) -> QuantDecision:
    """Quantize `src` to `precision`, measure on `held_out`, and keep the result only within `budget`.

    1. Q/DQ graph of every eligible node (try 1). Within budget -> final = precision.
    2. Otherwise rank the quantized nodes by the error each adds (node_sensitivity, one run on the held-out feeds) and
       re-quantize excluding the top 1, 2, 4, ... nodes (at most `max_excluded`, `max_tries` attempts in all,
       never every node). The first within budget -> final = "<precision>-partial".
    3. Otherwise the fp16 graph (export.fp16_from_onnx; its figures recorded, budget_met says whether it met it).
    Files: <dst_dir>/<component>.<precision>.onnx, or <component>.fp16.onnx on fallback (the failed Q/DQ graph is
    removed). `base`: the float precision around the Q/DQ pairs (QDQ_BASE[recipe.runtime]). `augment_calibration`
    also calibrates on the held-out feeds (flagged in the decision: the figures are
    then not independent of calibration)."""
    import onnx

    src, dst_dir = Path(src), Path(dst_dir)
    tol = _budget(budget)
    held_out = list(held_out)
    calib = list(calibration) + (held_out if augment_calibration else [])
    if not held_out:
        raise ExportError(f"{component}: no held-out feeds; split_feeds(feeds, 1) holds one out of the calibration set")
    dst = dst_dir / f"{component}.{precision}.onnx"
    max_rel_l2 = tol.max_rel_l2 if math.isfinite(tol.max_rel_l2) else None  # strict JSON has no Infinity
    budget_json = {"min_cosine": tol.min_cosine, "max_rel_l2": max_rel_l2}
    calib_json = {"samples": len(calib), "held_out": len(held_out), "held_out_in_calibration": augment_calibration,
                  "method": method, "base": base}
    kwargs = dict(method=method, backend=backend, base=base, log=log)
    result = qdq_from_onnx(src, dst, precision, calib, **kwargs)
    ref = OrtGraph(src)
    history: list[dict[str, Any]] = []

    def attempt(res: QuantResult) -> tuple[bool, dict[str, float], str]:
        report, how = _measure(ref, res, held_out, tol, component)
        figures = summary(report)
        history.append({"excluded": len(res.excluded_nodes), "quantized": len(res.quantized_nodes), **figures,
                        "parity_method": how})
        log(f"{component} [{precision}] try {len(history)}: {len(res.excluded_nodes)} excluded, cosine "
            f"{figures['cosine']:.6f}, rel L2 {figures['rel_l2']:.3g} ({how}); budget cosine >= {tol.min_cosine}")
        return report.passed, figures, how

    ok, figures, how = attempt(result)
    if ok:
        return QuantDecision(component, precision, precision, dst, [], figures, budget_json, True, 1, how,
                             calib_json, history)
    all_nodes = list(result.quantized_nodes)
    with tempfile.TemporaryDirectory() as tmp:
        probe = result.path if result.parity_method == "ort" else simulate_fp8(result.path, Path(tmp) / "sim.onnx")
        ranking = [name for name, _ in node_sensitivity(src, probe, held_out, all_nodes)]
    log(f"{component} [{precision}]: most error-adding nodes {ranking[:5]}")
    k = 1
    while len(history) < max_tries and k <= min(max_excluded, len(ranking)) and k < len(all_nodes):
        excluded = ranking[:k]
        result = qdq_from_onnx(src, dst, precision, calib, exclude_nodes=excluded, **kwargs)
        ok, figures, how = attempt(result)
        if ok:
            return QuantDecision(component, precision, f"{precision}-partial", dst, excluded, figures, budget_json,
                                 True, len(history), how, calib_json, history)
        k *= 2
    for f in result.files:
        f.unlink(missing_ok=True)
    fp16 = dst_dir / f"{component}.fp16.onnx"
    inputs, outputs = _io(onnx.load(str(src), load_external_data=False))
    fp16_from_onnx(src, fp16, inputs, outputs, component, log)
    report = accuracy_check(ref, fp16, held_out, tol, component=component, precision="fp16")
    figures = summary(report)
    history.append({"excluded": None, "quantized": 0, **figures, "parity_method": "ort", "fallback": "fp16"})
    log(f"{component}: {precision} missed the budget after {len(history) - 1} tries; fp16 fallback, cosine "
        f"{figures['cosine']:.6f}{'' if report.passed else ' (fp16 misses the budget too)'}")
    return QuantDecision(component, precision, "fp16", fp16, [], figures, budget_json, report.passed,
                         len(history) - 1, "ort", calib_json, history)

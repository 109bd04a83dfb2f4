"""FP8 E4M3 explicit Q/DQ written with standard ONNX ops (opset 19). onnxruntime's float8 path accepts only its
Distribution calibrator (MinMax is refused: "Only Distribution calibration method is supported for float
quantization"; the Distribution one failed on the tiny CLIP, shared/notes/onnx-quant.md), so the graph is written
here: QuantizeLinear/DequantizeLinear pairs with FLOAT8E4M3FN zero points before the activation input (scale =
amax/448 from calibration; "percentile" uses the 99.999th percentile of |x|), weights stored as FLOAT8E4M3FN
initializers with a per-channel DequantizeLinear (scale = channel amax/448), on the nodes INT8 would quantize."""
from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..core.progress import Log, quiet
from ..export.graph_io import save_model
from ..runners.ort import OrtRunner
from .int8 import PERCENTILE
from .select import at_least_opset, initializers

if TYPE_CHECKING:  # pragma: no cover
    import onnx

FP8_MAX = 448.0                      # largest finite float8 E4M3FN value
FP8_OPSET = 19                       # first opset with float8 QuantizeLinear/DequantizeLinear


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


def amax_ranges(model: "onnx.ModelProto", names: list[str], feeds: list[dict], method: str) -> dict[str, float]:
    """Per-tensor calibration range of intermediate tensors: max |x| ("minmax") or the 99.999th percentile of |x|
    ("percentile") over all feeds, from one ONNX Runtime session of the fp32 graph with the tensors as outputs."""
    import onnx

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                              for n in names if n not in present)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "probe.onnx"
        save_model(probe, path)
        del probe
        session = OrtRunner(path, qdq="float").session
        ranges: dict[str, list[np.ndarray]] = {n: [] for n in names}
        for feed in feeds:
            for n, value in zip(names, session.run(names, feed)):
                a = np.abs(np.asarray(value, np.float32)).ravel()
                ranges[n].append(a if method == "percentile" else np.array([a.max() if a.size else 0.0]))
        del session
    return {n: float(np.percentile(np.concatenate(v), PERCENTILE) if method == "percentile"
                     else np.max(np.concatenate(v))) for n, v in ranges.items()}


def fp8_qdq(model: "onnx.ModelProto", feeds: list[dict], method: str, chosen: list[str], log: Log = quiet,
            ranges: dict[str, float] | None = None) -> tuple["onnx.ModelProto", dict[str, float]]:
    """Insert FP8 E4M3 Q/DQ before the activation input of each chosen node and store its weight as float8 with a
    per-channel DequantizeLinear. The graph is converted to opset 19 first (float8 Q/DQ). Returns the graph and the
    activation ranges it used (`ranges` when given: those of a superset of the chosen nodes serve a later try)."""
    import onnx
    from onnx import helper, numpy_helper

    model = at_least_opset(model, FP8_OPSET, "the graph (for float8 Q/DQ)")
    graph = model.graph
    inits = initializers(model)
    by_name = {n.name: n for n in graph.node}
    nodes = [by_name[name] for name in chosen]
    acts = list(dict.fromkeys(n.input[0] for n in nodes))
    amax = ranges if ranges is not None else amax_ranges(model, acts, feeds, method)
    fp8 = onnx.TensorProto.FLOAT8E4M3FN
    new_inits: list[onnx.TensorProto] = []
    head: list[onnx.NodeProto] = []       # weight DequantizeLinear nodes (inputs are all initializers)
    act_qdq: dict[str, tuple[str, list[onnx.NodeProto]]] = {}
    weight_dq: dict[str, str] = {}
    for x in acts:
        scale = amax[x] / FP8_MAX if amax[x] > 0 and math.isfinite(amax[x]) else 1.0
        base = safe_name(x)
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
        base = safe_name(w)
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
    return model, amax


def safe_name(name: str) -> str:
    return name.strip("/").replace("/", "_").replace(":", "_") or "t"

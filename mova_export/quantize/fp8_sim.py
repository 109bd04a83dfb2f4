"""An fp32 twin of a float8 Q/DQ graph, for parity where float8 kernels are missing (`simulate_fp8`)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..core.errors import ExportError
from ..export.graph_io import save_model, too_large
from .fp8 import FP8_MAX, safe_name
from .select import initializers

if TYPE_CHECKING:  # pragma: no cover
    import onnx



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
    inits = initializers(model)
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
        p = f"{safe_name(node.name or y)}_fp8sim"
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
        inferred = onnx.shape_inference.infer_shapes(model) if not too_large(model) else model
    except Exception:
        inferred = model
    g = inferred.graph
    return {v.name: len(v.type.tensor_type.shape.dim) for v in [*g.input, *g.value_info, *g.output]
            if v.type.tensor_type.HasField("shape")}

"""Which nodes get Q/DQ: weight-bearing MatMul/Gemm/Conv, never the fp32 islands, Convs only where TensorRT has
INT8/FP8 kernels (ModelOpt's rule); plus the small ONNX graph helpers every Q/DQ writer shares."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

from ..core.errors import ExportError
from ..export.fp16 import FP32_OPS, fp16_block_nodes

if TYPE_CHECKING:  # pragma: no cover
    import onnx

# Layers TensorRT runs in INT8/FP8 with Q/DQ on their inputs; only nodes with a constant weight (input 1) qualify,
# so attention's activation x activation MatMuls stay in the float precision the engine picks.
QUANT_OP_TYPES = ("Conv", "MatMul", "Gemm")
DEFAULT_FP32_OPS = tuple(FP32_OPS)


def initializers(model: "onnx.ModelProto") -> dict[str, "onnx.TensorProto"]:
    return {t.name: t for t in model.graph.initializer}


def graph_input_names(model: "onnx.ModelProto") -> list[str]:
    inits = {t.name for t in model.graph.initializer}
    return [v.name for v in model.graph.input if v.name not in inits]


def name_nodes(model: "onnx.ModelProto") -> None:
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

    inits = initializers(model)
    graph_inputs = set(graph_input_names(model))
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


def count_qdq(model: "onnx.ModelProto") -> tuple[int, int]:
    ops = [n.op_type for n in model.graph.node]
    return ops.count("QuantizeLinear"), ops.count("DequantizeLinear")


def opset_of(model: "onnx.ModelProto") -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def at_least_opset(model: "onnx.ModelProto", opset: int, what: str) -> "onnx.ModelProto":
    """The model converted up to `opset` where it is older (what: the graph and the reason, for the error)."""
    from onnx import version_converter

    if opset_of(model) >= opset:
        return model
    try:
        return version_converter.convert_version(model, opset)
    except Exception as exc:
        raise ExportError(f"cannot convert {what} to opset {opset}: {str(exc).splitlines()[0]}; export at opset "
                          f">= {opset}") from None

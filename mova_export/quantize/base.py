"""The float base around the Q/DQ pairs: fp16 for strongly typed TensorRT (the route NVIDIA's ModelOpt takes), fp32
for ONNX Runtime CPU (quantize.settings.QDQ_BASE)."""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Sequence

from ..core.progress import Log
from ..export.fp16 import FP32_OPS, fp16_block_nodes, toposorted
from ..export.graph_io import too_large
from .select import at_least_opset

if TYPE_CHECKING:  # pragma: no cover
    import onnx

FP16_QDQ_OPSET = 19                  # first opset with float16 scales on QuantizeLinear/DequantizeLinear


def on_fp16_base(model: "onnx.ModelProto", log: Log, keep_fp32: Sequence[str] = ()) -> "onnx.ModelProto":
    """A Q/DQ graph with fp16 activations and fp16 scales outside the quantized ops (the route NVIDIA's ModelOpt
    takes for strongly typed TensorRT); FP32_OPS and norm-scope nodes stay fp32 between casts, graph inputs and
    outputs stay fp32."""
    from onnxruntime.transformers import float16

    model = at_least_opset(model, FP16_QDQ_OPSET, "the Q/DQ graph (for fp16 scales)")
    blocked = list(dict.fromkeys([*fp16_block_nodes(model), *keep_fp32]))   # + what the fp16 export kept fp32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # values clamped to the fp16 range (the -1e6 gate logits)
        half = float16.convert_float_to_float16(
            model, keep_io_types=True, disable_shape_infer=too_large(model),
            op_block_list=list(float16.DEFAULT_OP_BLOCK_LIST) + list(FP32_OPS), node_block_list=blocked)
    log(f"fp16 base: {len(blocked)} norm nodes and ops {', '.join(FP32_OPS)} kept in fp32")
    return toposorted(half)

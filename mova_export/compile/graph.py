"""Facts about one ONNX graph that decide how it is built (CPU, via onnx; external data is not loaded)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..bundle import sha256_file
from ..core.errors import CompileError

# ONNX element types -> our names. UINT8 is absent on purpose: our Q/DQ are signed symmetric (INT8 with zero points
# 0, FP8 E4M3), and an unsigned zero point means the graph came from elsewhere with asymmetric activations.
_QUANTIZED = {3: "int8", 17: "fp8"}       # TensorProto.INT8, TensorProto.FLOAT8E4M3FN
_FLOATS = {1: "fp32", 10: "fp16"}         # TensorProto.FLOAT, TensorProto.FLOAT16
_UINT8 = 2
_UNSUPPORTED = (18, 19, 20, 21, 22)       # FLOAT8E4M3FNUZ, FLOAT8E5M2, FLOAT8E5M2FNUZ, UINT4, INT4


@dataclass(frozen=True)
class GraphInfo:
    sha256: str
    qdq: tuple[str, ...] = ()                   # quantized types in Q/DQ nodes: "int8", "fp8"
    float_types: tuple[str, ...] = ("fp32",)    # float types of the graph's tensors: fp32, fp16

    @property
    def fp16_typed(self) -> bool:
        return "fp16" in self.float_types


def inspect_graph(path: str | Path, sha256: str | None = None) -> GraphInfo:
    """Q/DQ types and float types of an ONNX graph (initializers and value types). Raises CompileError for UINT8
    Q/DQ (asymmetric, not what our quantizer writes) and for float8 types other than E4M3FN."""
    import onnx


    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    types = {init.name: init.data_type for init in g.initializer}
    for vi in [*g.input, *g.output, *g.value_info]:
        types.setdefault(vi.name, vi.type.tensor_type.elem_type)
    qdq: set[str] = set()
    for node in g.node:
        if node.op_type == "QuantizeLinear":
            zp = node.input[2] if len(node.input) > 2 and node.input[2] else None
            attr = {a.name: a.i for a in node.attribute}
            # no zero point and no output_dtype: ONNX defaults the output to UINT8
            dtype = types.get(zp) if zp else attr.get("output_dtype") or _UINT8
        elif node.op_type == "DequantizeLinear":
            dtype = types.get(node.input[0])
        else:
            continue
        if dtype == _UINT8:
            raise CompileError(f"{Path(path).name}: {node.op_type} {node.name!r} is UINT8 (asymmetric); mova-export "
                               "builds signed symmetric INT8/FP8 Q/DQ only: re-quantize with `mova-export build`")
        if dtype in _QUANTIZED:
            qdq.add(_QUANTIZED[dtype])
        elif dtype in _UNSUPPORTED:
            name = onnx.TensorProto.DataType.Name(dtype)
            raise CompileError(f"{Path(path).name}: {node.op_type} {node.name!r} has type {name}; mova-export "
                               "builds INT8 and FP8 E4M3 Q/DQ only: re-quantize with `mova-export build`")
    floats = {_FLOATS[t] for t in types.values() if t in _FLOATS}
    return GraphInfo(sha256 or sha256_file(Path(path)), tuple(sorted(qdq)), tuple(sorted(floats)) or ("fp32",))


__all__ = ["GraphInfo", "inspect_graph"]

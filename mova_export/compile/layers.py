"""What precision a strongly typed build will compute in: a parsed network's compute layers by output dtype.

A strongly typed builder takes every tensor's type from the graph, so the parsed `INetworkDefinition` already says
which layers run fp32: `num_layers`, `get_layer(i).type`, `get_layer(i).get_output(j).dtype`. Compute layers are the
ones that do arithmetic on float tensors (matrix multiplies, convolutions, elementwise, norms, softmax, activations,
unary ops, reductions); shape arithmetic (INT64 outputs) and data movement (shuffle, slice, concat, Q/DQ, cast) are
not counted. An attention matrix multiply is one whose two inputs are both activations (neither traces back to a
constant weight through shuffles, casts and Q/DQ).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from ..core.errors import CompileError
from ..core.tensorrt_flavors import FLAVORS, import_flavor

COMPUTE_LAYERS = ("CONVOLUTION", "MATRIX_MULTIPLY", "ELEMENTWISE", "NORMALIZATION", "SOFTMAX", "ACTIVATION", "UNARY",
                  "REDUCE")
# layers a weight passes through on its way to a matrix multiply
_PASS_THROUGH = ("SHUFFLE", "DEQUANTIZE", "QUANTIZE", "CAST", "IDENTITY")


@dataclass(frozen=True)
class LayerProfile:
    compute_layers: int                  # with a float output
    fp32: int
    fp16: int
    attention_matmuls: int
    attention_matmuls_fp32: int
    fp32_layers: tuple[str, ...] = ()    # "TYPE name" of each fp32 compute layer (what the share is made of)

    @property
    def fp32_share(self) -> float:
        return self.fp32 / self.compute_layers if self.compute_layers else 0.0

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["fp32_share"] = round(self.fp32_share, 4)
        out["fp32_layers"] = list(self.fp32_layers)
        return out


def layer_profile(network: Any, trt: ModuleType) -> LayerProfile:
    """Count `network`'s compute layers by output dtype (see the module doc)."""
    lt, dt = trt.LayerType, trt.DataType
    compute = {getattr(lt, n) for n in COMPUTE_LAYERS}
    passing = {getattr(lt, n) for n in _PASS_THROUGH}
    floats = {dt.FLOAT: "fp32", dt.HALF: "fp16", dt.BF16: "bf16"}
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    producer = {layer.get_output(j).name: layer for layer in layers for j in range(layer.num_outputs)}

    def from_constant(tensor: Any) -> bool:
        layer = producer.get(tensor.name)
        while layer is not None and layer.type in passing:
            layer = producer.get(layer.get_input(0).name)
        return layer is not None and layer.type == lt.CONSTANT

    counts = {"fp32": 0, "fp16": 0, "bf16": 0}
    fp32_layers: list[str] = []
    attention = attention_fp32 = 0
    for layer in layers:
        if layer.type not in compute:
            continue
        kind = floats.get(layer.get_output(0).dtype)
        if kind is None:
            continue
        counts[kind] += 1
        if kind == "fp32":
            fp32_layers.append(f"{str(layer.type).split('.')[-1]} {layer.name}")
        if layer.type == lt.MATRIX_MULTIPLY and not any(from_constant(layer.get_input(k)) for k in range(2)):
            attention += 1
            attention_fp32 += kind == "fp32"
    return LayerProfile(sum(counts.values()), counts["fp32"], counts["fp16"], attention, attention_fp32,
                        tuple(fp32_layers))


def parse_onnx(trt: ModuleType, path: str | Path, network_flags: int = 0, logger: Any = None) -> tuple[Any, ...]:
    """(builder, network, parser) with `path` parsed by TensorRT's own ONNX parser; CompileError listing every
    parser error. The three objects are returned together: the network lives only as long as its builder."""
    logger = logger or trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(path)):
        errors = [str(parser.get_error(i)).replace("\n", " ") for i in range(parser.num_errors)]
        raise CompileError(f"TensorRT cannot parse {path} ({len(errors)} error(s)): {' | '.join(errors)}; "
                           "re-export the graph or report the unsupported op")
    return builder, network, parser


def profile_onnx(path: str | Path, flavor: str = "tensorrt-rtx") -> LayerProfile:
    """Parse `path` with `flavor`'s parser as a strongly typed network and profile its layers (no build, no GPU)."""

    trt = import_flavor(flavor)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if FLAVORS[flavor].strongly_typed_flag else 0
    _builder, network, _parser = parse_onnx(trt, path, flags, trt.Logger(trt.Logger.ERROR))
    return layer_profile(network, trt)


__all__ = ["COMPUTE_LAYERS", "LayerProfile", "layer_profile", "parse_onnx", "profile_onnx"]

"""The fp16 variant of a checked fp32 graph, with fp32 islands, and its repair when it misses the fp16 tolerance.

onnxruntime.transformers.float16 converts every float op to fp16 except FP32_OPS (the bilinear alignment, norms,
softmax: what the reference computes in fp32), the nodes of decomposed norms (`fp16_block_nodes`) and any nodes a
caller asks to keep. Some towers lose too much in fp16 anyway (Pix2Struct's T5-style activations grow past what a
10-bit mantissa carries through a residual stream): `repair_fp16` keeps the parts that add the most error in fp32
until the graph meets the tolerance, as the INT8 budget excludes nodes from quantization. Coarse to fine, because a
full-size probe costs two whole-graph runs per chunk of tensors: a graph of numbered blocks (`/layer.3/`,
`/encoder/layers.11/`) is probed once, at its block boundaries, and its worst 1, 2, 4, ... blocks (at most half of
them) are kept in fp32; a graph without blocks ranks its nodes one by one and keeps the worst 1, 2, 4, ... of them.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from ..core.progress import Log, quiet
from ..core.spec import TensorSpec
from .blocks import block_of, block_sensitivity, ranked
from .graph_io import check_graph, save_model, tensor_errors, too_large

if TYPE_CHECKING:  # pragma: no cover
    import onnx

# fp16 conversion keeps these in fp32 (as the reference computes them): the bilinear alignment, norms and softmax
# (the gate softmax with its -1e6 logits; attention softmax too, which costs two casts and protects against overflow).
FP32_OPS = ("Resize", "LayerNormalization", "GroupNormalization", "InstanceNormalization", "Softmax",
            "ReduceMean", "Pow", "Sqrt", "Reciprocal")
# Decomposed norms (SAM's channels-first LayerNorm, Pix2Struct's RMSNorm) show up as elementwise nodes under a
# module scope whose name contains "norm"; their weight-free arithmetic stays fp32 too.
_NORM_SCOPE = re.compile(r"/[^/]*norm[^/]*/", re.IGNORECASE)
_NORM_SCOPE_OPS = frozenset({"Sub", "Add", "Mul", "Div", "Sqrt", "Pow", "ReduceMean", "Reciprocal", "Cast"})


def toposorted(model: "onnx.ModelProto") -> "onnx.ModelProto":
    """The float16 converter appends its Cast nodes at the end; onnx_ir puts the graph back in topological order."""
    import onnx_ir as ir

    graph = ir.from_proto(model)
    graph.graph.sort()
    return ir.to_proto(graph)


def fp16_block_nodes(model: "onnx.ModelProto") -> list[str]:
    return [n.name for n in model.graph.node if n.op_type in _NORM_SCOPE_OPS and _NORM_SCOPE.search(n.name or "")]


def fp16_from_onnx(src: Path, dst: Path, inputs: Sequence["TensorSpec"], outputs: Sequence["TensorSpec"],
                   name: str, log: Log = quiet, keep_fp32: Sequence[str] = ()) -> list[Path]:
    """fp16 variant of a checked fp32 graph: onnxruntime.transformers.float16 with fp32 graph inputs/outputs
    (keep_io_types) and the FP32_OPS / norm-scope nodes, and the nodes named in `keep_fp32`, blocked, so they run
    in fp32 between casts."""
    import onnx
    from onnxruntime.transformers import float16

    model = onnx.load(str(src))
    large = too_large(model)
    block_nodes = list(dict.fromkeys([*fp16_block_nodes(model), *keep_fp32]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the model contains values clamped to the fp16 range" (the -1e6 logits)
        half = float16.convert_float_to_float16(
            model, keep_io_types=True, disable_shape_infer=large,
            op_block_list=list(float16.DEFAULT_OP_BLOCK_LIST) + list(FP32_OPS), node_block_list=block_nodes)
    del model
    half = toposorted(half)
    kept = f" and {len(keep_fp32)} node(s) that lose precision in fp16" if keep_fp32 else ""
    log(f"{name}: fp16 with {len(block_nodes) - len(keep_fp32)} norm nodes{kept} and ops {', '.join(FP32_OPS)} "
        "kept in fp32")
    files = save_model(half, dst)
    del half
    check_graph(dst, inputs, outputs, name)
    return files


# ops whose fp16 output can lose what the next layers need (products, sums, activations): the repair's candidates.
# Not Constant nodes: onnxruntime's converter casts a blocked Constant to fp16 all the same.
REPAIR_OPS = frozenset({"MatMul", "Gemm", "Conv", "Add", "Sub", "Mul", "Div", "Erf", "Tanh", "Sigmoid", "Exp"})


@dataclass
class Fp16Repair:
    """What it took to make an fp16 graph meet its tolerance: the nodes kept in fp32 and each try's worst figures;
    `ok` False when keeping `max_kept` nodes did not do it (the component ships without an fp16 variant)."""
    ok: bool
    kept_fp32: list[str] = field(default_factory=list)
    tries: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "kept_fp32": list(self.kept_fp32), "tries": list(self.tries)}


def fp16_sensitivity(fp32: Path, fp16: Path, feeds: Sequence[Mapping[str, np.ndarray]], log: Log = quiet
                     ) -> list[tuple[str, float]]:
    """Rank the fp16 graph's converted nodes by the error each adds: rel_l2 of its output minus the largest rel_l2
    of its inputs, against the fp32 graph's same tensors (the converter keeps node names and output names; inputs it
    casts are read from the fp32 graph's structure). Largest first. One sample ranks them; graph inputs and weights
    count 0 (fed / stored as they are)."""
    nodes, in_both = _candidates(fp32, fp16)
    tensors = list(dict.fromkeys(t for n in nodes for t in (*n.input, n.output[0]) if t in in_both))
    errors = tensor_errors(fp32, fp16, feeds[:1], tensors, budget_bytes=2 << 30, log=log)
    return ranked({n.name: ([n.output[0]], list(n.input)) for n in nodes}, errors)


def _candidates(fp32: Path, fp16: Path) -> tuple[list["onnx.NodeProto"], set[str]]:
    """The fp32 graph's nodes the repair may keep in fp32 (REPAIR_OPS the conversion did not already block, whose
    output the fp16 graph has too), and the tensor names both graphs have."""
    import onnx

    half = onnx.load(str(fp16), load_external_data=False)
    full = onnx.load(str(fp32), load_external_data=False)
    blocked = set(fp16_block_nodes(half))
    in_both = {o for n in half.graph.node for o in n.output} & {o for n in full.graph.node for o in n.output}
    nodes = [n for n in full.graph.node if n.op_type in REPAIR_OPS and n.name not in blocked and n.output
             and n.output[0] in in_both]
    return nodes, in_both


def repair_steps(fp32: Path, fp16: Path, feeds: Sequence[Mapping[str, np.ndarray]], max_kept: int = 32,
                 log: Log = quiet) -> list[tuple[str, list[str]]]:
    """The repair's tries, smallest first: (what is kept, its nodes). The worst 1, 2, 4, ... blocks that add error
    (at most half of the blocks), or for a graph without blocks the worst 1, 2, 4, ... nodes up to `max_kept`."""
    blocks = [name for name, gain in block_sensitivity(fp32, fp16, feeds, log) if gain > 0]
    if blocks:
        nodes, _ = _candidates(fp32, fp16)
        log(f"{fp16.name}: blocks adding the most error in fp16 {blocks[:5]}")
        total = len({block_of(n.name) for n in nodes})
        counts = [k for k in _doubling(len(blocks)) if k <= max(1, total // 2)]
        return [(f"{k} block(s): {', '.join(b or '(outside blocks)' for b in blocks[:k])}",
                 _nodes_in(nodes, set(blocks[:k]))) for k in counts]
    ranking = [name for name, gain in fp16_sensitivity(fp32, fp16, feeds, log) if gain > 0]
    log(f"{fp16.name}: most error-adding nodes in fp16 {ranking[:5]}")
    return [(f"{k} node(s)", ranking[:k]) for k in _doubling(min(max_kept, len(ranking)))]


def _nodes_in(nodes: Sequence["onnx.NodeProto"], blocks: set[str]) -> list[str]:
    return [n.name for n in nodes if block_of(n.name) in blocks]


def _doubling(n: int) -> list[int]:
    """1, 2, 4, ... below n, then n itself."""
    counts = [1 << i for i in range(max(n, 1).bit_length()) if (1 << i) < n]
    return [*counts, n] if n else []


def repair_fp16(fp32: Path, fp16: Path, feeds: Sequence[Mapping[str, np.ndarray]],
                convert: Callable[[Sequence[str]], None], passes: Callable[[], tuple[bool, dict[str, Any]]],
                max_kept: int = 32, log: Log = quiet) -> Fp16Repair:
    """Keep the fp16 graph's most error-adding blocks or nodes in fp32 (`repair_steps`), reconverting with
    `convert(kept)` and checking with `passes()` -> (ok, figures), until it passes."""
    repair = Fp16Repair(False)
    for label, kept in repair_steps(fp32, fp16, feeds, max_kept, log):
        convert(kept)
        ok, figures = passes()
        repair.tries.append({"kept": label, "kept_fp32": len(kept), **figures})
        if ok:
            repair.ok, repair.kept_fp32 = True, kept
            return repair
    return repair

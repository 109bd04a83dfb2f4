"""ONNX graph files and checks shared by every stage that writes graphs (export, quantize): saving with external
data past 2 GB, the declaration check, a graph's declared I/O, and the per-tensor error of one graph against another
(the sensitivity probes of the INT8 budget and the fp16 repair). onnx is imported inside the functions; no torch.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from ..core.errors import ExportError
from ..core.memory import release_freed_memory
from ..core.spec import TensorSpec
from ..core.tolerance import parity
from ..runners.ort import OrtRunner

if TYPE_CHECKING:  # pragma: no cover
    import onnx

PROTO_LIMIT = 2**31 - 1          # protobuf's hard limit: larger graphs keep their weights in one external file
# Ops with data-dependent control flow or output shapes: a static graph has none.
DYNAMIC_OPS = frozenset({"If", "Loop", "Scan", "NonZero", "Unique", "Compress", "NonMaxSuppression"})


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


def weights_bytes(model: "onnx.ModelProto") -> int:
    return sum(t.ByteSize() for t in model.graph.initializer)


def has_external_data(model: "onnx.ModelProto") -> bool:
    """True for a graph read with load_external_data=False whose weights live in a file beside it."""
    import onnx

    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def too_large(model: "onnx.ModelProto") -> bool:
    """True when the proto cannot be one file (2 GB protobuf limit, with a margin for the graph itself), or its
    weights were left in their file when it was read."""
    return (weights_bytes(model) > PROTO_LIMIT - (256 << 20) or model.ByteSize() > PROTO_LIMIT - (64 << 20)
            or has_external_data(model))


def save_copying_weights(model: "onnx.ModelProto", source: Path, path: Path) -> None:
    """Save a graph read from `source` with load_external_data=False: its proto at `path` and its weight files
    copied beside it file to file, so a 4 GB tower is never held in memory to be rewritten. (Copied, not linked: the
    ONNX checker refuses weight files with several hard links, as a possible hard-link attack.)"""
    import onnx

    onnx.save_model(model, str(path))
    for location in {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}:
        shutil.copyfile(source.parent / location, path.parent / location)


def save_model(model: "onnx.ModelProto", path: Path) -> list[Path]:
    """Save a graph; weights go to one `<name>.data` file beside it when the proto would pass 2 GB."""
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    if too_large(model):
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
        data.chmod(0o644)  # onnx creates it owner-only; a bundle is meant to be copied and read by others
    else:
        onnx.save_model(model, str(path))
    return graph_files(path)


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


def graph_io(model: "onnx.ModelProto") -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The graph's own inputs (initializers excluded) and outputs as TensorSpecs (symbolic dims by name)."""
    def spec(value: Any) -> TensorSpec:
        return TensorSpec(value.name, *_value_shape_dtype(value))

    return [spec(v) for v in _graph_inputs(model)], [spec(v) for v in model.graph.output]


def _value_shape_dtype(value: Any) -> tuple[tuple, str]:
    import onnx

    tensor = value.type.tensor_type
    dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim)
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)).name if tensor.elem_type else "?"
    return dims, dtype


def _fmt(items: list[tuple]) -> str:
    return "[" + ", ".join(f"{n}{list(s)}:{d}" for n, s, d in items) + "]"


def tensor_errors(reference: Path, candidate: Path, feeds: Sequence[Mapping[str, np.ndarray]],  # noqa: PLR0913 (a probe's bounds)
                  tensors: Sequence[str], budget_bytes: int = 1 << 30, most: int = 48,
                  log: Callable[[str], None] | None = None) -> dict[str, float]:
    """Mean rel L2 of each named intermediate tensor of `candidate` against the same tensor of `reference` over the
    feeds (Q/DQ run as float math). Both graphs are probed a chunk of tensors at a time (at most `most`, about
    `budget_bytes` of fp32 by their inferred shapes) and one graph at a time (its values for every feed kept: the
    callers pass one), so a large graph's activations are never all in memory at once: Pix2Struct's 24x2025x2025
    attention maps are 390 MB each. A probe output is declared by name only and ONNX Runtime infers its type (fp32
    in one graph, fp16 in its fp16 variant)."""
    import onnx

    sums: dict[str, float] = {t: 0.0 for t in tensors}
    chunks = _probe_chunks(reference, tensors, budget_bytes, most)
    # beside the candidate (inside the build unit's partial folder): a killed build leaves its probe graphs, each
    # as large as the model, where `mova-export clean --partials` finds them rather than in the system's /tmp
    with tempfile.TemporaryDirectory(dir=candidate.parent, prefix=".probe-") as tmp:
        for i, names in enumerate(chunks):
            if log is not None:     # a full-size graph takes minutes per chunk: say where it is
                log(f"{candidate.name}: probing intermediate tensors, chunk {i + 1}/{len(chunks)} ({len(names)} "
                    f"tensors)")
            values = []       # per graph, per feed: one graph's session at a time (Co-DETR's two peaked at 22.6 GiB)
            for label, path in (("ref", reference), ("cand", candidate)):
                probe = onnx.load(str(path))
                present = {o.name for o in probe.graph.output}
                probe.graph.output.extend(onnx.ValueInfoProto(name=t) for t in names if t not in present)
                save_model(probe, Path(tmp) / f"{label}.onnx")
                del probe
                session = OrtRunner(Path(tmp) / f"{label}.onnx", qdq="float").session
                values.append([session.run(names, dict(feed)) for feed in feeds])
                del session
                release_freed_memory()
            for ref_values, cand_values in zip(*values):
                for t, r, c in zip(names, ref_values, cand_values):
                    sums[t] += parity(r, np.asarray(c, np.float32)).rel_l2
            del values
    return {t: v / max(len(feeds), 1) for t, v in sums.items()}


def _probe_chunks(model_path: Path, tensors: Sequence[str], budget_bytes: int, most: int) -> list[list[str]]:
    """`tensors` in order, cut into chunks of at most `most` names and about `budget_bytes` of fp32 each by the
    shapes ONNX shape inference gives them (a tensor of unknown shape counts as a quarter of the budget)."""
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(model_path), load_external_data=False))
    sizes = {}
    for value in (*model.graph.value_info, *model.graph.output):
        dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
        if dims and all(d > 0 for d in dims):
            sizes[value.name] = 4 * int(np.prod(dims))
    chunks: list[list[str]] = [[]]
    used = 0
    for t in tensors:
        size = sizes.get(t, budget_bytes // 4)
        if chunks[-1] and (used + size > budget_bytes or len(chunks[-1]) >= most):
            chunks.append([])
            used = 0
        chunks[-1].append(t)
        used += size
    return [c for c in chunks if c]

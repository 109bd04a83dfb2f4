"""`qdq_from_onnx`: the dispatcher. One explicit Q/DQ graph from a checked fp32 graph, written by the backend and
precision its QuantSettings name (int8.py, fp8.py, modelopt.py), on the nodes select.py chooses, on the float base
base.py makes, checked by the ONNX checker, with how its parity can be measured on this machine."""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..core.errors import ExportError
from ..core.progress import Log, quiet
from ..export.graph_io import save_model, too_large
from ..runners.ort import runs_in_ort
from .base import on_fp16_base
from .fp8 import fp8_qdq
from .int8 import int8_qdq
from .modelopt import modelopt_qdq
from .select import DEFAULT_FP32_OPS, QUANT_OP_TYPES, count_qdq, graph_input_names, name_nodes, opset_of, select_nodes
from .settings import QuantSettings

Feed = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class Selection:
    """The nodes one try quantizes, the asked-for exclusions among the quantizable ones, the fp32 islands."""
    chosen: list[str]
    excluded: list[str]
    islands: list[str]


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
    parity_method: str                # "ort": the Q/DQ graph runs in ONNX Runtime; "simulated-fp8": fp8_sim
    seconds: float
    base: str = "fp32"                # float precision outside the quantized ops (settings.QDQ_BASE)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["path"] = str(self.path)
        out["files"] = [str(f) for f in self.files]
        out["fp32_islands"] = len(self.fp32_islands)
        return out


def check_feeds(feeds: Sequence[Feed], inputs: Sequence[str], what: str, src: Path) -> list[dict[str, np.ndarray]]:
    """The feeds as contiguous arrays in the graph's input order; ExportError naming a feed with other inputs."""
    feeds = list(feeds)
    if not feeds:
        raise ExportError(f"{what} feeds for {src.name} are empty; pass at least one real-image feed "
                          "(an export unit's calibration/<graph>.npz)")
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


def qdq_from_onnx(src: str | Path, dst: str | Path, settings: QuantSettings, calibration: Sequence[Feed], *,
                  exclude_nodes: Sequence[str] = (), ranges_dir: Path | None = None, keep_fp32: Sequence[str] = (),
                  log: Log = quiet) -> QuantResult:
    """Explicit Q/DQ graph at `dst` from the fp32 graph `src`, calibrated on `calibration` (feeds: input -> array).

    Calibration always runs on the fp32 graph (onnxruntime's calibrators and the FP8 amax probe read fp32 tensors);
    with base "fp16" the finished Q/DQ graph is then converted like graph_io.fp16_from_onnx (the same fp32 blocks)
    with fp16 scales, at opset 19. `ranges_dir`: where the calibration ranges of a first try are kept, so that later
    tries (which exclude more nodes) reuse them instead of calibrating again. `keep_fp32`: nodes the fp16 base keeps
    in fp32 beside the norms (those the component's fp16 export had to keep there).

    Raises ExportError on a missing graph, empty or mismatched feeds, nothing left to quantize, or a result that
    fails the ONNX checker."""
    import onnx

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise ExportError(f"fp32 graph {src} not found; export the component first (export.onnx_from_component)")
    if src.resolve() == dst.resolve():
        raise ExportError(f"quantizing {src.name} would overwrite it; pass another dst")
    # INT8 by onnxruntime reads the weights from files: its graph here is the structure (a 4.4 GB tower's weights
    # held while onnxruntime loads its own copies took a full-size build into the OOM killer)
    lean = settings.precision == "int8" and settings.backend != "modelopt"
    model = onnx.load(str(src), load_external_data=not lean)
    feeds = check_feeds(calibration, graph_input_names(model), "calibration", src)
    start = time.perf_counter()
    dst.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{dst.stem}.", dir=dst.parent))
    try:
        name_nodes(model)
        chosen, islands = select_nodes(model, exclude_nodes=exclude_nodes, exclude_op_types=DEFAULT_FP32_OPS,
                                       op_types=QUANT_OP_TYPES, precision=settings.precision)
        unknown = sorted(set(exclude_nodes) - {n.name for n in model.graph.node})
        if unknown:
            log(f"{src.name}: exclude_nodes not in the graph (ignored): {unknown[:5]}")
        if not chosen:
            raise ExportError(f"{src.name}: no {'/'.join(QUANT_OP_TYPES)} node with a weight is left to quantize "
                              f"({len(exclude_nodes)} excluded); ship the fp16 graph instead")
        excluded = sorted(set(exclude_nodes) & {n.name for n in model.graph.node})
        out, producer = _write(model, src, scratch, settings, feeds, Selection(chosen, excluded, islands),
                               ranges_dir, log)
        del model
        if settings.base == "fp16":
            out = on_fp16_base(out, log, keep_fp32)
        (num_q, num_dq), opset = count_qdq(out), opset_of(out)
        files = _save_checked(out, dst, f"{src.name}: the {settings.precision} Q/DQ graph")
        del out
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    parity_method = "ort" if runs_in_ort(dst, feeds[0]) else "simulated-fp8"
    if parity_method != "ort" and settings.precision == "int8":
        raise ExportError(f"{dst.name}: ONNX Runtime CPU cannot run the INT8 Q/DQ graph; it is not valid to ship")
    seconds = time.perf_counter() - start
    log(f"{src.name} -> {dst.name}: {settings.precision} on an {settings.base} base ({producer}, {settings.method}) "
        f"{len(chosen)} nodes quantized, {len(excluded)} excluded, {num_q} Q / {num_dq} DQ, opset {opset}, parity "
        f"by {parity_method}, {seconds:.1f} s")
    return QuantResult(dst, files, settings.precision, producer, settings.method, chosen, excluded, islands, num_q,
                       num_dq, opset, len(feeds), parity_method, seconds, settings.base)


def _save_checked(model: Any, dst: Path, what: str) -> list[Path]:
    """Save a Q/DQ graph that passes the ONNX checker (a >2 GB graph is checked from its file)."""
    import onnx

    try:
        if not too_large(model):
            onnx.checker.check_model(model, full_check=True)
        files = save_model(model, dst)
        if too_large(model):
            onnx.checker.check_model(str(dst), full_check=True)
    except Exception as exc:  # onnx.checker.ValidationError, shape inference errors
        raise ExportError(f"{what} fails the ONNX checker: {str(exc).splitlines()[0]}") from None
    return files


def _write(model: Any, src: Path, scratch: Path, settings: QuantSettings, feeds: list[dict], nodes: Selection,
           ranges_dir: Path | None, log: Log) -> tuple[Any, str]:
    """(the Q/DQ graph, which writer made it): one row per (backend, precision)."""
    if settings.backend == "modelopt":
        return modelopt_qdq(src, scratch, settings.precision, feeds, settings.method,
                            [*nodes.excluded, *nodes.islands]), "modelopt"
    if settings.precision == "int8":
        kept = ranges_dir / "int8-ranges.json" if ranges_dir is not None else None
        out, ranges = int8_qdq(model, scratch, feeds, settings.method, nodes.chosen, nodes.islands, log,
                               ranges=kept if kept is not None and kept.is_file() else None, source=src)
        if kept is not None and ranges is not None and not kept.is_file():
            shutil.copyfile(ranges, kept)
        return out, "onnxruntime"
    kept = ranges_dir / "fp8-ranges.json" if ranges_dir is not None else None
    known = json.loads(kept.read_text()) if kept is not None and kept.is_file() else None
    out, amax = fp8_qdq(model, feeds, settings.method, nodes.chosen, log, ranges=known)
    if kept is not None and known is None:
        kept.write_text(json.dumps(amax))
    return out, "onnx-qdq"

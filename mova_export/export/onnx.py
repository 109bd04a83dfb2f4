"""Static ONNX graphs from torch modules and their fp16 variants, checked against their declaration.

Loaders in the Polygraphy style: `onnx_from_component` / `onnx_from_module` (torch module -> checked fp32 graph);
graph_io.py has the files, the declaration check and the fp16 variant.

Exporter: the TorchScript exporter (`dynamo=False`). The dynamo exporter gives smaller raw graphs but fails on the
SAM towers ("Failed to decompose the FX graph", measured on torch 2.13), so one exporter is used for every
component; onnxslim then folds the shape arithmetic the TorchScript exporter leaves behind.
"""
from __future__ import annotations

import contextlib
import shutil
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from ..core.errors import ExportError
from ..core.progress import Log, quiet
from .graph_io import PROTO_LIMIT, check_graph, save_model, weights_bytes

if TYPE_CHECKING:  # pragma: no cover
    import onnx
    import torch

    from ..components import ComponentSpec
    from ..core.spec import TensorSpec
    from ..source.config import MoVAConfig

OPSET = 18
EXPORTER = "torchscript"
SIMPLIFY_LIMIT = PROTO_LIMIT - (256 << 20)  # onnxslim works on the in-memory proto: graphs without external data

# ---------------------------------------------------------------------------------------------------------------
# torch -> ONNX

def example_args(inputs: Sequence["TensorSpec"], feed: dict[str, Any], name: str) -> tuple["torch.Tensor", ...]:
    """Positional example tensors for tracing, in the declared input order."""
    import torch

    args = []
    for t in inputs:
        if t.name not in feed:
            raise ExportError(f"{name}: example feed lacks input {t.name!r}")
        value = feed[t.name]
        args.append(value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value)))
    return tuple(args)


def dynamic_axes(specs: Sequence["TensorSpec"]) -> dict[str, dict[int, str]]:
    """torch.onnx.export's dynamic_axes for the declared symbolic dimensions (a str dim, e.g. text_length)."""
    return {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)} for t in specs
            if any(isinstance(d, str) for d in t.shape)}


def onnx_from_module(module: "torch.nn.Module", path: str | Path, inputs: Sequence["TensorSpec"],  # noqa: PLR0913 (exporter knobs)
                     outputs: Sequence["TensorSpec"], args: Sequence["torch.Tensor"], *, name: str,
                     opset: int = OPSET, simplify: bool = True, step: Callable[[str], None] = quiet,
                     log: Log = quiet) -> list[Path]:
    """Export a module to an ONNX graph at `path` with the declared inputs/outputs (static shapes except declared
    symbolic dimensions), checked and shape-inferred. `step(what)` is called after each phase (trace, simplify,
    check) for progress. Returns the written files (graph first, then its external data if any). Raises ExportError
    naming the graph when tracing, the checker, shape inference or the declaration disagree."""
    import onnx
    import torch

    if opset < 18:
        raise ExportError(f"opset {opset} is too old: LayerNormalization/Resize semantics need opset >= 18")
    path = Path(path)
    scratch = path.parent / f".{path.stem}.export"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    raw = scratch / "raw.onnx"
    try:
        start = time.perf_counter()
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")  # TracerWarnings on shape asserts, and the exporter's deprecation notes
            try:
                torch.onnx.export(module.eval(), tuple(args), str(raw), input_names=[t.name for t in inputs],
                                  output_names=[t.name for t in outputs], opset_version=opset, dynamo=False,
                                  do_constant_folding=True, dynamic_axes=dynamic_axes([*inputs, *outputs]) or None)
            except Exception as exc:
                raise ExportError(f"{name}: torch.onnx.export failed: {type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
        log(f"{name}: traced in {time.perf_counter() - start:.1f} s")
        step("trace")
        model = onnx.load(str(raw))  # pulls in the per-tensor files the exporter writes for >2 GB graphs
        shutil.rmtree(scratch, ignore_errors=True)
        if simplify and weights_bytes(model) < SIMPLIFY_LIMIT:
            model = _simplify(model, name, log)
        step("simplify")
        files = save_model(model, path)
        del model
        check_graph(path, inputs, outputs, name)
        step("check")
        return files
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def onnx_from_component(spec: "ComponentSpec", module: "torch.nn.Module", cfg: "MoVAConfig", path: str | Path, *,
                        feed: dict[str, Any] | None = None, opset: int = OPSET, simplify: bool = True,
                        log: Log = quiet) -> list[Path]:
    """onnx_from_module with the component's declared I/O, traced on `feed` (default: its seed-0 sample inputs)."""
    if feed is None:
        if spec.sample_inputs is None:
            raise ExportError(f"component {spec.name!r} declares no sample_inputs; cannot trace it")
        feed = spec.sample_inputs(cfg, 0)
    inputs = spec.inputs(cfg)
    return onnx_from_module(module, path, inputs, spec.outputs(cfg), example_args(inputs, feed, spec.name),
                            name=spec.name, opset=opset, simplify=simplify, log=log)


def _simplify(model: "onnx.ModelProto", name: str, log: Log) -> "onnx.ModelProto":
    """onnxslim: constant folding, shape-arithmetic elimination, dead nodes (no graph surgery of our own)."""
    try:
        import onnxslim
    except ImportError:  # optional: graphs are valid without it, only larger
        log(f"{name}: onnxslim not installed; graph left unsimplified")
        return model
    before = len(model.graph.node)
    with warnings.catch_warnings(), contextlib.redirect_stdout(None):
        warnings.simplefilter("ignore")
        slim = onnxslim.slim(model)
    log(f"{name}: onnxslim {before} -> {len(slim.graph.node)} nodes")
    return slim

"""Export one component: its graph(s) at fp32 and fp16, each proven against the PyTorch module on real images.

One call is one resumable unit of the build: everything goes into `unit_dir`, and the result (the graphs' entries
and the calibration feeds) is returned with unit-relative paths. `component_features` is the unit before it: the
component's outputs on the calibration images, which its own parity and the adapter's samples read.

A component exports as one or more graph forms. Towers and the text encoder have one (the module as it is); the
adapter's forms are the registry's (the dense seven-branch form today).
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from ..bundle.manifest import GraphEntry, Variant
from ..components import get_spec
from ..core.bert_inputs import text_inputs
from ..core.errors import ExportError
from ..core.image_inputs import preprocess_input
from ..core.progress import NULL, Console, Steps
from ..core.spec import GraphForm
from ..core.tolerance import ParityReport
from ..runners.ort import OrtRunner
from ..runners.pytorch import TorchRunner
from .fp16 import fp16_from_onnx, repair_fp16
from .graph_io import graph_files
from .onnx import example_args, onnx_from_module
from .samples import (
    UNROUTED,
    Sample,
    adapter_context,
    adapter_samples,
    as_numpy,
    random_samples,
    spot_check,
    text_feeds,
    validate_graph,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..core.facts import ModelFacts
    from ..source.checkpoint import Checkpoint
    from .calibration import CalibrationSet

EXPORT_PRECISIONS = ("fp32", "fp16")   # fp16 is every recipe's fallback, so one export serves every target
FEATURES = "features.npz"


def graph_forms(spec: Any, cfg: Any, facts: "ModelFacts") -> list[GraphForm]:
    """The graphs a component exports as: the forms its spec declares (the adapter), else its own I/O as one
    graph (a tower; the text encoder with its length buckets)."""
    if spec.forms is not None:
        return list(spec.forms(cfg))
    inputs, outputs = tuple(spec.inputs(cfg)), tuple(spec.outputs(cfg))
    if spec.kind == "tower":
        return [GraphForm(spec.name, "tower", inputs, outputs)]
    if spec.kind == "text":
        return [GraphForm(spec.name, "text", inputs, outputs, axes={"text_length": tuple(facts.text_buckets)})]
    raise ExportError(f"component {spec.name} ({spec.kind}) is not exported to ONNX")


@dataclass
class ExportedComponent:
    component: str
    graphs: list[GraphEntry]                    # variant paths relative to the unit folder
    calibration: dict[str, str]                 # graph -> unit-relative npz of real-image feeds (towers, text)
    seconds: float = 0.0
    calibration_labels: list[str] = field(default_factory=list)   # the image of each calibration feed
    checks: dict[str, str] = field(default_factory=dict)          # graph -> unit-relative npz of one real feed

    def to_json(self) -> dict[str, Any]:
        return {"component": self.component, "graphs": [g.to_json() for g in self.graphs],
                "calibration": self.calibration, "calibration_labels": self.calibration_labels,
                "checks": self.checks, "seconds": self.seconds}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> "ExportedComponent":
        return cls(raw["component"], [GraphEntry.from_json(g) for g in raw["graphs"]], dict(raw["calibration"]),
                   float(raw.get("seconds", 0.0)), list(raw.get("calibration_labels", [])),
                   dict(raw.get("checks", {})))


@dataclass
class ExportInputs:
    """What a component's export reads besides its own weights."""
    parity: "CalibrationSet"                    # the images every graph is proven on against PyTorch
    calibration: "CalibrationSet"               # every image: the towers' and the text encoder's calibration feeds
    facts: "ModelFacts"
    text_tokenizer: Any                         # BertTextTokenizer of the checkpoint's BERT vocab
    upstream: Mapping[str, Mapping[str, np.ndarray]] = field(default_factory=dict)  # component -> label -> features
    # on the parity images (the component's own, and for the adapter those of every tower and the text encoder)
    random_samples: int = 1
    full_sweep: bool = True


def _tower_samples(spec: Any, form: GraphForm, images: "CalibrationSet", facts: "ModelFacts") -> list[Sample]:

    rows = [facts.image_inputs[r.kind] for r in spec.image_inputs]
    out = []
    for label, rgb in images.images():
        arrays = [a for row in rows for a in preprocess_input(rgb, row, facts)]
        out.append(Sample(label, {t.name: as_numpy(a, t.dtype) for t, a in zip(form.inputs, arrays)}))
    return out


def _text_samples(images: "CalibrationSet", tokenizer: Any, facts: "ModelFacts") -> list[Sample]:
    """Each question at every bucket that holds it (label "<image>@<bucket>")."""
    out = []
    for label, question in zip(images.labels, images.questions):
        for bucket, feed in text_feeds(tokenizer, question, facts.text_buckets):
            out.append(Sample(f"{label}@{bucket}", feed))
    return out


def _wrapped(form: GraphForm, module: Any) -> Any:
    return module if form.wrap is None else form.wrap(module)


def _references(module: Any, form: GraphForm, samples: Sequence[Sample], steps: Steps,
                own: Mapping[str, np.ndarray] | None) -> None:
    """Each sample's reference outputs: the form's own reference (the adapter's: upstream's skipping forward), else
    the module. A real image's tower / text feature is the component's features unit output (computed once, with
    the text unpadded as upstream runs it), so it is not recomputed here; nor is the skipping reference of a mask fed
    with the unrouted experts' real features (`+unrouted`): that forward never reads them, so its outputs are those
    of the same image and mask with zeros there, computed just before."""
    runner = TorchRunner(_wrapped(form, module), [t.name for t in form.inputs], [t.name for t in form.outputs],
                         name=form.name)
    done: dict[str, dict[str, np.ndarray]] = {}
    for s in samples:
        image = s.label.split("@")[0]
        if s.label.endswith(UNROUTED) and s.label[: -len(UNROUTED)] in done:
            s.reference = done[s.label[: -len(UNROUTED)]]
        elif form.reference is not None:
            s.reference = form.reference(module, s.feed)
        elif own is not None and image in own and len(form.outputs) == 1:
            s.reference = {form.outputs[0].name: own[image]}
        else:
            s.reference = runner.infer(s.feed)
        done[s.label] = s.reference
        steps.advance(f"reference {s.label}")


def component_features(checkpoint: "Checkpoint", name: str, images: Sequence[tuple[str, np.ndarray]],
                       questions: Sequence[str], facts: "ModelFacts", text_tokenizer: Any,
                       console: Console = NULL) -> dict[str, np.ndarray]:
    """{image label: the component's first output}: a tower on the image's preprocessed inputs, the text encoder on
    the image's question unpadded (as upstream runs BERT for one question)."""
    import torch


    spec = get_spec(name)
    out: dict[str, np.ndarray] = {}
    with console.task(f"features {name}", total=len(images) + 1) as steps:
        module = checkpoint.build(name, dtype=torch.float32).eval()
        steps.advance("module built from the checkpoint")
        with torch.inference_mode():
            for (label, rgb), question in zip(images, questions):
                if spec.kind == "text":
                    ids, mask = text_inputs(text_tokenizer, question, facts.text_buckets)
                    used = int(mask.sum())
                    args = [torch.from_numpy(ids[:, :used]), torch.from_numpy(mask[:, :used])]
                else:
                    rows = [facts.image_inputs[r.kind] for r in spec.image_inputs]
                    args = [torch.from_numpy(a) for row in rows for a in preprocess_input(rgb, row, facts)]
                result = module(*args)
                out[label] = as_numpy((result[0] if isinstance(result, tuple) else result).float())
                steps.advance(label)
        del module
        gc.collect()
    return out


def export_component(checkpoint: "Checkpoint", name: str, unit_dir: Path, ins: ExportInputs, *,
                     precisions: Sequence[str] = EXPORT_PRECISIONS, simplify: bool = True,
                     console: Console = NULL) -> ExportedComponent:
    """Export every graph form of one component into unit_dir (graphs/, calibration/, checks/) and prove each
    variant against the torch module: the fp32 graph on every sample, fp16 on a spot check. Raises ExportError
    (export or parity failure) naming the graph, the sample and the figures."""
    import torch

    start = time.perf_counter()
    spec = get_spec(name)
    forms = graph_forms(spec, checkpoint.config, ins.facts)
    result = ExportedComponent(name, [], {}, calibration_labels=list(ins.calibration.labels))
    with console.task(f"export {name}", total=2) as steps:
        module = _Module(checkpoint.build(name, dtype=torch.float32).eval())
        steps.advance("module built from the checkpoint")
        for form in forms:
            job = _FormJob(spec, form, module, unit_dir, steps, console, last=form is forms[-1])
            real = _real_samples(job, ins)
            result.graphs.append(_export_form(job, real, ins, precisions, simplify, checkpoint.config))
            # one real feed (the first parity sample) for checking an engine against this graph on the device
            result.checks[form.name] = write_feeds(unit_dir / "checks" / f"{form.name}.npz",
                                                   [real[0].feed]).relative_to(unit_dir).as_posix()
            if form.role in ("tower", "text"):   # the adapter's come from every tower's features (quantize stage)
                feeds = _calibration_feeds(spec, form, ins)
                result.calibration[form.name] = write_feeds(unit_dir / "calibration" / f"{form.name}.npz",
                                                            feeds).relative_to(unit_dir).as_posix()
            steps.advance("calibration feeds")
        module.release()
    result.seconds = round(time.perf_counter() - start, 2)
    return result


class _Module:
    """The component's PyTorch module, released as soon as the last form is traced: at full size its fp32 weights
    (4.6 GB for DINOv2-giant) would otherwise sit beside the ONNX Runtime sessions that check the graphs."""

    def __init__(self, module: Any):
        self._module = module

    def get(self) -> Any:
        if self._module is None:
            raise ExportError("the component's module was released before its last graph was traced; this is a bug")
        return self._module

    def release(self) -> None:
        self._module = None
        gc.collect()


@dataclass
class _FormJob:
    """One graph form of a component being exported: what every step of it reads."""
    spec: Any
    form: GraphForm
    module: _Module
    unit_dir: Path
    steps: Steps
    console: Console
    last: bool = True                       # the component's last form: its module is released after the trace


def _real_samples(job: _FormJob, ins: ExportInputs) -> list[Sample]:
    """The form's samples on the parity images: preprocessed pictures, questions at every bucket, adapter masks."""
    if job.form.role == "tower":
        return _tower_samples(job.spec, job.form, ins.parity, ins.facts)
    if job.form.role == "text":
        return _text_samples(ins.parity, ins.text_tokenizer, ins.facts)
    return adapter_samples(job.form, adapter_context(ins.upstream, ins.facts, ins.full_sweep), list(ins.parity.labels))


def _export_form(job: _FormJob, real: list[Sample], ins: ExportInputs, precisions: Sequence[str], simplify: bool,
                 cfg: Any) -> GraphEntry:
    """Trace the form to its fp32 graph, convert the other precisions, and prove each variant on its samples."""
    form, name = job.form, job.spec.name
    # seeded random feeds: the form's own, else the spec's for a form of the spec's I/O
    own_io = tuple(form.inputs) == tuple(job.spec.inputs(cfg))
    samples = real + (random_samples(job.spec, cfg, form.inputs, ins.random_samples, form.sample_inputs)
                      if form.sample_inputs is not None or own_io else [])
    checked16 = spot_check(samples)
    # references, trace + slim + check, fp32 parity, fp16 conversion, fp16 parity, calibration feeds
    job.steps.grow(len(samples) * 2 + 3 + 1 + len(checked16) + 1)
    _references(job.module.get(), form, samples, job.steps, ins.upstream.get(name))
    entry = GraphEntry(form.name, name, form.role, list(form.inputs), list(form.outputs),
                       axes={k: list(v) for k, v in form.axes.items()}, form=form.form)
    fp32 = job.unit_dir / "graphs" / f"{form.name}.fp32.onnx"
    t0 = time.perf_counter()
    onnx_from_module(_wrapped(form, job.module.get()), fp32, form.inputs, form.outputs,
                     example_args(form.inputs, samples[0].feed, form.name), name=form.name, simplify=simplify,
                     step=job.steps.advance, log=job.console.line)
    build_s = time.perf_counter() - t0
    if job.last:
        job.module.release()
    for precision in precisions:
        path = job.unit_dir / "graphs" / f"{form.name}.{precision}.onnx"
        if precision == "fp32":
            variant = _proven_variant(job, path, precision, samples, build_s)
        else:
            variant = _fp16_variant(job, fp32, path, checked16)
        if variant is None:
            entry.missing[precision] = (f"the {precision} graph misses its parity tolerance even with its most "
                                        "error-adding blocks or nodes kept in fp32 (the export log has the figures)")
            continue
        entry.variants[precision] = variant
        entry.proven[precision] = variant.min_cosine()
        gc.collect()
    return entry


def _fp16_variant(job: _FormJob, fp32: Path, path: Path, checked: Sequence[Sample]) -> Variant | None:
    """The fp16 graph proven on its samples; when it misses the fp16 tolerance, repaired by keeping the nodes that
    lose the most precision in fp32 (export/fp16.py); None when that fails too (the component ships no fp16)."""
    form = job.form
    t0 = time.perf_counter()
    fp16_from_onnx(fp32, path, form.inputs, form.outputs, form.name, log=job.console.line)
    job.steps.advance("fp16 graph")
    report = _report(job, path, "fp16", checked)
    repair = None
    if not report.passed:
        job.console.line(f"{form.name} [fp16] misses its tolerance ({report.failures()[0]}); keeping the nodes "
                         "that lose the most precision in fp32")
        latest = [report]

        def convert(kept: Sequence[str]) -> None:
            job.steps.grow(len(checked))                    # each try is one more parity pass
            fp16_from_onnx(fp32, path, form.inputs, form.outputs, form.name, log=job.console.line, keep_fp32=kept)

        def passes() -> tuple[bool, dict[str, float]]:
            latest[0] = _report(job, path, "fp16", checked)
            return latest[0].passed, latest[0].summary()

        repair = repair_fp16(fp32, path, [s.feed for s in checked], convert, passes, log=job.console.line)
        report = latest[0]
        if not repair.ok:
            job.console.line(f"{form.name} [fp16]: not shipped, still {report.failures()[0]} with "
                             f"{repair.tries[-1]['kept'] if repair.tries else 'nothing'} kept in fp32")
            for f in graph_files(path):
                f.unlink(missing_ok=True)
            return None
        job.console.line(f"{form.name} [fp16]: within tolerance with {repair.tries[-1]['kept']} kept in fp32 "
                         f"({len(repair.kept_fp32)} nodes)")
    variant = _variant(job, path, report, time.perf_counter() - t0)
    if repair is not None:
        variant.decision = {"fp16_repair": repair.to_json()}
    return variant


def _report(job: _FormJob, path: Path, precision: str, checked: Sequence[Sample]) -> ParityReport:
    """The graph at `path` against the samples' references (unchecked), logged in one line."""
    runner = OrtRunner(path, name=f"{job.form.name}.{precision}")
    report = validate_graph(runner, checked, job.form.name, precision,
                            step=lambda: job.steps.advance(f"{precision} parity"), check=False)
    job.console.line(f"{job.form.name} [{precision}] {len(checked)} samples: " +
                     "; ".join(f"{out}: {fig.describe()}" for out, fig in report.per_output().items()))
    return report


def _proven_variant(job: _FormJob, path: Path, precision: str, checked: Sequence[Sample], build_s: float
                    ) -> Variant:
    """The variant at `path` checked against the samples' references (ExportError naming every miss)."""
    t0 = time.perf_counter()
    report = _report(job, path, precision, checked).check()
    return _variant(job, path, report, build_s, time.perf_counter() - t0)


def _variant(job: _FormJob, path: Path, report: ParityReport, build_s: float, validate_s: float = 0.0) -> Variant:
    files = graph_files(path)
    return Variant(graph=path.relative_to(job.unit_dir).as_posix(),
                   files=[f.relative_to(job.unit_dir).as_posix() for f in files],
                   bytes=sum(f.stat().st_size for f in files), nodes=_node_count(path), parity=report.to_json(),
                   build_s=round(build_s, 2), validate_s=round(validate_s, 2))


def _calibration_feeds(spec: Any, form: GraphForm, ins: ExportInputs) -> list[dict[str, np.ndarray]]:
    """One real feed per calibration image for a quantizer: a tower's preprocessed image, the text encoder's question
    at one common bucket (the smallest that holds every question)."""
    if form.role == "tower":
        return [s.feed for s in _tower_samples(spec, form, ins.calibration, ins.facts)]
    by_image: dict[str, dict[int, Sample]] = {}
    for s in _text_samples(ins.calibration, ins.text_tokenizer, ins.facts):
        image, bucket = s.label.rsplit("@", 1)
        by_image.setdefault(image, {})[int(bucket)] = s
    common = max(min(buckets) for buckets in by_image.values())
    return [by_image[label][common].feed for label in ins.calibration.labels]


def write_feeds(path: Path, feeds: Sequence[Mapping[str, np.ndarray]]) -> Path:
    """The feeds stacked on a new leading axis per input name (what read_feeds reads back)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(feeds[0])
    np.savez(path, **{k: np.stack([f[k] for f in feeds]) for k in keys})
    return path


def read_features(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def _node_count(path: Path) -> int:
    import onnx

    return len(onnx.load(str(path), load_external_data=False).graph.node)

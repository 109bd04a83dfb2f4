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
from ..components import get_spec, one_of_kind
from ..core.bert_inputs import text_inputs
from ..core.errors import ExportError
from ..core.image_inputs import preprocess_input
from ..core.progress import NULL, Console, Steps
from ..core.prompts import mask_label
from ..core.slots import fill_slots
from ..core.spec import GraphForm
from ..runners.ort import OrtRunner
from ..runners.pytorch import TorchRunner
from .graph_io import fp16_from_onnx, graph_files
from .onnx import example_args, onnx_from_module
from .samples import (
    AdapterContext,
    Sample,
    as_numpy,
    random_samples,
    spot_check,
    sweep_masks,
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


def adapter_context(features: Mapping[str, Mapping[str, np.ndarray]], facts: "ModelFacts",
                    full_sweep: bool = True) -> AdapterContext:
    """The adapter's inputs on some images: {component: {image label: features}} of the base, every expert and the
    text encoder."""

    text = one_of_kind("text").name
    missing = [c for c in [facts.base.component, *(e.component for e in facts.experts), text] if c not in features]
    if missing:
        raise ExportError(f"the adapter's samples need the features of {', '.join(missing)}; export those "
                          "components first (the build does it in order)")
    channels = [next(iter(features[e.component].values())).shape[-1] for e in facts.experts]
    return AdapterContext(features[facts.base.component], [features[e.component] for e in facts.experts],
                          features[text], facts.letters, facts.topk_experts, full_sweep, channels)


def _adapter_feed(form: GraphForm, ctx: AdapterContext, label: str, mask: Sequence[int],
                  zero_unrouted: bool = True) -> dict[str, np.ndarray]:
    """One image's feed of an adapter form: the routing form's base alone; the slot form's base, slots (fill_slots),
    text and mask; the dense form's base, every expert's features (zeros for unrouted ones, or their real features
    to show they cannot leak), text and mask."""

    specs = {t.name: t for t in form.inputs}
    out = {"base": as_numpy(ctx.base[label], specs["base"].dtype)}
    if form.role == "adapter_routing":
        return out
    out["text_features"] = as_numpy(ctx.text[label], specs["text_features"].dtype)
    if form.role == "adapter_answer":
        features = {j: ctx.experts[j][label] for j, on in enumerate(mask) if on}
        slots = fill_slots(mask, features, specs["slot_expert"].shape[0], ctx.channels, specs["base"].shape[1])
        return {**out, **slots}
    for j, letter in enumerate(ctx.letters):
        t = specs[f"expert_{letter}"]
        out[t.name] = (np.zeros(t.shape, t.dtype) if zero_unrouted and not mask[j]
                       else as_numpy(ctx.experts[j][label], t.dtype))
    out["routing_mask"] = np.asarray([mask], dtype=specs["routing_mask"].dtype)
    return out


def _adapter_samples(form: GraphForm, ctx: AdapterContext, labels: Sequence[str]) -> list[Sample]:
    """The masks each form serves, on image 0 every one of them (the first a full top-K mask, the trace example),
    on the other images one (and, for the dense graph, with every expert's real features in place).
    routing: the empty mask; slots: every sweep mask with 1..topk experts; dense: masks with more than topk."""
    if form.role == "adapter_routing":
        return [Sample(f"{label}/none", _adapter_feed(form, ctx, label, (0,) * len(ctx.letters))) for label in labels]
    many = form.role == "adapter_fallback"
    masks = ctx.wide_masks() if many else [m for m in sweep_masks(ctx.letters, ctx.topk, ctx.full_sweep) if any(m)]
    samples = []
    for i, label in enumerate(labels):
        first = ctx.wide_masks()[i % len(ctx.wide_masks())] if many else ctx.top_mask(i)
        chosen = [first] + [m for m in masks if m != first] if i == 0 else [first]
        samples += [Sample(f"{label}/{mask_label(m, ctx.letters)}", _adapter_feed(form, ctx, label, m)) for m in chosen]
        if many and i > 0:
            samples.append(Sample(f"{label}/{mask_label(first, ctx.letters)}+unrouted",
                                  _adapter_feed(form, ctx, label, first, zero_unrouted=False)))
    return samples


def _wrapped(form: GraphForm, module: Any) -> Any:
    return module if form.wrap is None else form.wrap(module)


def _references(module: Any, form: GraphForm, samples: Sequence[Sample], steps: Steps,
                own: Mapping[str, np.ndarray] | None) -> None:
    """Each sample's reference outputs: the form's own reference (the adapter's: upstream's skipping forward), else
    the module. A real image's tower / text feature is the component's features unit output (computed once, with
    the text unpadded as upstream runs it), so it is not recomputed here."""

    runner = TorchRunner(_wrapped(form, module), [t.name for t in form.inputs], [t.name for t in form.outputs],
                         name=form.name)
    for s in samples:
        image = s.label.split("@")[0]
        if form.reference is not None:
            s.reference = form.reference(module, s.feed)
        elif own is not None and image in own and len(form.outputs) == 1:
            s.reference = {form.outputs[0].name: own[image]}
        else:
            s.reference = runner.infer(s.feed)
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
        module = checkpoint.build(name, dtype=torch.float32).eval()
        steps.advance("module built from the checkpoint")
        for form in forms:
            job = _FormJob(spec, form, module, unit_dir, steps, console)
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
        del module
        gc.collect()
    result.seconds = round(time.perf_counter() - start, 2)
    return result


@dataclass
class _FormJob:
    """One graph form of a component being exported: what every step of it reads."""
    spec: Any
    form: GraphForm
    module: Any
    unit_dir: Path
    steps: Steps
    console: Console


def _real_samples(job: _FormJob, ins: ExportInputs) -> list[Sample]:
    """The form's samples on the parity images: preprocessed pictures, questions at every bucket, adapter masks."""
    if job.form.role == "tower":
        return _tower_samples(job.spec, job.form, ins.parity, ins.facts)
    if job.form.role == "text":
        return _text_samples(ins.parity, ins.text_tokenizer, ins.facts)
    return _adapter_samples(job.form, adapter_context(ins.upstream, ins.facts, ins.full_sweep), list(ins.parity.labels))


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
    _references(job.module, form, samples, job.steps, ins.upstream.get(name))
    entry = GraphEntry(form.name, name, form.role, list(form.inputs), list(form.outputs),
                       axes={k: list(v) for k, v in form.axes.items()}, form=form.form)
    fp32 = job.unit_dir / "graphs" / f"{form.name}.fp32.onnx"
    t0 = time.perf_counter()
    onnx_from_module(_wrapped(form, job.module), fp32, form.inputs, form.outputs,
                     example_args(form.inputs, samples[0].feed, form.name), name=form.name, simplify=simplify,
                     step=job.steps.advance, log=job.console.line)
    build_s = time.perf_counter() - t0
    for precision in precisions:
        path = job.unit_dir / "graphs" / f"{form.name}.{precision}.onnx"
        if precision != "fp32":
            t0 = time.perf_counter()
            fp16_from_onnx(fp32, path, form.inputs, form.outputs, form.name, log=job.console.line)
            build_s = time.perf_counter() - t0
            job.steps.advance(f"{precision} graph")
        entry.variants[precision] = _proven_variant(job, path, precision,
                                                    samples if precision == "fp32" else checked16, build_s)
        entry.proven[precision] = entry.variants[precision].min_cosine()
        gc.collect()
    return entry


def _proven_variant(job: _FormJob, path: Path, precision: str, checked: Sequence[Sample], build_s: float
                    ) -> Variant:
    """The variant at `path` checked against the samples' references (ExportError naming every miss)."""
    t0 = time.perf_counter()
    report = validate_graph(OrtRunner(path, name=f"{job.form.name}.{precision}"), checked, job.form.name, precision,
                            step=lambda: job.steps.advance(f"{precision} parity"))
    validate_s = time.perf_counter() - t0
    job.console.line(f"{job.form.name} [{precision}] {len(checked)} samples: " +
                     "; ".join(f"{out}: {fig.describe()}" for out, fig in report.per_output().items()))
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


def adapter_calibration_feeds(form: GraphForm, features: Mapping[str, Mapping[str, np.ndarray]],
                              facts: "ModelFacts", labels: Sequence[str]) -> list[dict[str, np.ndarray]]:
    """One feed per image for quantizing an adapter form: the masks this form serves (a top-K mask rotated per
    image; masks of more than K experts for the dense graph) with every expert's real features."""
    ctx = adapter_context(features, facts)
    masks = ctx.wide_masks() if form.role == "adapter_fallback" else [ctx.top_mask(i) for i in range(len(labels))]
    return [_adapter_feed(form, ctx, label, masks[i % len(masks)], zero_unrouted=False)
            for i, label in enumerate(labels)]


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

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
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from ..bundle.manifest import GraphEntry, Variant
from ..errors import ExportError
from ..progress import NULL, Console, Steps
from ..prompts import mask_label
from .onnx import example_args, fp16_from_onnx, graph_files, onnx_from_module
from .samples import AdapterContext, Sample, as_numpy, random_samples, spot_check, sweep_masks, text_feeds, \
    validate_graph

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..checkpoint import Checkpoint
    from ..facts import ModelFacts
    from ..spec import TensorSpec

EXPORT_PRECISIONS = ("fp32", "fp16")   # fp16 is every recipe's fallback, so one export serves every target
FEATURES = "features.npz"


@dataclass(frozen=True)
class GraphForm:
    """One exported graph of a component: its name in the bundle, its role in the two passes, its declared I/O and
    how the component module becomes the module that is traced."""
    name: str
    role: str                                   # tower | text | adapter_routing | adapter_answer
    inputs: tuple["TensorSpec", ...]
    outputs: tuple["TensorSpec", ...]
    wrap: Callable[["torch.nn.Module"], "torch.nn.Module"] = lambda module: module
    axes: Mapping[str, Sequence[int]] = field(default_factory=dict)
    form: str | None = None


def graph_forms(spec: Any, cfg: Any, facts: "ModelFacts") -> list[GraphForm]:
    """The graphs a component exports as."""
    inputs, outputs = tuple(spec.inputs(cfg)), tuple(spec.outputs(cfg))
    if spec.kind == "tower":
        return [GraphForm(spec.name, "tower", inputs, outputs)]
    if spec.kind == "text":
        return [GraphForm(spec.name, "text", inputs, outputs, axes={"text_length": list(facts.text_buckets)})]
    if spec.kind == "adapter":
        return [GraphForm(spec.name, "adapter_answer", inputs, outputs, form="dense")]
    raise ExportError(f"component {spec.name} ({spec.kind}) is not exported to ONNX")


@dataclass
class ExportedComponent:
    component: str
    graphs: list[GraphEntry]                    # variant paths relative to the unit folder
    calibration: dict[str, str]                 # graph -> unit-relative npz of real-image feeds
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"component": self.component, "graphs": [g.to_json() for g in self.graphs],
                "calibration": self.calibration, "seconds": self.seconds}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> "ExportedComponent":
        return cls(raw["component"], [GraphEntry.from_json(g) for g in raw["graphs"]], dict(raw["calibration"]),
                   float(raw.get("seconds", 0.0)))


@dataclass
class ExportInputs:
    """What a component's export reads besides its own weights."""
    images: Sequence[tuple[str, np.ndarray]]    # (label, HxWx3 uint8): parity and calibration images
    questions: Sequence[str]                    # one per image
    facts: "ModelFacts"
    text_tokenizer: Any                         # text.BertTextTokenizer of the checkpoint's BERT vocab
    upstream: Mapping[str, Mapping[str, np.ndarray]] = field(default_factory=dict)  # component -> label -> features
    # (the component's own features, and for the adapter those of every tower and the text encoder)
    random_samples: int = 1
    full_sweep: bool = True


def _tower_samples(spec: Any, form: GraphForm, ins: ExportInputs, cfg: Any) -> list[Sample]:
    from ..preprocess import preprocess_input

    rows = [ins.facts.image_inputs[r.kind] for r in spec.image_inputs]
    out = []
    for label, rgb in ins.images:
        arrays = [a for row in rows for a in preprocess_input(rgb, row, ins.facts)]
        out.append(Sample(label, {t.name: as_numpy(a, t.dtype) for t, a in zip(form.inputs, arrays)}))
    return out


def _text_samples(form: GraphForm, ins: ExportInputs) -> list[Sample]:
    out = []
    for (label, _), question in zip(ins.images, ins.questions):
        for bucket, feed in text_feeds(ins.text_tokenizer, question, ins.facts.text_buckets):
            out.append(Sample(f"{label}@{bucket}", feed))
    return out


def _adapter_context(ins: ExportInputs) -> AdapterContext:
    from ..components import one_of_kind

    facts = ins.facts
    text = one_of_kind("text").name
    missing = [c for c in [facts.base.component, *(e.component for e in facts.experts), text]
               if c not in ins.upstream]
    if missing:
        raise ExportError(f"the adapter's parity samples need the features of {', '.join(missing)}; export those "
                          "components first (the build does it in order)")
    return AdapterContext(ins.upstream[facts.base.component], [ins.upstream[e.component] for e in facts.experts],
                          ins.upstream[text], facts.letters, facts.topk_experts, ins.full_sweep)


def _dense_feed(form: GraphForm, ctx: AdapterContext, label: str, mask: Sequence[int],
                zero_unrouted: bool) -> dict[str, np.ndarray]:
    """The dense adapter's feed (base, expert features A.., text, mask) of one image."""
    count = len(ctx.letters)
    out = {form.inputs[0].name: as_numpy(ctx.base[label], form.inputs[0].dtype)}
    for j, t in enumerate(form.inputs[1:1 + count]):
        out[t.name] = (np.zeros(t.shape, t.dtype) if zero_unrouted and not mask[j]
                       else as_numpy(ctx.experts[j][label], t.dtype))
    text, mask_spec = form.inputs[-2], form.inputs[-1]
    out[text.name] = as_numpy(ctx.text[label], text.dtype)
    out[mask_spec.name] = np.asarray([mask], dtype=mask_spec.dtype)
    return out


def _dense_adapter_samples(form: GraphForm, ctx: AdapterContext, labels: Sequence[str]) -> list[Sample]:
    """Image 0: every sweep mask, unrouted experts fed as zeros (as the runtime does); the trace example comes first
    (a full top-K mask). Other images: a top-K mask and the empty mask with every expert's real features in place,
    which shows that unrouted features cannot leak into the output."""
    masks = sweep_masks(ctx.letters, ctx.topk, ctx.full_sweep)
    samples = []
    for i, label in enumerate(labels):
        top = ctx.top_mask(i)
        if i == 0:
            chosen = [top] + [m for m in masks if m != top]
            samples += [Sample(f"{label}/{mask_label(m, ctx.letters)}", _dense_feed(form, ctx, label, m, True))
                        for m in chosen]
        else:
            samples += [Sample(f"{label}/{mask_label(m, ctx.letters)}+unrouted", _dense_feed(form, ctx, label, m, False))
                        for m in (top, masks[0])]
    return samples


def _adapter_reference(module: Any, form: GraphForm, feed: Mapping[str, np.ndarray], count: int
                       ) -> dict[str, np.ndarray]:
    """The skipping reference: upstream's B == 1 inference gets None for unrouted experts."""
    import torch

    names = [t.name for t in form.inputs]
    tensors = [torch.from_numpy(np.ascontiguousarray(feed[n])) for n in names]
    base, experts, text, mask = tensors[0], tensors[1:1 + count], tensors[-2], tensors[-1]
    routed = [e if m else None for e, m in zip(experts, mask[0].tolist())]
    with torch.inference_mode():
        out = module.forward_reference(base, routed, text, mask)
    return {t.name: as_numpy(o.float()) for t, o in zip(form.outputs, out)}


def _references(module: Any, form: GraphForm, samples: Sequence[Sample], count: int, steps: Steps,
                own: Mapping[str, np.ndarray] | None) -> None:
    """Each sample's reference outputs. A real image's tower / text feature is the component's features unit output
    (computed once, with the text unpadded as upstream runs it), so it is not recomputed here."""
    from ..reference.runners import TorchRunner

    runner = TorchRunner(form.wrap(module), [t.name for t in form.inputs], [t.name for t in form.outputs],
                         name=form.name)
    for s in samples:
        image = s.label.split("@")[0]
        if form.role == "adapter_answer":
            s.reference = _adapter_reference(module, form, s.feed, count)
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

    from ..components import get_spec
    from ..preprocess import preprocess_input
    from ..text import text_inputs

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
    """Export every graph form of one component into unit_dir (graphs/, calibration/) and prove each
    variant against the torch module: the fp32 graph on every sample, fp16 on a spot check. Raises ExportError
    (export or parity failure) naming the graph, the sample and the figures."""
    import torch

    from ..components import get_spec
    from ..runtime.runners import OrtRunner

    start = time.perf_counter()
    spec = get_spec(name)
    cfg = checkpoint.config
    forms = graph_forms(spec, cfg, ins.facts)
    count = len(ins.facts.experts)
    labels = [label for label, _ in ins.images]
    result = ExportedComponent(name, [], {})
    with console.task(f"export {name}", total=2) as steps:
        module = checkpoint.build(name, dtype=torch.float32).eval()
        steps.advance("module built from the checkpoint")
        for form in forms:
            if form.role == "tower":
                real = _tower_samples(spec, form, ins, cfg)
            elif form.role == "text":
                real = _text_samples(form, ins)
            else:
                real = _dense_adapter_samples(form, _adapter_context(ins), labels)
            samples = real + random_samples(spec, cfg, form.inputs, ins.random_samples)
            checked16 = spot_check(samples)
            # references, trace + slim + check, fp32 parity, fp16 conversion, fp16 parity, calibration feeds
            steps.grow(len(samples) * 2 + 3 + 1 + len(checked16) + 1)
            _references(module, form, samples, count, steps, ins.upstream.get(name))
            entry = GraphEntry(form.name, name, form.role, list(form.inputs), list(form.outputs),
                               axes={k: list(v) for k, v in form.axes.items()}, form=form.form)
            paths = {"fp32": unit_dir / "graphs" / f"{form.name}.fp32.onnx"}
            t0 = time.perf_counter()
            onnx_from_module(form.wrap(module), paths["fp32"], form.inputs, form.outputs,
                             example_args(form.inputs, samples[0].feed, form.name), name=form.name,
                             simplify=simplify, step=lambda what: steps.advance(what), log=console.line)
            build_s = {"fp32": time.perf_counter() - t0}
            for precision in precisions:
                if precision != "fp32":
                    t0 = time.perf_counter()
                    paths[precision] = unit_dir / "graphs" / f"{form.name}.{precision}.onnx"
                    fp16_from_onnx(paths["fp32"], paths[precision], form.inputs, form.outputs, form.name,
                                   log=console.line)
                    build_s[precision] = time.perf_counter() - t0
                    steps.advance(f"{precision} graph")
                checked = samples if precision == "fp32" else checked16
                t0 = time.perf_counter()
                report = validate_graph(OrtRunner(paths[precision], name=f"{form.name}.{precision}"), checked,
                                        form.name, precision, step=lambda: steps.advance(f"{precision} parity"))
                validate_s = time.perf_counter() - t0
                console.line(f"{form.name} [{precision}] {len(checked)} samples: " +
                             "; ".join(f"{out}: {fig.describe()}" for out, fig in report.per_output().items()))
                files = graph_files(paths[precision])
                entry.variants[precision] = Variant(
                    graph=paths[precision].relative_to(unit_dir).as_posix(),
                    files=[f.relative_to(unit_dir).as_posix() for f in files],
                    bytes=sum(f.stat().st_size for f in files), nodes=_node_count(paths[precision]),
                    parity=report.to_json(), build_s=round(build_s[precision], 2), validate_s=round(validate_s, 2))
                entry.proven[precision] = entry.variants[precision].min_cosine()
                gc.collect()
            result.graphs.append(entry)
            result.calibration[form.name] = _write_feeds(unit_dir / "calibration" / f"{form.name}.npz",
                                                         _calibration_feeds(form, real, ins)).relative_to(
                unit_dir).as_posix()
            steps.advance("calibration feeds")
        del module
        gc.collect()
    result.seconds = round(time.perf_counter() - start, 2)
    return result


def _calibration_feeds(form: GraphForm, real: Sequence[Sample], ins: ExportInputs) -> list[Sample]:
    """One real feed per image for a quantizer: the towers' as sampled, the text encoder's at one common bucket,
    the dense adapter's with every expert's real features and a top-K mask."""
    labels = [label for label, _ in ins.images]
    if form.role == "adapter_answer":
        ctx = _adapter_context(ins)
        return [Sample(label, _dense_feed(form, ctx, label, ctx.top_mask(i), False)) for i, label in enumerate(labels)]
    if form.role == "text":   # every question at one length, the smallest bucket that holds them all
        by_image: dict[str, dict[int, Sample]] = {}
        for s in real:
            image, bucket = s.label.split("@")
            by_image.setdefault(image, {})[int(bucket)] = s
        common = max(min(buckets) for buckets in by_image.values())
        return [buckets[common] for buckets in by_image.values()]
    return list(real)


def _write_feeds(path: Path, feeds: Sequence[Sample]) -> Path:
    """The feeds stacked on a new leading axis per input name (calibration-ready)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(feeds[0].feed)
    np.savez(path, **{k: np.stack([f.feed[k] for f in feeds]) for k in keys})
    return path


def read_features(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def _node_count(path: Path) -> int:
    import onnx

    return len(onnx.load(str(path), load_external_data=False).graph.node)

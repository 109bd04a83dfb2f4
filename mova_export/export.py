"""Static ONNX graphs from components, their fp16 variants, and the parity proof of each.

Loaders in the Polygraphy style: `onnx_from_component` (torch module -> checked fp32 graph), `fp16_from_onnx`
(fp32 graph -> fp16 graph with fp32 islands), `check_graph` (graph vs the spec declaration), `validate_graph`
(graph vs the torch module on real and random samples).

Exporter: the TorchScript exporter (`dynamo=False`). The dynamo exporter gives smaller raw graphs but fails on the
SAM towers ("Failed to decompose the FX graph", shared/notes/onnx-quant.md), so one exporter is used for every
component; onnxslim then folds the shape arithmetic the TorchScript exporter leaves behind.
"""
from __future__ import annotations

import contextlib
import re
import shutil
import time
import warnings
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np

from .errors import ExportError
from .validate import Parity, ParityReport, parity, tolerance_for

if TYPE_CHECKING:  # pragma: no cover
    import onnx
    import torch

    from .components import ComponentSpec, TensorSpec
    from .config import MoVAConfig

OPSET = 18
EXPORTER = "torchscript"
PRECISIONS = ("fp32", "fp16")
PROTO_LIMIT = 2**31 - 1          # protobuf's hard limit: larger graphs keep their weights in one external file
SIMPLIFY_LIMIT = PROTO_LIMIT - (256 << 20)  # onnxslim works on the in-memory proto: graphs without external data
# Ops with data-dependent control flow or output shapes: a static graph has none.
DYNAMIC_OPS = frozenset({"If", "Loop", "Scan", "NonZero", "Unique", "Compress", "NonMaxSuppression"})

# fp16 conversion keeps these in fp32 (as the reference computes them): the bilinear alignment, norms and softmax
# (the gate softmax with its -1e6 logits; attention softmax too, which costs two casts and protects against overflow).
FP32_OPS = ("Resize", "LayerNormalization", "GroupNormalization", "InstanceNormalization", "Softmax",
            "ReduceMean", "Pow", "Sqrt", "Reciprocal")
# Decomposed norms (SAM's channels-first LayerNorm, Pix2Struct's RMSNorm) show up as elementwise nodes under a
# module scope whose name contains "norm"; their weight-free arithmetic stays fp32 too.
_NORM_SCOPE = re.compile(r"/[^/]*norm[^/]*/", re.IGNORECASE)
_NORM_SCOPE_OPS = frozenset({"Sub", "Add", "Mul", "Div", "Sqrt", "Pow", "ReduceMean", "Reciprocal", "Cast"})


Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


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


def _weights_bytes(model: "onnx.ModelProto") -> int:
    return sum(t.ByteSize() for t in model.graph.initializer)


def _too_large(model: "onnx.ModelProto") -> bool:
    """True when the proto cannot be one file (2 GB protobuf limit, with a margin for the graph itself)."""
    return _weights_bytes(model) > PROTO_LIMIT - (256 << 20) or model.ByteSize() > PROTO_LIMIT - (64 << 20)


def save_model(model: "onnx.ModelProto", path: Path) -> list[Path]:
    """Save a graph; weights go to one `<name>.data` file beside it when the proto would pass 2 GB."""
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    if _too_large(model):
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
        data.chmod(0o644)  # onnx creates it owner-only; a bundle is meant to be copied and read by others
    else:
        onnx.save_model(model, str(path))
    return graph_files(path)


# ---------------------------------------------------------------------------------------------------------------
# torch -> ONNX

def example_args(spec: "ComponentSpec", cfg: "MoVAConfig", feed: dict[str, Any] | None = None,
                 seed: int = 0) -> tuple["torch.Tensor", ...]:
    """Positional example tensors for tracing: `feed` if given, else the spec's sample inputs."""
    import torch

    inputs = spec.inputs(cfg)
    if feed is None:
        if spec.sample_inputs is None:
            raise ExportError(f"component {spec.name!r} declares no sample_inputs; cannot trace it")
        feed = spec.sample_inputs(cfg, seed)
    args = []
    for t in inputs:
        if t.name not in feed:
            raise ExportError(f"{spec.name}: example feed lacks input {t.name!r}")
        value = feed[t.name]
        args.append(value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value)))
    return tuple(args)


def onnx_from_component(spec: "ComponentSpec", module: "torch.nn.Module", cfg: "MoVAConfig", path: str | Path, *,
                        feed: dict[str, Any] | None = None, opset: int = OPSET, simplify: bool = True,
                        log: Log = _quiet) -> list[Path]:
    """Export one component's module to a static-shape ONNX graph at `path`, checked and shape-inferred.

    Returns the written files (graph first, then its external data if any). Raises ExportError naming the component
    when tracing, the checker, shape inference or the declared inputs/outputs disagree.
    """
    import onnx
    import torch

    if opset < 18:
        raise ExportError(f"opset {opset} is too old: LayerNormalization/Resize semantics need opset >= 18")
    path = Path(path)
    inputs, outputs = spec.inputs(cfg), spec.outputs(cfg)
    args = example_args(spec, cfg, feed)
    scratch = path.parent / f".{path.stem}.export"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    raw = scratch / "raw.onnx"
    try:
        start = time.perf_counter()
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")  # TracerWarnings on shape asserts, and the exporter's deprecation notes
            try:
                torch.onnx.export(module.eval(), args, str(raw), input_names=[t.name for t in inputs],
                                  output_names=[t.name for t in outputs], opset_version=opset, dynamo=False,
                                  do_constant_folding=True)
            except Exception as exc:
                raise ExportError(f"{spec.name}: torch.onnx.export failed: {type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
        log(f"{spec.name}: traced in {time.perf_counter() - start:.1f} s")
        model = onnx.load(str(raw))  # pulls in the per-tensor files the exporter writes for >2 GB graphs
        shutil.rmtree(scratch, ignore_errors=True)
        if simplify and _weights_bytes(model) < SIMPLIFY_LIMIT:
            model = _simplify(model, spec.name, log)
        files = save_model(model, path)
        del model
        check_graph(path, inputs, outputs, spec.name)
        return files
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


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


def _value_shape_dtype(value: Any) -> tuple[tuple, str]:
    import onnx

    tensor = value.type.tensor_type
    dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim)
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)).name if tensor.elem_type else "?"
    return dims, dtype


def _fmt(items: list[tuple]) -> str:
    return "[" + ", ".join(f"{n}{list(s)}:{d}" for n, s, d in items) + "]"


# ---------------------------------------------------------------------------------------------------------------
# fp32 -> fp16

def _toposorted(model: "onnx.ModelProto") -> "onnx.ModelProto":
    """The float16 converter appends its Cast nodes at the end; onnx_ir puts the graph back in topological order."""
    import onnx_ir as ir

    graph = ir.from_proto(model)
    graph.graph.sort()
    return ir.to_proto(graph)


def fp16_block_nodes(model: "onnx.ModelProto") -> list[str]:
    return [n.name for n in model.graph.node if n.op_type in _NORM_SCOPE_OPS and _NORM_SCOPE.search(n.name or "")]


def fp16_from_onnx(src: Path, dst: Path, inputs: Sequence["TensorSpec"], outputs: Sequence["TensorSpec"],
                   name: str, log: Log = _quiet) -> list[Path]:
    """fp16 variant of a checked fp32 graph: onnxruntime.transformers.float16 with fp32 graph inputs/outputs
    (keep_io_types) and the FP32_OPS / norm-scope nodes blocked, so they run in fp32 between casts."""
    import onnx
    from onnxruntime.transformers import float16

    model = onnx.load(str(src))
    large = _too_large(model)
    block_nodes = fp16_block_nodes(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the model contains values clamped to the fp16 range" (the -1e6 logits)
        half = float16.convert_float_to_float16(
            model, keep_io_types=True, disable_shape_infer=large,
            op_block_list=list(float16.DEFAULT_OP_BLOCK_LIST) + list(FP32_OPS), node_block_list=block_nodes)
    del model
    half = _toposorted(half)
    log(f"{name}: fp16 with {len(block_nodes)} norm nodes and ops {', '.join(FP32_OPS)} kept in fp32")
    files = save_model(half, dst)
    del half
    check_graph(dst, inputs, outputs, name)
    return files


# ---------------------------------------------------------------------------------------------------------------
# parity

@dataclass
class Sample:
    """One named feed (numpy arrays by input name) and the reference outputs for it."""
    label: str
    feed: dict[str, np.ndarray]
    reference: dict[str, np.ndarray] = field(default_factory=dict)


def validate_graph(runner: Any, samples: Sequence[Sample], component: str, precision: str) -> ParityReport:
    """Run the graph on every sample and compare with the samples' reference outputs (raises on any failure)."""
    report = ParityReport(component, precision, tolerance_for(precision), {})
    for sample in samples:
        out = runner.infer(sample.feed)
        report.samples[sample.label] = {name: parity(ref, out[name]) for name, ref in sample.reference.items()}
    return report.check()


def routing_masks(num_experts: int, k_max: int) -> list[tuple[int, ...]]:
    """Every multi-hot mask with at most k_max experts on (64 for 7 experts, K <= 3)."""
    masks = []
    for k in range(k_max + 1):
        for chosen in combinations(range(num_experts), k):
            masks.append(tuple(1 if i in chosen else 0 for i in range(num_experts)))
    return masks


def mask_label(mask: Sequence[int]) -> str:
    from .config import EXPERT_LETTERS

    return "".join(letter for letter, on in zip(EXPERT_LETTERS, mask) if on) or "none"


def format_parity(fig: Parity) -> str:
    return fig.describe()


# ---------------------------------------------------------------------------------------------------------------
# parity feeds: real images through the pipeline, plus seeded random feeds

def _role(spec: "ComponentSpec", cfg: "MoVAConfig") -> str:
    """How a component is fed: 'adapter' (features + routing mask), 'text' (BERT ids) or 'tower' (an image)."""
    names = {t.name for t in spec.inputs(cfg)}
    if "routing_mask" in names:
        return "adapter"
    if "input_ids" in names:
        return "text"
    return "tower"


def _as_numpy(value: Any, dtype: str | None = None) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    arr = np.ascontiguousarray(value)
    return arr.astype(dtype, copy=False) if dtype else arr


class FeedBuilder:
    """Parity samples per component, computed with the fp32 torch modules of one checkpoint.

    Real samples: each image is preprocessed once; towers get their preprocessed input, the text encoder the question
    asked about each image, the adapter the base/expert/text features those modules produce from the same image
    (and, with the mask sweep, every routing mask with K <= topk on the first image). Random samples: the spec's
    seeded `sample_inputs`. References: the module's outputs (the adapter's come from `forward_reference`, which skips
    unrouted experts, while its graph gets zeros for them). Modules are built on demand and dropped when asked, so a
    full-size export holds one tower at a time; tower features are kept only while the adapter still needs them.
    """

    def __init__(self, checkpoint: Any, samples: Sequence[Any], random_samples: int = 1, log: Log = _quiet,
                 questions: Sequence[str] | None = None, needs_features: bool = True):
        self.checkpoint = checkpoint
        self.cfg = checkpoint.config
        self.random_samples = random_samples
        self.log = log
        self.needs_features = needs_features
        self.images = _load_images(samples)
        if not self.images:
            raise ExportError("no parity images given; pass at least one (e.g. astronaut)")
        self.questions = list(questions) if questions else _default_questions([label for label, _ in self.images])
        self._pre: dict[str, dict[str, np.ndarray]] = {}
        self._modules: dict[str, Any] = {}
        self._features: dict[str, dict[str, np.ndarray]] = {}  # component -> image label -> first output
        self._samples: dict[str, list[Sample]] = {}

    # modules ---------------------------------------------------------------------------------------------------
    def module(self, name: str) -> Any:
        if name not in self._modules:
            import torch

            start = time.perf_counter()
            self._modules[name] = self.checkpoint.build(name, dtype=torch.float32).eval()
            self.log(f"{name}: built from the checkpoint in {time.perf_counter() - start:.1f} s")
        return self._modules[name]

    def drop_module(self, name: str) -> None:
        self._modules.pop(name, None)

    # feeds -----------------------------------------------------------------------------------------------------
    def preprocessed(self, label: str) -> dict[str, np.ndarray]:
        if label not in self._pre:
            from .preprocess import preprocess

            self._pre[label] = preprocess(dict(self.images)[label], self.cfg)
        return self._pre[label]

    def _spec(self, name: str) -> "ComponentSpec":
        from .components import get_spec

        return get_spec(name)

    def _tower_feed(self, spec: "ComponentSpec", label: str) -> dict[str, np.ndarray]:
        pre = self.preprocessed(label)
        declared = spec.inputs(self.cfg)
        if all(t.name in pre for t in declared):
            arrays = [pre[t.name] for t in declared]
        else:
            from .preprocess import tower_inputs

            kind = spec.expert.input_kind if spec.expert is not None else "clip672"
            arrays = tower_inputs(pre, kind)
        return {t.name: _as_numpy(a, t.dtype) for t, a in zip(declared, arrays)}

    def _text_feed(self, spec: "ComponentSpec", question: str) -> dict[str, np.ndarray]:
        from .components.text_encoder import encode_text_inputs
        from .tokenizers import load_text_tokenizer

        if not hasattr(self, "_text_tokenizer"):
            self._text_tokenizer = load_text_tokenizer(self.checkpoint.text_tokenizer_dir)
        arrays = encode_text_inputs(self._text_tokenizer, question, self.cfg)
        return {t.name: _as_numpy(a, t.dtype) for t, a in zip(spec.inputs(self.cfg), arrays)}

    def features(self, name: str) -> dict[str, np.ndarray]:
        """First output of a tower / the text encoder per image label (computed once)."""
        if name not in self._features:
            self.samples(name)
        return self._features[name]

    def real_feeds(self, name: str) -> list[Sample]:
        """One real-image sample per image (the adapter's: its first mask), e.g. for calibration."""
        firsts: dict[str, Sample] = {}
        for s in self.samples(name):
            image = s.label.split("/")[0].split(":")[0]
            if image in dict(self.images):
                firsts.setdefault(image, s)
        return list(firsts.values())

    def samples(self, name: str, mask_sweep: bool = True) -> list[Sample]:
        if name in self._samples:
            return self._samples[name]
        spec = self._spec(name)
        role = _role(spec, self.cfg)
        module = self.module(name)
        outputs = [t.name for t in spec.outputs(self.cfg)]
        real: list[Sample] = []
        if role == "tower":
            real = [Sample(label, self._tower_feed(spec, label)) for label, _ in self.images]
        elif role == "text":
            real = [Sample(f"{label}: {q}", self._text_feed(spec, q)) for (label, _), q in zip(self.images,
                                                                                                 self.questions)]
        else:
            real = self._adapter_feeds(spec, mask_sweep)
        randoms = []
        if spec.sample_inputs is not None:
            for i in range(self.random_samples):
                raw = spec.sample_inputs(self.cfg, 1000 + i)
                randoms.append(Sample(f"random{i}", {t.name: _as_numpy(raw[t.name], t.dtype)
                                                      for t in spec.inputs(self.cfg)}))
        samples = real + randoms
        start = time.perf_counter()
        for s in samples:
            s.reference = self._reference(module, spec, role, s.feed, outputs)
        self.log(f"{name}: {len(samples)} parity references in {time.perf_counter() - start:.1f} s")
        if role != "adapter":
            self._features[name] = {label: s.reference[outputs[0]] for (label, _), s in zip(self.images, real)}
        self._samples[name] = samples
        return samples

    def _reference(self, module: Any, spec: "ComponentSpec", role: str, feed: dict[str, np.ndarray],
                   outputs: list[str]) -> dict[str, np.ndarray]:
        import torch

        names = [t.name for t in spec.inputs(self.cfg)]
        if role != "adapter" or not hasattr(module, "forward_reference"):
            from .runners import TorchRunner

            return TorchRunner(module, names, outputs, name=spec.name).infer(feed)
        # the adapter: the skipping reference gets None for unrouted experts
        tensors = [torch.from_numpy(feed[n]) for n in names]
        base, experts, text, mask = tensors[0], tensors[1:-2], tensors[-2], tensors[-1]
        routed = [e if m else None for e, m in zip(experts, mask[0].tolist())]
        with torch.inference_mode():
            out = module.forward_reference(base, routed, text, mask)
        if isinstance(out, torch.Tensor):
            out = (out,)
        return {n: _as_numpy(t.float()) for n, t in zip(outputs, out)}

    def _adapter_plan(self, spec: "ComponentSpec") -> tuple[list[str], list[tuple[int, ...]]]:
        """Producers of the adapter's inputs (towers in order, then the text encoder) and the K <= topk masks."""
        from .bundle import graph_components
        from .components import get_spec

        names = [t.name for t in spec.inputs(self.cfg)]
        graphs = [get_spec(n) for n in graph_components()]  # the LLM feeds no graph: it is not an ONNX component
        towers = [s.name for s in graphs if _role(s, self.cfg) == "tower"]
        texts = [s.name for s in graphs if _role(s, self.cfg) == "text"]
        if len(towers) + len(texts) + 1 != len(names):
            raise ExportError(f"adapter inputs {names} do not match towers {towers} + text {texts} + routing mask")
        return towers + texts, routing_masks(len(towers) - 1, self.cfg.topk_experts)

    def _adapter_feed(self, spec: "ComponentSpec", producers: list[str], label: str, mask: tuple[int, ...],
                      zero_unrouted: bool) -> dict[str, np.ndarray]:
        declared = spec.inputs(self.cfg)
        feed = {}
        for j, (t, producer) in enumerate(zip(declared[:-1], producers)):
            off = 1 <= j <= len(mask) and not mask[j - 1]
            feed[t.name] = (np.zeros(t.shape, t.dtype) if off and zero_unrouted
                            else _as_numpy(self._collect_features(producer)[label], t.dtype))
        feed[declared[-1].name] = np.asarray([mask], dtype=declared[-1].dtype)
        return feed

    def _top_mask(self, masks: list[tuple[int, ...]], shift: int) -> tuple[int, ...]:
        top = max(masks, key=lambda m: (sum(m), m))  # a full top-K mask (A, B, C), rotated per image
        return tuple(top[(j - shift) % len(top)] for j in range(len(top)))

    def _adapter_feeds(self, spec: "ComponentSpec", mask_sweep: bool) -> list[Sample]:
        """Image 0: every mask with K <= topk, unrouted experts fed as zeros (as the runtime does); the trace example
        comes first (a full top-K mask). Other images: a top-K mask and the empty mask with every expert's real
        features in place, which shows that unrouted features cannot leak into the output."""
        producers, masks = self._adapter_plan(spec)
        samples = []
        for i, (label, _) in enumerate(self.images):
            top = self._top_mask(masks, i)
            if i == 0:
                chosen = [top] + ([m for m in masks if m != top] if mask_sweep else [masks[0]])
                samples += [Sample(f"{label}/{mask_label(m)}", self._adapter_feed(spec, producers, label, m, True))
                            for m in chosen]
            else:
                samples += [Sample(f"{label}/{mask_label(m)}+unrouted",
                                   self._adapter_feed(spec, producers, label, m, False)) for m in (top, masks[0])]
        return samples

    def calibration_feeds(self, name: str) -> list[Sample]:
        """One real feed per image for a quantizer (the adapter's with every expert's features and a top-K mask)."""
        spec = self._spec(name)
        if _role(spec, self.cfg) != "adapter":
            return self.real_feeds(name)
        producers, masks = self._adapter_plan(spec)
        return [Sample(label, self._adapter_feed(spec, producers, label, self._top_mask(masks, i), False))
                for i, (label, _) in enumerate(self.images)]

    def _collect_features(self, name: str) -> dict[str, np.ndarray]:
        had_module = name in self._modules
        feats = self.features(name)
        if not had_module:
            self.drop_module(name)
        return feats

    def release(self, name: str) -> None:
        """Forget a finished component's samples and module (its features stay while `needs_features`)."""
        self._samples.pop(name, None)
        self.drop_module(name)
        if not self.needs_features:
            self._features.clear()

    def describe(self) -> dict[str, Any]:
        return {"images": [label for label, _ in self.images], "questions": self.questions,
                "random_per_graph": self.random_samples, "random_seeds_from": 1000}


def _load_images(samples: Sequence[Any]) -> list[tuple[str, np.ndarray]]:
    from .preprocess import load_image
    from .reference import sample_images

    known = None
    out = []
    for i, item in enumerate(samples):
        if isinstance(item, str) and not Path(item).exists():
            known = known or sample_images()
            if item not in known:
                raise ExportError(f"parity image {item!r} is neither a file nor a sample ({', '.join(known)})")
            out.append((item, known[item]))
        elif isinstance(item, (str, Path)):
            out.append((Path(item).stem, load_image(Path(item))))
        else:
            out.append((f"image{i}", np.asarray(item)))
    return out


def _default_questions(labels: Sequence[str]) -> list[str]:
    from .reference import SAMPLE_QUESTIONS

    return [SAMPLE_QUESTIONS.get(label, "What is shown in this image?") for label in labels]

"""MoVA's vision side from a bundle: the two passes' image tokens, one runner per graph.

Routing pass: preprocess (the base encoder's input only) -> base -> text encoder -> adapter with an all-zero mask ->
144 routing tokens (and the K=0 image tokens). Answer pass, given the routing mask the LLM produced: only the routed
experts run (their inputs are preprocessed then), the unrouted ones are fed as zeros, and the adapter runs again with
the mask -> 576 image tokens. With no expert routed the answer-pass tokens are the routing pass's K=0 tokens (the
reference skips the second adapter run the same way).

Per component: a precision (the manifest's `runtime.precision`, overridable) and a backend:

  onnxruntime  the component's ONNX graph of that precision (CPU, or the CUDA EP for device="cuda"; a fallback to
               CPU is recorded in `fallbacks`)
  tensorrt     the engine in `manifest["engines"][component]` (compiled on the device); components without one run
               in ONNX Runtime (recorded in `fallbacks`)
  torch        the PyTorch component built from the bundle's source checkpoint (the reference modules)
  auto         tensorrt where the manifest's runtime says so, engines exist and tensorrt imports; else onnxruntime

Expert policy: "resident" creates every expert's runner at load; "lazy" creates one the first time it is routed and
keeps at most `max_resident_experts` (least recently used unloaded first). The base, text encoder and adapter are
always resident. Not thread-safe by itself: MoVARuntime serialises calls.
"""
from __future__ import annotations

import gc
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .bundle import Bundle, load_bundle
from .errors import BundleError, RuntimeInputError

BACKENDS = ("auto", "onnxruntime", "tensorrt", "torch")
EXPERT_POLICIES = ("resident", "lazy")
TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclass
class RoutingPass:
    inputs: dict[str, np.ndarray]          # preprocessed image, by kind (filled on demand: experts' kinds later)
    base: np.ndarray                       # [1, grid, mm_hidden]
    text: np.ndarray                       # [1, text width]
    routing_tokens: np.ndarray             # [1, num_routing_tokens, H]
    image_tokens: np.ndarray               # [1, adapter_grid^2, H] with no expert routed
    experts: dict[str, np.ndarray] = field(default_factory=dict)  # expert component -> features, once computed
    rgb: np.ndarray | None = None          # the HxWx3 uint8 frame, for the experts' preprocessing


def _timed(timings: dict[str, float] | None, stage: str, fn: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    out = fn()
    if timings is not None:
        timings[stage] = timings.get(stage, 0.0) + (time.perf_counter() - start) * 1e3
    return out


def resolve_precisions(bundle: Bundle, override: str | Mapping[str, str] | None) -> dict[str, str]:
    """Precision per graph component: fp32, then the manifest's runtime.precision, then the override (a str for
    every component or a dict per component)."""
    graphs = bundle.manifest["graphs"]
    out = {name: "fp32" for name in graphs}
    out.update({k: v for k, v in (bundle.manifest.get("runtime") or {}).get("precision", {}).items() if k in graphs})
    if isinstance(override, str):
        out = {name: override for name in graphs}
    elif override is not None:
        unknown = sorted(set(override) - set(graphs))
        if unknown:
            raise BundleError(f"precision override names unknown component(s) {unknown}; the bundle has "
                              f"{', '.join(graphs)}")
        out.update(override)
    return out


def tensorrt_importable() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


class VisionSession:
    """Runners for the vision graphs of one bundle (see the module docstring for backends and expert policy)."""

    def __init__(self, bundle: str | Path | Bundle, precision: str | Mapping[str, str] | None = None,
                 device: str = "cpu", verify: bool = True, *, backend: str = "onnxruntime",
                 expert_policy: str = "lazy", max_resident_experts: int | None = None, threads: int | None = None):
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle, verify=verify)
        self.cfg = self.bundle.config
        if backend not in BACKENDS:
            raise RuntimeInputError(f"unknown vision backend {backend!r}; use one of {', '.join(BACKENDS)}")
        if expert_policy not in EXPERT_POLICIES:
            raise RuntimeInputError(f"unknown expert policy {expert_policy!r}; use one of {', '.join(EXPERT_POLICIES)}")
        if device not in ("cpu", "cuda"):
            raise RuntimeInputError(f"unknown device {device!r}; use 'cpu' or 'cuda'")
        self.device = device
        self.threads = threads
        self.precisions = resolve_precisions(self.bundle, precision)
        self.expert_policy = expert_policy
        graphs = self.bundle.manifest["graphs"]
        roles = {name: g.get("role") for name, g in graphs.items()}
        self.towers = [n for n, r in roles.items() if r == "tower"]
        self.text_encoder = next((n for n, r in roles.items() if r == "text"), None)
        self.adapter = next((n for n, r in roles.items() if r == "adapter"), None)
        missing = [what for what, ok in (("base", "base" in self.towers), ("text encoder", self.text_encoder),
                                         ("adapter", self.adapter)) if not ok]
        if missing:
            raise BundleError(f"bundle {self.bundle.path} lacks the {', '.join(missing)} graph(s) the vision side "
                              f"needs; re-export with those components")
        self.experts = [n for n in self.towers if graphs[n].get("expert") is not None]  # in routing index order
        self.experts.sort(key=lambda n: graphs[n]["expert"]["index"])
        cap = len(self.experts) if expert_policy == "resident" else (
            max_resident_experts if max_resident_experts is not None else max(1, self.cfg.topk_experts))
        if cap < 1:
            raise RuntimeInputError(f"max_resident_experts={cap}; keep at least one expert loaded")
        self.max_resident_experts = cap
        self.backends = {name: self._resolve_backend(name, backend) for name in graphs}
        self.fallbacks: dict[str, str] = {}
        self._runners: dict[str, Any] = {}
        self._expert_lru: OrderedDict[str, None] = OrderedDict()
        self._text_tokenizer = None
        self._checkpoint = None
        self._zeros: dict[str, np.ndarray] = {}   # reused zero feeds of unrouted experts
        self._mask = np.zeros((1, len(self.experts)), dtype=self._graph(self.adapter)["inputs"][-1]["dtype"])
        for variant in (self.bundle.graph(n, self.precisions[n]) for n in graphs if self.backends[n] != "torch"):
            if not variant.is_file():
                raise BundleError(f"bundle {self.bundle.path}: graph {variant} is missing; re-export the bundle")

    # ---- backends ---------------------------------------------------------------------------------------------------
    def _resolve_backend(self, name: str, requested: str) -> str:
        engines = self.bundle.manifest.get("engines") or {}
        if requested == "auto":
            wants_trt = (self.bundle.manifest.get("runtime") or {}).get("vision_backend") == "tensorrt"
            ok = wants_trt and self.device == "cuda" and name in engines and tensorrt_importable()
            return "tensorrt" if ok else "onnxruntime"
        if requested == "tensorrt":
            if not engines:
                raise BundleError(f"bundle {self.bundle.path} has no TensorRT engines; compile them on the device "
                                  "(`mova-export build` with a tensorrt recipe there) or use backend='onnxruntime'")
            if not tensorrt_importable():
                raise BundleError("backend='tensorrt' needs the tensorrt Python package, which is not importable "
                                  "here; install it on the device or use backend='onnxruntime'")
            return "tensorrt" if name in engines else "onnxruntime"
        return requested

    def _make_runner(self, name: str) -> Any:
        backend = self.backends[name]
        precision = self.precisions[name]
        label = f"{name}.{precision}"
        if backend == "tensorrt":
            from .runners import TensorRTRunner

            return TensorRTRunner(self.bundle.path / self.bundle.manifest["engines"][name]["engine"], name=label)
        if backend == "torch":
            return self._torch_runner(name, precision)
        from .runners import OrtRunner

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            runner = OrtRunner(self.bundle.graph(name, precision), device=self.device, name=label,
                               threads=self.threads)
        if runner.fell_back:
            self.fallbacks[name] = "; ".join(str(w.message) for w in caught) or f"running on {runner.providers[0]}"
        if name in (self.bundle.manifest.get("engines") or {}) and self.backends[name] != "tensorrt":
            self.fallbacks.setdefault(name, "has a TensorRT engine, run in ONNX Runtime (tensorrt not selected)")
        return runner

    def _torch_runner(self, name: str, precision: str) -> Any:
        import torch

        from .checkpoint import Checkpoint

        if precision not in TORCH_DTYPES:
            raise BundleError(f"the torch backend runs {', '.join(TORCH_DTYPES)}, not {precision} ({name}); pass "
                              "precision='fp32'")
        if self._checkpoint is None:
            path = Path(self.bundle.manifest["source_checkpoint"]["path"])
            if not path.is_dir():
                raise BundleError(f"the torch backend builds the components from the bundle's source checkpoint "
                                  f"{path}, which is not here; use backend='onnxruntime'")
            self._checkpoint = Checkpoint.open(path)
        dtype = getattr(torch, TORCH_DTYPES[precision])
        module = self._checkpoint.build(name, dtype=dtype)
        device = "cuda" if self.device == "cuda" and torch.cuda.is_available() else "cpu"
        if device != self.device:
            self.fallbacks[name] = "torch has no CUDA here; running on CPU"
        g = self._graph(name)
        return _TorchDeviceRunner(module.to(device), [t["name"] for t in g["inputs"]],
                                  [t["name"] for t in g["outputs"]], device, dtype, name=f"{name}.torch.{precision}")

    # ---- plumbing ------------------------------------------------------------------------------------------------
    def runner(self, name: str, timings: dict[str, float] | None = None) -> Any:
        if name not in self._runners:
            self._runners[name] = _timed(timings, f"load_{name}", lambda: self._make_runner(name))
        if name in self.experts:
            self._expert_lru[name] = None
            self._expert_lru.move_to_end(name)
            while len(self._expert_lru) > self.max_resident_experts:
                self.unload(next(iter(self._expert_lru)))
        return self._runners[name]

    def load(self) -> None:
        """Create the always-resident runners (base, text encoder, adapter), and every expert's when resident."""
        for name in ["base", self.text_encoder, self.adapter] + (
                self.experts if self.expert_policy == "resident" else []):
            self.runner(name)

    def unload(self, name: str) -> None:
        """Drop one runner (its session and weights); it is re-created on next use."""
        self._runners.pop(name, None)
        self._expert_lru.pop(name, None)
        gc.collect()

    def close(self) -> None:
        for name in list(self._runners):
            self._runners.pop(name)
        self._expert_lru.clear()
        self._checkpoint = None
        gc.collect()

    @property
    def loaded(self) -> list[str]:
        return list(self._runners)

    def _graph(self, name: str) -> dict[str, Any]:
        return self.bundle.manifest["graphs"][name]

    def _ensure_inputs(self, state: RoutingPass, kind: str, timings: dict[str, float] | None) -> None:
        """Preprocess one input kind of the frame on first need (the experts' inputs only when they are routed)."""
        from .preprocess import pix2struct_patches, pixel_values

        if kind in state.inputs or state.rgb is None:
            return
        if kind.startswith("pix2struct"):
            patches, mask = _timed(timings, "preprocess", lambda: pix2struct_patches(state.rgb, self.cfg))
            state.inputs["pix2struct"], state.inputs["pix2struct_mask"] = patches, mask
        else:
            state.inputs[kind] = _timed(timings, "preprocess", lambda: pixel_values(state.rgb, kind, self.cfg))

    def _tower_feed(self, name: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        g = self._graph(name)
        declared = g["inputs"]
        if all(t["name"] in inputs for t in declared):
            arrays = [inputs[t["name"]] for t in declared]
        else:
            from .preprocess import tower_inputs

            arrays = tower_inputs(inputs, g["input_kind"])
        return {t["name"]: np.ascontiguousarray(a, dtype=t["dtype"]) for t, a in zip(declared, arrays)}

    def _tower_kinds(self, name: str) -> list[str]:
        g = self._graph(name)
        kind = g.get("input_kind", "clip672")
        return [kind, f"{kind}_mask"] if len(g["inputs"]) == 2 else [kind]

    def text_inputs(self, question: str) -> dict[str, np.ndarray]:
        from .components.text_encoder import encode_text_inputs
        from .tokenizers import load_text_tokenizer

        if self._text_tokenizer is None:
            self._text_tokenizer = load_text_tokenizer(self.bundle.tokenizer_dir("text"))
        arrays = encode_text_inputs(self._text_tokenizer, question, self.cfg)
        declared = self._graph(self.text_encoder)["inputs"]
        return {t["name"]: np.ascontiguousarray(a.numpy() if hasattr(a, "numpy") else a, dtype=t["dtype"])
                for t, a in zip(declared, arrays)}

    def _first(self, name: str, feed: dict[str, np.ndarray], timings: dict[str, float] | None = None,
               stage: str | None = None) -> np.ndarray:
        runner = self.runner(name, timings)
        out = _timed(timings, stage or name, lambda: runner.infer(feed))
        return out[self._graph(name)["outputs"][0]["name"]]

    def _zeros_for(self, t: dict[str, Any]) -> np.ndarray:
        if t["name"] not in self._zeros:
            z = np.zeros(t["shape"], t["dtype"])
            z.flags.writeable = False
            self._zeros[t["name"]] = z
        return self._zeros[t["name"]]

    def _adapter(self, state: RoutingPass, mask: Sequence[int], timings: dict[str, float] | None = None,
                 stage: str = "adapter") -> tuple[np.ndarray, np.ndarray]:
        declared = self._graph(self.adapter)["inputs"]
        expert_inputs = declared[1:1 + len(self.experts)]
        self._mask[0, :] = list(mask)
        feed = {declared[0]["name"]: state.base, declared[-2]["name"]: state.text, declared[-1]["name"]: self._mask}
        for t, name, on in zip(expert_inputs, self.experts, mask):
            feed[t["name"]] = state.experts[name] if on else self._zeros_for(t)
        runner = self.runner(self.adapter, timings)
        out = _timed(timings, stage, lambda: runner.infer(feed))
        names = [t["name"] for t in self._graph(self.adapter)["outputs"]]
        return out[names[0]], out[names[1]]

    def check_mask(self, mask: Sequence[int]) -> list[int]:
        mask = [int(bool(m)) for m in mask]
        if len(mask) != len(self.experts):
            raise RuntimeInputError(f"routing mask has {len(mask)} entries; this bundle has {len(self.experts)} "
                                    "experts")
        return mask

    # ---- the two passes --------------------------------------------------------------------------------------------
    def routing_pass(self, image: Any, question: str, timings: dict[str, float] | None = None) -> RoutingPass:
        """Base, text feature and the no-expert adapter run. `timings` (ms, by stage) is filled when given."""
        from .preprocess import load_image

        if not isinstance(question, str) or not question.strip():
            raise RuntimeInputError("the question is empty; pass a non-empty question string")
        rgb = image if _is_rgb_frame(image) else _timed(timings, "preprocess", lambda: load_image(image))
        state = RoutingPass(inputs={}, base=np.empty(0), text=np.empty(0), routing_tokens=np.empty(0),
                            image_tokens=np.empty(0), rgb=rgb)
        for kind in self._tower_kinds("base"):
            self._ensure_inputs(state, kind, timings)
        text_feed = self.text_inputs(question)  # raises RuntimeInputError for an over-long question
        state.base = self._first("base", self._tower_feed("base", state.inputs), timings, "base")
        state.text = self._first(self.text_encoder, text_feed, timings, "text_encoder")
        state.image_tokens, state.routing_tokens = self._adapter(state, [0] * len(self.experts), timings,
                                                                 "adapter_routing")
        return state

    def answer_pass(self, state: RoutingPass, mask: Sequence[int], timings: dict[str, float] | None = None
                    ) -> np.ndarray:
        """Image tokens for the answer pass: the routed experts only, then the adapter with the mask (skipped, and
        the routing pass's K=0 tokens returned, when nothing is routed)."""
        mask = self.check_mask(mask)
        if not any(mask):
            return state.image_tokens
        for name, on in zip(self.experts, mask):
            if on and name not in state.experts:
                for kind in self._tower_kinds(name):
                    self._ensure_inputs(state, kind, timings)
                state.experts[name] = self._first(name, self._tower_feed(name, state.inputs), timings, name)
        image_tokens, _ = self._adapter(state, mask, timings, "adapter_answer")
        return image_tokens

    @property
    def providers(self) -> dict[str, tuple[str, ...]]:
        return {name: getattr(r, "providers", (self.backends[name],)) for name, r in self._runners.items()}

    # kept for callers of the single-precision API
    @property
    def precision(self) -> str:
        values = set(self.precisions.values())
        return values.pop() if len(values) == 1 else "mixed"


def _is_rgb_frame(image: Any) -> bool:
    return (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
            and image.shape[0] > 0 and image.shape[1] > 0)


class _TorchDeviceRunner:
    """A component module on a torch device: numpy in, numpy (float32 for floating outputs) out."""

    def __init__(self, module: Any, input_names: Sequence[str], output_names: Sequence[str], device: str,
                 dtype: Any, name: str):
        self.module, self.device, self.dtype, self.name = module, device, dtype, name
        self.input_names, self.output_names = tuple(input_names), tuple(output_names)
        self.providers = (f"torch:{device}",)

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        tensors = []
        for n in self.input_names:
            a = np.ascontiguousarray(feed[n])
            t = torch.from_numpy(a if a.flags.writeable else a.copy()).to(self.device)
            tensors.append(t.to(self.dtype) if t.is_floating_point() and n != "routing_mask" else t)
        with torch.inference_mode():
            out = self.module(*tensors)
        if isinstance(out, torch.Tensor):
            out = (out,)
        return {n: (t.float() if t.is_floating_point() else t).cpu().numpy() for n, t in zip(self.output_names, out)}

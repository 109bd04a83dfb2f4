"""The vision side of a bundle: one runner per graph, behind the two-pass orchestration's VisionRunners interface.

Per graph: a precision (the manifest's runtime defaults, overridable) and a backend:

  onnxruntime  the graph of that precision (CPU, or the CUDA EP for device="cuda"; a fallback to CPU is recorded
               in `fallbacks`)
  tensorrt     the engine in the manifest's `engines` (compiled for the device; its recorded platform is checked
               against this one first: runners.tensorrt.engine_runner); graphs without one run in ONNX Runtime
               (recorded in `fallbacks`). Engines hand their outputs on the device to the next engine
               (runners.tensorrt.DeviceChain): base -> routing / slot adapter, routed experts -> slot adapter.
  auto         tensorrt where the manifest says so, engines exist and a TensorRT flavor imports; else onnxruntime

The adapter runs as three graphs (components/adapter.py): the routing form (base only) for the routing pass, the
top-K slot form for an answer pass routing 1..K experts (slots.fill_slots builds its inputs), and the dense
seven-branch graph only for the rare routing answer naming more than K experts (created on first use).

Expert policy: "resident" creates every expert's runner at load; "lazy" creates one the first time it is routed and
keeps at most `max_resident_experts` (least recently used unloaded first). The base, text encoder, routing and slot
graphs are always resident. Not thread-safe by itself: MoVARuntime serialises calls. No torch, no transformers.
"""
from __future__ import annotations

import gc
import warnings
from collections import OrderedDict
from typing import Any, Mapping, Sequence

import numpy as np

from ..bundle import Bundle, GraphEntry
from ..core.bert_inputs import BertTextTokenizer, text_inputs
from ..core.errors import BundleError, RuntimeInputError
from ..core.image_inputs import preprocess_input
from ..core.slots import fill_slots, routed_experts
from ..runners.ort import OrtRunner
from ..runners.tensorrt import (
    ContextMemory,
    DeviceChain,
    TensorRTRunner,
    context_memory,
    engine_runner,
    tensorrt_available,
)

BACKENDS = ("auto", "onnxruntime", "tensorrt")
# ONNX Runtime's arena for a graph whose declared outputs are under this size: a kept arena holds its
# run's peak for good and the runtime keeps a session per graph. At full size the cpu bundle's arenas summed to
# 24 GB and the runtime was OOM-killed (SAM-H alone kept 4.4 GB, Co-DETR 3.5, the slot adapter 2.0); without it
# a full-size graph runs as fast (SAM-H 41.9 s against 40.9, CLIP 12.7 against 13.5) and frees its peak after each
# run, while the tiny model's graphs run twice as fast with it (CLIP 17.6 ms against 33.6). A full-size tower's
# features are 9 MB or more, the tiny model's kilobytes (both take full-size images: the inputs do not tell).
ARENA_BELOW_BYTES = 1 << 20
EXPERT_POLICIES = ("resident", "lazy")
DEVICES = ("cpu", "cuda")
ADAPTER_FORMS = ("auto", "slots", "dense")


def resolve_precisions(bundle: Bundle, override: str | Mapping[str, str] | None) -> dict[str, str]:
    """Precision per graph: the manifest's runtime defaults (fp32 where it names none), then the override (one str
    for every graph, or a dict by graph or component name)."""
    graphs = bundle.manifest.graphs
    defaults = bundle.manifest.runtime.precision
    out = {name: defaults.get(name, "fp32") for name in graphs}
    if isinstance(override, str):
        return {name: override for name in graphs}
    if override:
        by_component = {g.component: name for name, g in graphs.items()}
        unknown = sorted(k for k in override if k not in graphs and k not in by_component)
        if unknown:
            raise BundleError(f"precision override names unknown graph(s) {unknown}; the bundle has "
                              f"{', '.join(graphs)}")
        for key, precision in override.items():
            out[key if key in graphs else by_component[key]] = precision
    return out


class BundleVision:
    """Runners for the vision graphs of one bundle (see the module docstring for backends and expert policy)."""

    def __init__(self, bundle: Bundle, precision: str | Mapping[str, str] | None = None, device: str = "cpu", *,
                 backend: str = "onnxruntime", expert_policy: str = "resident", max_resident_experts: int | None = None,
                 threads: int | None = None):
        if backend not in BACKENDS:
            raise RuntimeInputError(f"unknown vision backend {backend!r}; use one of {', '.join(BACKENDS)}")
        if expert_policy not in EXPERT_POLICIES:
            raise RuntimeInputError(f"unknown expert policy {expert_policy!r}; use one of {', '.join(EXPERT_POLICIES)}")
        if device not in DEVICES:
            raise RuntimeInputError(f"unknown device {device!r}; use one of {', '.join(DEVICES)}")
        self.bundle, self.device, self.threads = bundle, device, threads
        m = bundle.manifest
        self.facts = m.model
        self.precisions = resolve_precisions(bundle, precision)
        self.expert_policy = expert_policy
        self.base_graph = self._required(m.graph_of_component(self.facts.base.component), "base encoder")
        self.text_graph = self._required(m.graph_of_role("text"), "text encoder")
        self.routing_graph = self._required(m.graph_of_role("adapter_routing"), "adapter routing")
        self.answer_graph = self._required(m.graph_of_role("adapter_answer"), "adapter answer (slots)")
        self.fallback_graph = m.graph_of_role("adapter_fallback")      # dense: more than num_slots experts routed
        self.num_slots = int(self._input(self.answer_graph, "slot_expert").shape[0])
        self.expert_channels = [int(c) for c in m.config["expert_channels"]]   # C_j of each expert's features
        self.expert_graphs = {e.component: m.graph_of_component(e.component) for e in self.facts.experts}
        self.experts = [c for c, g in self.expert_graphs.items() if g is not None]   # routing order
        cap = len(self.experts) if expert_policy == "resident" else (
            max_resident_experts if max_resident_experts is not None else max(1, self.facts.topk_experts))
        if cap < 1:
            raise RuntimeInputError(f"max_resident_experts={cap}; keep at least one expert loaded")
        self.max_resident_experts = cap
        self.backends = {name: self._resolve_backend(name, backend) for name in m.graphs}
        for name in m.graphs:
            if self.backends[name] == "onnxruntime":
                path = bundle.graph_path(name, self.precisions[name])   # BundleError for a missing variant
                if not path.is_file():
                    raise BundleError(f"bundle {bundle.path}: graph {path.name} is missing; rebuild the bundle")
        self.fallbacks: dict[str, str] = {}
        self._runners: dict[str, Any] = {}
        self._expert_lru: OrderedDict[str, None] = OrderedDict()
        self._tokenizer = BertTextTokenizer.from_folder(bundle.tokenizer_dir("text"), error=BundleError)
        self._zeros: dict[str, np.ndarray] = {}   # reused zero feeds of unrouted experts (dense adapter)
        self._chain = DeviceChain()                 # TensorRT outputs still on the device, for the next engine
        self._context_memory: ContextMemory | None = None   # the engines' shared activations, made with the first

    @staticmethod
    def _input(graph: GraphEntry, name: str) -> Any:
        found = next((t for t in graph.inputs if t.name == name), None)
        if found is None:
            raise BundleError(f"graph {graph.name} has no input {name!r}; the bundle predates this runtime, rebuild it")
        return found

    def _required(self, graph: GraphEntry | None, what: str) -> GraphEntry:
        if graph is None:
            raise BundleError(f"bundle {self.bundle.path} lacks the {what} graph the vision side needs; rebuild it "
                              "with every component")
        return graph

    # ---- backends ---------------------------------------------------------------------------------------------------
    def _resolve_backend(self, name: str, requested: str) -> str:

        engines = self.bundle.manifest.engines
        if requested == "auto":
            wants_trt = self.bundle.manifest.runtime.vision_backend == "tensorrt"
            ok = wants_trt and self.device == "cuda" and name in engines and tensorrt_available()
            return "tensorrt" if ok else "onnxruntime"
        if requested == "tensorrt":
            if not engines:
                raise BundleError(f"bundle {self.bundle.path} has no TensorRT engines; compile them on the device "
                                  f"(`mova-export compile {self.bundle.path}`) or use backend='onnxruntime'")
            if not tensorrt_available():
                raise BundleError("backend='tensorrt' needs a TensorRT Python package, which is not importable here; "
                                  "install it on the device or use backend='onnxruntime'")
            return "tensorrt" if name in engines else "onnxruntime"
        return requested

    def _make_runner(self, name: str) -> Any:

        precision = self.precisions[name]
        label = f"{name}.{precision}"
        engines = self.bundle.manifest.engines
        if self.backends[name] == "tensorrt":
            if self._context_memory is None:
                self._context_memory = context_memory()
            return engine_runner(self.bundle.path, engines[name], label, memory=self._context_memory)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            runner = OrtRunner(self.bundle.graph_path(name, precision), device=self.device, name=label,
                               threads=self.threads, memory_arena=keeps_arena(self.bundle.manifest.graphs[name]))
        if runner.fell_back:
            self.fallbacks[name] = "; ".join(str(w.message) for w in caught) or f"running on {runner.providers[0]}"
        if name in engines:
            self.fallbacks.setdefault(name, "has a TensorRT engine, run in ONNX Runtime (tensorrt not selected)")
        return runner

    def runner(self, name: str) -> Any:
        if name not in self._runners:
            self._runners[name] = self._make_runner(name)
        component = self.bundle.manifest.graphs[name].component
        if component in self.experts:
            self._expert_lru[component] = None
            self._expert_lru.move_to_end(component)
            while len(self._expert_lru) > self.max_resident_experts:
                self.unload(next(iter(self._expert_lru)))
        return self._runners[name]

    def load(self) -> None:
        """Create the always-resident runners, and every expert's when the policy is resident."""
        names = [self.base_graph.name, self.text_graph.name, self.routing_graph.name, self.answer_graph.name]
        if self.expert_policy == "resident":
            names += [self.expert_graphs[c].name for c in self.experts]
        for name in names:
            self.runner(name)

    def unload(self, component: str) -> None:
        """Drop one expert's runner (its session and weights); it is re-created on next use."""
        graph = self.expert_graphs.get(component)
        _release(self._runners.pop(graph.name, None) if graph is not None else None)
        self._expert_lru.pop(component, None)
        gc.collect()

    def unload_adapter_fallback(self) -> None:
        """Drop the dense adapter graph's runner (created by a mask with more than num_slots experts)."""
        if self.fallback_graph is not None:
            _release(self._runners.pop(self.fallback_graph.name, None))
            gc.collect()

    def close(self) -> None:
        self._chain.clear()
        for runner in self._runners.values():
            _release(runner)
        self._runners.clear()
        self._expert_lru.clear()
        if self._context_memory is not None:
            self._context_memory.close()
            self._context_memory = None
        gc.collect()

    @property
    def loaded(self) -> list[str]:
        return list(self._runners)

    @property
    def providers(self) -> dict[str, tuple[str, ...]]:
        return {name: getattr(r, "providers", (self.backends[name],)) for name, r in self._runners.items()}

    # ---- VisionRunners ---------------------------------------------------------------------------------------------
    def _run(self, graph: GraphEntry, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        runner = self.runner(graph.name)
        if isinstance(runner, TensorRTRunner):   # arrays an engine returned are read where they still are, on the GPU
            out = self._chain.run(runner, {t.name: a for t, a in zip(graph.inputs, arrays)})
            return [out[t.name] for t in graph.outputs]
        feed = {t.name: np.ascontiguousarray(a, dtype=t.dtype) for t, a in zip(graph.inputs, arrays)}
        out = runner.infer(feed)
        return [out[t.name] for t in graph.outputs]

    def preprocess(self, rgb: np.ndarray, kind: str) -> list[np.ndarray]:
        return preprocess_input(rgb, self.facts.image_inputs[kind], self.facts)

    def base(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        return self._run(self.base_graph, arrays)[0]

    def text(self, question: str) -> np.ndarray:
        ids, mask = text_inputs(self._tokenizer, question, self.facts.text_buckets)
        return self._run(self.text_graph, [ids, mask])[0]

    def expert(self, component: str, arrays: Sequence[np.ndarray]) -> np.ndarray:
        graph = self.expert_graphs.get(component)
        if graph is None:
            raise RuntimeInputError(f"this bundle has no {component} graph; route to the experts it holds "
                                    f"({', '.join(self.experts)}) or rebuild it with every component")
        return self._run(graph, arrays)[0]

    def adapter_routing(self, base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        image_tokens, routing_tokens = self._run(self.routing_graph, [base])
        return image_tokens, routing_tokens

    def adapter_answer(self, base: np.ndarray, text: np.ndarray, mask: Sequence[int],
                       experts: dict[int, np.ndarray], form: str = "auto") -> np.ndarray:
        """Image tokens for a routing mask. form "auto": the routing graph's for no expert, the slot graph for
        1..num_slots, the dense graph beyond (each block's gate keeps its own top-k of the routed experts; that
        graph is dropped again after the request). "slots" / "dense" force one graph (benchmarks; dense stays
        loaded)."""

        if form not in ADAPTER_FORMS:
            raise RuntimeInputError(f"unknown adapter form {form!r}; use one of {', '.join(ADAPTER_FORMS)}")
        routed = routed_experts(mask, len(self.facts.experts))
        if form == "auto" and not routed:
            return self.adapter_routing(base)[0]
        if form == "slots" or (form == "auto" and len(routed) <= self.num_slots):
            slots = fill_slots(mask, experts, self.num_slots, self.expert_channels, int(base.shape[1]))
            runner = self.runner(self.answer_graph.name)
            if isinstance(runner, TensorRTRunner):   # the routed experts' features copied into the slots on the GPU
                slots["slot_features"] = self._chain.slots(runner, "slot_features", slots["slot_features"],
                                                           [experts[j] for j in routed])
            arrays = [base if t.name == "base" else text if t.name == "text_features" else slots[t.name]
                      for t in self.answer_graph.inputs]
            return self._run(self.answer_graph, arrays)[0]
        if self.fallback_graph is None:
            raise RuntimeInputError(f"{len(routed)} experts routed but this bundle's adapter has {self.num_slots} "
                                    "slots and no dense graph; rebuild it with every adapter graph")
        if form == "dense":
            return self._dense(base, text, mask, experts)[0]
        try:
            return self._dense(base, text, mask, experts)[0]
        finally:   # rare (the router names > K experts): not kept resident, the memory plan does not count it
            self.unload_adapter_fallback()

    def _dense(self, base: np.ndarray, text: np.ndarray, mask: Sequence[int], experts: dict[int, np.ndarray]
               ) -> list[np.ndarray]:
        """The dense adapter graph: (base, expert features A.., text, mask); unrouted experts get zeros."""
        assert self.fallback_graph is not None
        inputs = self.fallback_graph.inputs
        count = len(self.facts.experts)
        arrays: list[np.ndarray] = [base]
        for index, spec in enumerate(inputs[1:1 + count]):
            arrays.append(experts[index] if mask[index] else self._zeros_for(spec))
        arrays += [text, np.asarray([mask], dtype=inputs[-1].dtype)]
        return self._run(self.fallback_graph, arrays)

    def _zeros_for(self, spec: Any) -> np.ndarray:
        if spec.name not in self._zeros:
            z = np.zeros(spec.shape, spec.dtype)
            z.flags.writeable = False
            self._zeros[spec.name] = z
        return self._zeros[spec.name]


def output_bytes(graph: GraphEntry) -> int:
    """Bytes of a graph's declared outputs (a symbolic axis at its largest static size)."""
    total = 0
    for spec in graph.outputs:
        dims = [d if isinstance(d, int) else max(graph.axes.get(d, [1])) for d in spec.shape]
        total += int(np.prod(dims)) * np.dtype(spec.dtype).itemsize
    return total


def keeps_arena(graph: GraphEntry) -> bool:
    """Whether the graph's ONNX Runtime session runs with the arena (ARENA_BELOW_BYTES says why)."""
    return output_bytes(graph) < ARENA_BELOW_BYTES


def _release(runner: Any) -> None:
    """Free a dropped runner's device memory now, not when the device chain lets go of it (ONNX Runtime sessions
    go with their last reference)."""
    if isinstance(runner, TensorRTRunner):
        runner.close()

"""MoVA's vision side from a bundle, in ONNX Runtime: the two passes' image tokens without torch modules.

Routing pass: preprocess -> base -> text encoder -> adapter with an all-zero mask -> 144 routing tokens (and the
K=0 image tokens). Answer pass, given the routing mask the LLM produced: only the routed experts run, the unrouted
ones are fed as zeros, and the adapter runs again with the mask -> 576 image tokens. With no expert routed the
answer-pass tokens are the routing pass's K=0 tokens (the reference skips the second adapter run the same way).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .bundle import Bundle, load_bundle
from .errors import BundleError, RuntimeInputError


@dataclass
class RoutingPass:
    inputs: dict[str, np.ndarray]          # preprocessed image, by kind
    base: np.ndarray                       # [1, grid, mm_hidden]
    text: np.ndarray                       # [1, text width]
    routing_tokens: np.ndarray             # [1, num_routing_tokens, H]
    image_tokens: np.ndarray               # [1, adapter_grid^2, H] with no expert routed
    experts: dict[str, np.ndarray] = field(default_factory=dict)  # expert component -> features, once computed


class VisionSession:
    """ONNX Runtime sessions for the vision graphs of one bundle (created lazily: an expert's graph is loaded the
    first time it is routed). `device="cuda"` uses the CUDA execution provider where onnxruntime has it."""

    def __init__(self, bundle: str | Path | Bundle, precision: str = "fp32", device: str = "cpu",
                 verify: bool = True):
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle, verify=verify)
        self.cfg = self.bundle.config
        self.precision = precision
        self.device = device
        self._runners: dict[str, Any] = {}
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
        self._text_tokenizer = None

    # ---- plumbing ------------------------------------------------------------------------------------------------
    def runner(self, name: str) -> Any:
        if name not in self._runners:
            from .runners import OrtRunner

            self._runners[name] = OrtRunner(self.bundle.graph(name, self.precision), device=self.device,
                                            name=f"{name}.{self.precision}")
        return self._runners[name]

    def _graph(self, name: str) -> dict[str, Any]:
        return self.bundle.manifest["graphs"][name]

    def _tower_feed(self, name: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        g = self._graph(name)
        declared = g["inputs"]
        if all(t["name"] in inputs for t in declared):
            arrays = [inputs[t["name"]] for t in declared]
        else:
            kind = g["input_kind"]
            arrays = [inputs[kind], inputs[f"{kind}_mask"]] if len(declared) == 2 else [inputs[kind]]
        return {t["name"]: np.ascontiguousarray(a, dtype=t["dtype"]) for t, a in zip(declared, arrays)}

    def text_inputs(self, question: str) -> dict[str, np.ndarray]:
        from .components.text_encoder import encode_text_inputs
        from .tokenizers import load_text_tokenizer

        if self._text_tokenizer is None:
            self._text_tokenizer = load_text_tokenizer(self.bundle.tokenizer_dir("text"))
        arrays = encode_text_inputs(self._text_tokenizer, question, self.cfg)
        declared = self._graph(self.text_encoder)["inputs"]
        return {t["name"]: np.ascontiguousarray(a.numpy() if hasattr(a, "numpy") else a, dtype=t["dtype"])
                for t, a in zip(declared, arrays)}

    def _first(self, name: str, feed: dict[str, np.ndarray]) -> np.ndarray:
        out = self.runner(name).infer(feed)
        return out[self._graph(name)["outputs"][0]["name"]]

    def _adapter(self, state: RoutingPass, mask: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        declared = self._graph(self.adapter)["inputs"]
        expert_inputs = declared[1:1 + len(self.experts)]
        feed = {declared[0]["name"]: state.base, declared[-2]["name"]: state.text,
                declared[-1]["name"]: np.asarray([list(mask)], dtype=declared[-1]["dtype"])}
        for t, name, on in zip(expert_inputs, self.experts, mask):
            feed[t["name"]] = state.experts[name] if on else np.zeros(t["shape"], t["dtype"])
        out = self.runner(self.adapter).infer(feed)
        names = [t["name"] for t in self._graph(self.adapter)["outputs"]]
        return out[names[0]], out[names[1]]

    # ---- the two passes --------------------------------------------------------------------------------------------
    def routing_pass(self, image: Any, question: str) -> RoutingPass:
        from .preprocess import load_image, preprocess

        if not isinstance(question, str) or not question.strip():
            raise RuntimeInputError("the question is empty; pass a non-empty question string")
        inputs = preprocess(load_image(image), self.cfg)
        base = self._first("base", self._tower_feed("base", inputs))
        text = self._first(self.text_encoder, self.text_inputs(question))
        state = RoutingPass(inputs=inputs, base=base, text=text, routing_tokens=np.empty(0), image_tokens=np.empty(0))
        state.image_tokens, state.routing_tokens = self._adapter(state, [0] * len(self.experts))
        return state

    def answer_pass(self, state: RoutingPass, mask: Sequence[int]) -> np.ndarray:
        """Image tokens for the answer pass: the routed experts only, then the adapter with the mask."""
        mask = [int(bool(m)) for m in mask]
        if len(mask) != len(self.experts):
            raise RuntimeInputError(f"routing mask has {len(mask)} entries; this bundle has {len(self.experts)} "
                                    "experts")
        if not any(mask):
            return state.image_tokens
        for name, on in zip(self.experts, mask):
            if on and name not in state.experts:
                state.experts[name] = self._first(name, self._tower_feed(name, state.inputs))
        image_tokens, _ = self._adapter(state, mask)
        return image_tokens

    @property
    def providers(self) -> dict[str, tuple[str, ...]]:
        return {name: r.providers for name, r in self._runners.items()}

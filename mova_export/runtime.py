"""The embeddable runtime: a bundle becomes answers, MoVA's two passes, for a robot's loop.

    from mova_export.runtime import MoVARuntime

    with MoVARuntime.from_bundle("bundle", device="cpu") as rt:
        rt.warmup()
        answer = rt.ask(frame, "What is on the table?")      # frame: HxWx3 uint8 numpy, PIL image or a path
        print(answer.text, answer.experts, answer.timings_ms["total"])
        stream = rt.ask_stream(frame, "Describe the scene.")
        for piece in stream:                                    # text pieces as the LLM makes them
            print(piece, end="", flush=True)
        print(stream.answer.tokens_per_s)

Per request (mova/eval/model_vqa_loader.py): preprocess -> base once -> text feature once -> adapter with no
experts -> 144 routing tokens -> LLM routing generation (<= 16 tokens, its own KV state) -> letters parsed as
upstream does -> only the routed experts -> adapter with the mask (skipped when nothing is routed) -> LLM answer.
The vision graphs run through `VisionSession` (ONNX Runtime / TensorRT / torch per component), the LLM through the
bundle's GGUF in llama.cpp (`LlamaCppLLM`).

Contract for a host process:
* Loading happens once, in `from_bundle` (every session of the resident policy; the lazy policy creates an expert's
  session the first time it is routed and keeps at most `max_resident_experts`).
* Concurrent calls are serialised: one lock guards the LLM and the sessions, so `ask` may be called from several
  threads and each call gets the answer a sequential call would. A stream holds the lock from its first token until
  it is exhausted or closed; calling `ask` on the thread that holds an open stream raises RuntimeInputError instead
  of deadlocking.
* A bad frame (None, wrong shape or dtype, unreadable file), an empty or over-long question or a bad
  max_new_tokens raises `RuntimeInputError` (a `MoVAExportError`) before any state changes; the runtime stays
  usable and the next good frame works.
* `close()` (or leaving the `with` block) frees the LLM and the sessions; later calls raise RuntimeInputError.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from .bundle import Bundle, load_bundle, sha256_file, MANIFEST
from .config import EXPERT_LETTERS
from .errors import RuntimeInputError
from .prompts import MAX_ROUTING_TOKENS, chat_prompt, parse_routing, routed_letters
from .vision import BACKENDS, RoutingPass, VisionSession

STAGES = ("preprocess", "base", "text_encoder", "adapter_routing", "llm_routing",
          *(f"expert_{letter}" for letter in EXPERT_LETTERS), "adapter_answer", "llm_prefill",
          "time_to_first_token", "llm_decode", "total")
MAX_NEW_TOKENS_LIMIT = 4096


@dataclass
class Answer:
    text: str
    experts: list[str]                      # routed letters, e.g. ["A", "D"]
    routing_text: str                       # what the LLM said in the routing pass
    routing_mask: list[int]                 # [7] multi-hot
    token_ids: list[int]                    # answer ids (no stop id)
    routing_ids: list[int]
    timings_ms: dict[str, float] = field(default_factory=dict)
    tokens_per_s: float = 0.0               # decode throughput (tokens after the first / llm_decode)
    tensors: dict[str, np.ndarray] = field(default_factory=dict)  # ask(..., keep_tensors=True): intermediates

    def to_json(self) -> dict[str, Any]:
        """The fields of `mova-export reference --json`, plus tokens_per_s."""
        return {"experts": self.experts, "answer": self.text, "routing_text": self.routing_text,
                "routing_mask": self.routing_mask, "answer_ids": self.token_ids, "routing_ids": self.routing_ids,
                "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()},
                "tokens_per_s": round(self.tokens_per_s, 3)}


class StreamingAnswer:
    """Iterate for the answer's text pieces; `.answer` (an Answer) is set once the iterator is exhausted.
    While iterating it holds the runtime's lock: exhaust it or `close()` it (a `with` block does)."""

    def __init__(self, runtime: "MoVARuntime", request: dict[str, Any]):
        self.answer: Answer | None = None
        self._gen = runtime._run(request, self)

    def __iter__(self) -> "StreamingAnswer":
        return self

    def __next__(self) -> str:
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()

    def __enter__(self) -> "StreamingAnswer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class MoVARuntime:
    """A loaded bundle: vision sessions + the GGUF LLM, answering (image, question) with MoVA's two passes."""

    def __init__(self, bundle: Bundle, vision: VisionSession, llm: Any, *, device: str, backend: str):
        self.bundle = bundle
        self.vision = vision
        self.llm = llm
        self.cfg = bundle.config
        self.device = device
        self.backend = backend
        self.manifest_sha256 = sha256_file(bundle.path / MANIFEST)
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._closed = False
        self._prompt_cache: OrderedDict[tuple[str, bool], list[int]] = OrderedDict()

    @classmethod
    def from_bundle(cls, path: str | Path | Bundle, device: str = "cpu", backend: str = "auto",
                    precision: str | Mapping[str, str] | None = None, llm_threads: int | None = None,
                    n_gpu_layers: int | None = None, verify: bool = True, *, expert_policy: str | None = None,
                    max_resident_experts: int | None = None, vision_threads: int | None = None,
                    llm_f32_kv: bool = False, n_ctx: int | None = None) -> "MoVARuntime":
        """Load a bundle once: check its files (verify), create the sessions and the llama.cpp context.

        device: "cpu" or "cuda" (ONNX Runtime's CUDA EP / TensorRT / torch CUDA for the vision side, llama.cpp GPU
        layers for the LLM); backend: "auto" | "onnxruntime" | "tensorrt" | "torch" for the vision graphs;
        precision: overrides the manifest's per-component precision (one str, or {component: precision});
        expert_policy: "resident" | "lazy" (default: the manifest's runtime.expert_policy, else resident);
        llm_f32_kv: an F32 KV cache (with an f32 GGUF this makes the LLM match the fp32 reference exactly).
        Raises BundleError (missing/tampered bundle, unknown precision), LLMError (GGUF), RuntimeInputError.
        """
        from .llm import LlamaCppLLM

        if backend not in BACKENDS:
            raise RuntimeInputError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
        bundle = path if isinstance(path, Bundle) else load_bundle(path, verify=verify)
        settings = bundle.manifest.get("runtime") or {}
        policy = expert_policy or settings.get("expert_policy", "resident")
        cap = max_resident_experts if max_resident_experts is not None else settings.get("max_loaded_experts")
        vision = VisionSession(bundle, precision, device, backend=backend, expert_policy=policy,
                               max_resident_experts=cap, threads=vision_threads)
        entry = bundle.llm  # BundleError when the bundle has no GGUF
        gpu_layers = n_gpu_layers if n_gpu_layers is not None else (
            int(entry.get("n_gpu_layers") or 0) if device == "cuda" else 0)
        try:
            vision.load()
            llm = LlamaCppLLM(entry["path"], n_ctx=int(n_ctx or entry.get("n_ctx") or 4096), n_gpu_layers=gpu_layers,
                              n_threads=llm_threads or _cap_threads(entry.get("n_threads")), f32_kv=llm_f32_kv)
        except BaseException:
            vision.close()
            raise
        return cls(bundle, vision, llm, device=device, backend=backend)

    # ---- info ---------------------------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """What runs where: per-component backend, precision and providers, fallbacks, LLM settings, manifest hash."""
        llm_entry = self.bundle.manifest.get("llm", {})
        return {"bundle": str(self.bundle.path), "manifest_sha256": self.manifest_sha256, "device": self.device,
                "backend": self.backend, "expert_policy": self.vision.expert_policy,
                "max_resident_experts": self.vision.max_resident_experts,
                "components": {name: {"backend": self.vision.backends[name], "precision": self.vision.precisions[name],
                                      "providers": list(self.vision.providers.get(name, ()))}
                               for name in self.bundle.manifest["graphs"]},
                "loaded": self.vision.loaded, "fallbacks": dict(self.vision.fallbacks),
                "llm": {"gguf": llm_entry.get("gguf"), "qtype": llm_entry.get("qtype"),
                        "f32_kv": getattr(self.llm, "f32_kv", None), "n_ctx": getattr(self.llm, "n_ctx", None)}}

    # ---- requests -----------------------------------------------------------------------------------------------
    def ask(self, image: Any, question: str, max_new_tokens: int = 64, *, experts: Sequence[str] | None = None,
            keep_tensors: bool = False) -> Answer:
        """Answer one question about one frame (see the module docstring for the contract).

        experts: override the routing with letters (e.g. ["A", "D"], [] for none), like `reference --experts`; the
        routing generation still runs. keep_tensors: put the intermediate features in `Answer.tensors` (the keys of
        ReferenceResult.tensors). Raises RuntimeInputError for a bad frame or question."""
        stream = self.ask_stream(image, question, max_new_tokens, experts=experts, keep_tensors=keep_tensors)
        for _ in stream:
            pass
        assert stream.answer is not None
        return stream.answer

    def ask_stream(self, image: Any, question: str, max_new_tokens: int = 64, *,
                   experts: Sequence[str] | None = None, keep_tensors: bool = False) -> StreamingAnswer:
        """Like ask, but returns a StreamingAnswer yielding the answer's text pieces as they are generated. The
        inputs are checked here (RuntimeInputError at once); the work starts on the first `next()`."""
        start = time.perf_counter()
        request = self._check(image, question, max_new_tokens, experts)
        request.update(keep_tensors=keep_tensors, start=start)
        return StreamingAnswer(self, request)

    def warmup(self, question: str = "Describe the image.", image: Any = None) -> Answer:
        """One full request on a synthetic frame (mid-gray with a gradient) so the first real frame does not pay
        for lazy initialisation; with the resident policy every expert runs once (forced routing, topk at a time).
        Returns the last warm-up Answer."""
        frame = image if image is not None else _warmup_frame()
        letters = [self.bundle.manifest["graphs"][n]["expert"]["letter"] for n in self.vision.experts]
        groups: list[list[str]] = [[]]
        if self.vision.expert_policy == "resident" and letters:
            k = max(1, self.cfg.topk_experts)
            groups = [letters[i:i + k] for i in range(0, len(letters), k)]
        answer = None
        for group in groups:
            answer = self.ask(frame, question, max_new_tokens=2, experts=group)
        assert answer is not None
        return answer

    # ---- internals ----------------------------------------------------------------------------------------------
    def _check(self, image: Any, question: Any, max_new_tokens: Any, experts: Sequence[str] | None
               ) -> dict[str, Any]:
        from .preprocess import load_image

        if self._closed:
            raise RuntimeInputError("this MoVARuntime is closed; create a new one with MoVARuntime.from_bundle")
        if image is None:
            raise RuntimeInputError("the frame is None; pass an HxWx3 uint8 numpy array, a PIL image or an image path")
        if not isinstance(question, str):
            raise RuntimeInputError(f"the question is a {type(question).__name__}; pass a non-empty string")
        if not question.strip():
            raise RuntimeInputError("the question is empty; pass a non-empty question string")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or not (
                1 <= int(max_new_tokens) <= MAX_NEW_TOKENS_LIMIT):
            raise RuntimeInputError(f"max_new_tokens={max_new_tokens!r}; pass an integer from 1 to "
                                    f"{MAX_NEW_TOKENS_LIMIT}")
        mask = None
        if experts is not None:
            letters = [str(e).strip().upper() for e in experts]
            bad = [e for e in letters if e not in EXPERT_LETTERS]
            if bad:
                raise RuntimeInputError(f"unknown expert letter(s) {bad}; use {', '.join(EXPERT_LETTERS)}")
            mask = parse_routing(", ".join(letters))
        if isinstance(image, np.ndarray) and image.ndim == 4:
            raise RuntimeInputError(f"image array has shape {list(image.shape)}: a batch; MoVA answers one frame "
                                    "at a time (B=1): pass HxWx3")
        rgb = load_image(image)  # RuntimeInputError: wrong shape or dtype, unreadable file, unknown type
        if min(rgb.shape[:2]) < 2:
            raise RuntimeInputError(f"image has {rgb.shape[1]}x{rgb.shape[0]} pixels; pass a real frame "
                                    "(at least 2x2)")
        return {"rgb": rgb, "question": question, "max_new_tokens": int(max_new_tokens), "mask": mask}

    def _prompt_ids(self, question: str, routing: bool) -> list[int]:
        key = (question, routing)
        ids = self._prompt_cache.get(key)
        if ids is None:
            prompt = chat_prompt(question, routing=routing, use_im_start_end=self.cfg.mm_use_im_start_end)
            ids = self.llm.encode_prompt(prompt)
            self._prompt_cache[key] = ids
            while len(self._prompt_cache) > 64:
                self._prompt_cache.popitem(last=False)
        else:
            self._prompt_cache.move_to_end(key)
        return ids

    def _acquire(self) -> None:
        if self._owner == threading.get_ident():
            raise RuntimeInputError("this thread holds an unfinished ask_stream; exhaust or close() it before "
                                    "asking again")
        self._lock.acquire()
        self._owner = threading.get_ident()

    def _release(self) -> None:
        self._owner = None
        self._lock.release()

    def _run(self, request: dict[str, Any], out: StreamingAnswer) -> Iterator[str]:
        self._acquire()
        try:
            if self._closed:
                raise RuntimeInputError("this MoVARuntime was closed while the request waited")
            yield from self._two_passes(request, out)
        finally:
            self._release()

    def _two_passes(self, request: dict[str, Any], out: StreamingAnswer) -> Iterator[str]:
        timings: dict[str, float] = {}
        start = request["start"]
        question, max_new = request["question"], request["max_new_tokens"]
        vision, llm = self.vision, self.llm
        # routing pass
        state: RoutingPass = vision.routing_pass(request["rgb"], question, timings)
        routing_in = self._prompt_ids(question, routing=True)
        t0 = time.perf_counter()
        routing_ids = llm.generate_ids(routing_in, state.routing_tokens[0], MAX_ROUTING_TOKENS)
        timings["llm_routing"] = (time.perf_counter() - t0) * 1e3
        routing_text = llm.detokenize(routing_ids).strip()
        mask = request["mask"] if request["mask"] is not None else parse_routing(routing_text)
        # answer pass
        image_tokens = vision.answer_pass(state, mask, timings)
        answer_in = self._prompt_ids(question, routing=False)
        ids: list[int] = []
        t0 = time.perf_counter()
        t_first = None
        for token, piece in llm.generate(answer_in, image_tokens[0], max_new):
            if t_first is None:
                t_first = time.perf_counter()
                timings["llm_prefill"] = (t_first - t0) * 1e3
                timings["time_to_first_token"] = (t_first - start) * 1e3
            ids.append(token)
            if piece:
                yield piece
        t_end = time.perf_counter()
        if t_first is None:  # the first token was a stop token: prefill only
            t_first = t_end
            timings["llm_prefill"] = (t_end - t0) * 1e3
            timings["time_to_first_token"] = (t_end - start) * 1e3
        timings["llm_decode"] = (t_end - t_first) * 1e3
        timings["total"] = (t_end - start) * 1e3
        # decode forwards after the prefill: one per token after the first, plus one that produced the stop id
        forwards = len(ids) - 1 + (1 if 0 < len(ids) < max_new else 0)
        decode_s = timings["llm_decode"] / 1e3
        tokens_per_s = forwards / decode_s if forwards > 0 and decode_s > 0 else 0.0
        tensors: dict[str, np.ndarray] = {}
        if request["keep_tensors"]:
            tensors = {"base": state.base, "text_features": state.text, "routing_tokens": state.routing_tokens,
                       "image_tokens": image_tokens}
            graphs = self.bundle.manifest["graphs"]
            tensors.update({f"expert_{graphs[n]['expert']['letter']}": f for n, f in state.experts.items()})
        out.answer = Answer(text=llm.detokenize(ids).strip(), experts=routed_letters(mask), routing_text=routing_text,
                            routing_mask=list(mask), token_ids=ids, routing_ids=list(routing_ids), timings_ms=timings,
                            tokens_per_s=tokens_per_s, tensors=tensors)

    # ---- lifecycle ----------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Free the LLM and every session. Waits for a request in flight on another thread."""
        if self._closed:
            return
        if self._owner == threading.get_ident():
            raise RuntimeInputError("close() called while this thread holds an unfinished ask_stream; close the "
                                    "stream first")
        with self._lock:
            self._closed = True
            self.vision.close()
            if self.llm is not None:
                self.llm.close()
                self.llm = None

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "MoVARuntime":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _cap_threads(n: int | None) -> int | None:
    """The recipe's LLM thread count, but never more than this host's cores (oversubscription slows llama.cpp)."""
    import os

    return None if n is None else max(1, min(int(n), os.cpu_count() or int(n)))


def _warmup_frame() -> np.ndarray:
    ramp = np.linspace(64, 192, 96, dtype=np.uint8)
    return np.ascontiguousarray(np.stack([np.tile(ramp, (96, 1)), np.tile(ramp[:, None], (1, 96)),
                                          np.full((96, 96), 128, np.uint8)], axis=2))


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (MiB), from getrusage (KiB on Linux, bytes on macOS)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


__all__ = ["Answer", "MoVARuntime", "StreamingAnswer", "STAGES", "peak_rss_mib"]

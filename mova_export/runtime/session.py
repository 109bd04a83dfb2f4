"""The embeddable runtime: a bundle becomes answers, MoVA's two passes, for a robot's loop.

    from mova_export.runtime import MoVARuntime

    with MoVARuntime.from_bundle("bundle") as rt:
        rt.warmup()
        answer = rt.ask(frame, "What is on the table?")      # frame: HxWx3 uint8 numpy, PIL image or a path
        print(answer.text, answer.experts, answer.timings_ms["total"])
        with rt.ask_stream(frame, "Describe the scene.") as stream:
            for piece in stream:                                # text pieces as the LLM makes them
                print(piece, end="", flush=True)
        print(stream.answer.tokens_per_s)

The two passes are runtime.two_pass (the PyTorch reference runs the same code with its own runners); here the
vision graphs run through BundleVision (ONNX Runtime / TensorRT per graph) and the LLM through the bundle's GGUF in
llama.cpp. Neither torch nor transformers is imported.

Contract for a host process:
* Loading happens once, in `from_bundle` (every session of the resident policy; the lazy policy creates an expert's
  session the first time it is routed and keeps at most `max_resident_experts`).
* Concurrent calls are serialised: one lock guards the LLM and the sessions, so `ask` may be called from several
  threads and each call gets the answer a sequential call would. A stream holds the lock from its first token until
  it is exhausted or closed; calling `ask` on the thread that holds an open stream raises RuntimeInputError instead
  of deadlocking.
* A bad frame (None, wrong shape or dtype, unreadable file), an empty question or a bad max_new_tokens raises
  `RuntimeInputError` (a `MoVAExportError`) before any state changes; the runtime stays usable and the next good
  frame works.
* `close()` (or leaving the `with` block) frees the LLM and the sessions; later calls raise RuntimeInputError.
"""
from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from ..bundle import MANIFEST, Bundle, LLMSettings, load_bundle, sha256_file
from ..bundle.signing import load_trusted_bundle
from ..core.errors import RuntimeInputError
from ..core.image_inputs import load_image
from .frames import FRAMES_BY_DEFAULT, FrameCache, frame_bytes
from .limits import check_context
from .llm import LlamaCppLLM
from .requests import FrameHandle, PreparedRequest, StreamingAnswer, deadline_after
from .two_pass import Answer, Request, Sampling, two_passes
from .vision import BACKENDS, BundleVision
from .worker import POLICIES, AnswerFuture, RequestWorker, callbacks

MAX_NEW_TOKENS_LIMIT = 4096


@dataclass(frozen=True)
class RuntimeOptions:
    """How to run a bundle; every field defaults to what the bundle's manifest says.

    device: "cpu" or "cuda" (ONNX Runtime's CUDA EP / TensorRT for the vision graphs, llama.cpp GPU layers);
    backend: "auto" | "onnxruntime" | "tensorrt" for the vision graphs; precision: one for every graph, or
    {graph or component: precision}; expert_policy: "resident" | "lazy"; llm: overrides of the bundle's
    LLMSettings fields (n_ctx, n_gpu_layers, n_threads, flash_attn, f32_kv); frame_cache_mib and overlap: see
    runtime/frames.py and runtime/two_pass.py (neither changes an answer)."""
    device: str = "cpu"
    backend: str = "auto"
    precision: str | Mapping[str, str] | None = None
    expert_policy: str | None = None
    max_resident_experts: int | None = None
    vision_threads: int | None = None
    llm: Mapping[str, Any] = field(default_factory=dict)
    llm_quant: str | None = None            # which shipped GGUF (default: the bundle's)
    verify: bool = True
    frame_cache_mib: float | None = None    # pixel-only results of recent frames (None: 3 frames' worth; 0: off)
    # BERT during the routing generation and expert inputs ahead, on a second thread. None: on with device="cuda"
    # (its CPU work runs beside the GPU's graphs), off on a CPU, where both threads share the cores (2 cores: 0.92x)
    overlap: bool | None = None
    # a PEM public key (or the root CA certificate) the bundle must be signed with (`mova-export sign`): an unsigned
    # bundle, another signer or a file changed after signing is refused before any graph, engine or GGUF is opened
    trusted_key: str | Path | None = None

    def llm_settings(self, bundled: LLMSettings) -> LLMSettings:
        known = {f.name for f in fields(LLMSettings)}
        unknown = sorted(set(self.llm) - known)
        if unknown:
            raise RuntimeInputError(f"unknown LLM setting(s) {unknown}; use {', '.join(sorted(known))}")
        settings = replace(bundled, **dict(self.llm))
        if self.device != "cuda" and "n_gpu_layers" not in self.llm:
            settings = replace(settings, n_gpu_layers=0)       # the recipe's GPU layers only apply on the GPU
        cores = os.cpu_count() or 1
        if settings.n_threads is not None and settings.n_threads > cores:
            settings = replace(settings, n_threads=cores)       # oversubscription slows llama.cpp down
        return settings


class _PromptCache:
    """The two prompts of a question tokenized once: a robot asks the same question of every frame."""

    def __init__(self, llm: Any, size: int = 64):
        self.llm, self.size = llm, size
        self.cache: OrderedDict[str, list[int]] = OrderedDict()

    def encode_prompt(self, prompt: str) -> list[int]:
        if prompt not in self.cache:
            self.cache[prompt] = self.llm.encode_prompt(prompt)
            while len(self.cache) > self.size:
                self.cache.popitem(last=False)
        self.cache.move_to_end(prompt)
        return self.cache[prompt]

    def generate(self, ids: Sequence[int], image_embeddings: np.ndarray, max_new_tokens: int, **sampling: Any
                 ) -> Iterator[Any]:
        return self.llm.generate(ids, image_embeddings, max_new_tokens, **sampling)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.llm.detokenize(ids)


class MoVARuntime:
    """A loaded bundle: vision sessions + the GGUF LLM, answering (image, question) with MoVA's two passes."""

    def __init__(self, bundle: Bundle, vision: BundleVision, llm: Any, options: RuntimeOptions):
        self.bundle = bundle
        self.facts = bundle.manifest.model
        self.vision = vision
        self.llm = llm
        self.options = options
        self.manifest_sha256 = sha256_file(bundle.path / MANIFEST)
        self._language = _PromptCache(llm)
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._closed = False
        mib = options.frame_cache_mib
        capacity = FRAMES_BY_DEFAULT * frame_bytes(bundle.manifest.graphs.values()) if mib is None else mib * 2**20
        self.frames = FrameCache(int(capacity))
        self._helper = ThreadPoolExecutor(1, thread_name_prefix="mova-overlap")   # its thread starts on first use
        # settable: a benchmark compares both on one loaded runtime
        self.overlap = options.device == "cuda" if options.overlap is None else bool(options.overlap)
        self._worker = RequestWorker(self._wait_idle)

    @classmethod
    def from_bundle(cls, path: str | Path | Bundle, options: RuntimeOptions | None = None,
                    **overrides: Any) -> "MoVARuntime":
        """Load a bundle once: check its files (options.verify), create the sessions and the llama.cpp context.
        `overrides` are RuntimeOptions fields (`MoVARuntime.from_bundle(b, device="cuda", precision="fp32")`).
        Raises BundleError (missing/tampered bundle, unknown precision; SignatureError: not signed by
        options.trusted_key), LLMError (GGUF), RuntimeInputError."""

        try:
            options = replace(options or RuntimeOptions(), **overrides)
        except TypeError as exc:
            raise RuntimeInputError(f"unknown runtime option: {exc}; see RuntimeOptions") from None
        mib = options.frame_cache_mib
        if mib is not None and (isinstance(mib, bool) or not isinstance(mib, (int, float)) or mib < 0):
            raise RuntimeInputError(f"frame_cache_mib={mib!r}; pass a size in MiB >= 0 (0 turns the cache off)")
        if options.backend not in BACKENDS:
            raise RuntimeInputError(f"unknown backend {options.backend!r}; use one of {', '.join(BACKENDS)}")
        if options.trusted_key is not None:      # the signature first: nothing is opened before it verifies
            bundle = load_trusted_bundle(path.path if isinstance(path, Bundle) else path, options.trusted_key)[0]
        else:
            bundle = path if isinstance(path, Bundle) else load_bundle(path, verify=options.verify)
        defaults = bundle.manifest.runtime
        vision = BundleVision(bundle, options.precision, options.device, backend=options.backend,
                              expert_policy=options.expert_policy or defaults.expert_policy,
                              max_resident_experts=(options.max_resident_experts if options.max_resident_experts
                                                    is not None else defaults.max_loaded_experts),
                              threads=options.vision_threads)
        entry = bundle.llm_entry(options.llm_quant)  # BundleError when the bundle has no such GGUF
        gguf = bundle.path / entry.gguf
        settings = options.llm_settings(entry.settings)
        try:
            vision.load()
            llm = LlamaCppLLM(gguf, **settings.to_json())
        except BaseException:
            vision.close()
            raise
        return cls(bundle, vision, llm, options)

    # ---- info ---------------------------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """What runs where: per-graph backend, precision and providers, fallbacks, LLM settings, manifest hash."""
        llm = self.bundle.llm_entry(self.options.llm_quant)
        return {"bundle": str(self.bundle.path), "manifest_sha256": self.manifest_sha256,
                "device": self.options.device, "backend": self.options.backend,
                "expert_policy": self.vision.expert_policy, "max_resident_experts": self.vision.max_resident_experts,
                "graphs": {name: {"backend": self.vision.backends[name], "precision": self.vision.precisions[name],
                                  "providers": list(self.vision.providers.get(name, ()))}
                           for name in self.bundle.manifest.graphs},
                "loaded": self.vision.loaded, "fallbacks": dict(self.vision.fallbacks),
                "llm": {"gguf": llm.gguf, "qtype": llm.qtype,
                        "f32_kv": getattr(self.llm, "f32_kv", None), "n_ctx": getattr(self.llm, "n_ctx", None)}}

    # ---- requests -----------------------------------------------------------------------------------------------
    def ask(self, image: Any, question: str, max_new_tokens: int = 64, *, experts: Sequence[str] | None = None,
            keep_tensors: bool = False, deadline_s: float | None = None, sampling: Sampling | None = None
            ) -> Answer:
        """Answer one question about one frame (see the module docstring for the contract).

        image: a frame (numpy, PIL, path) or a `rt.frame(...)` handle. experts: override the routing with letters
        (e.g. ["A", "D"], [] for none), like `reference --experts`; the routing generation still runs.
        keep_tensors: put the intermediate features in `Answer.tensors`. deadline_s: stop the answer after the token
        that passes it (`Answer.cut == "deadline"`). sampling: the answer pass samples (runtime.sampling_of(
        temperature, top_p, seed)); greedy when None. Raises RuntimeInputError for a bad frame or question."""
        stream = self.ask_stream(image, question, max_new_tokens, experts=experts, keep_tensors=keep_tensors,
                                 deadline_s=deadline_s, sampling=sampling)
        for _ in stream:
            pass
        assert stream.answer is not None
        return stream.answer

    def ask_stream(self, image: Any, question: str, max_new_tokens: int = 64, *,
                   experts: Sequence[str] | None = None, keep_tensors: bool = False,
                   deadline_s: float | None = None, sampling: Sampling | None = None) -> StreamingAnswer:
        """Like ask, but returns a StreamingAnswer yielding the answer's text pieces as they are generated. The
        inputs are checked here (RuntimeInputError at once); the work starts on the first `next()`."""
        deadline = deadline_after(deadline_s)
        request = self._request(image, question, max_new_tokens, experts, keep_tensors, sampling)
        if deadline is not None:
            request.stop = lambda: "deadline" if time.monotonic() > deadline else None
        return StreamingAnswer(self, request)

    def frame(self, image: Any) -> "FrameHandle":
        """A handle for several questions on one frame: `with rt.frame(rgb) as f: f.ask(q1); f.ask(q2)`. The frame's
        pixel-only results are computed once and held by the handle until it closes, with the cache on or off."""
        rgb = self._frame_pixels(image)
        return FrameHandle(self, self.frames.state(rgb)[0])

    def submit(self, image: Any, question: str, max_new_tokens: int = 64, *,  # noqa: PLR0913 (ask's options + the queue's)
               stream: str = "default",
               policy: str = "latest", deadline_s: float | None = None, experts: Sequence[str] | None = None,
               on_answer: Callable[[Answer], None] | None = None,
               on_error: Callable[[BaseException], None] | None = None,
               on_piece: Callable[[str], None] | None = None, sampling: Sampling | None = None) -> AnswerFuture:
        """Queue a request for the runtime's worker thread; returns a Future[Answer] (runtime/worker.py: the
        `latest` and `queue` policies per stream, cancel and deadline). on_answer / on_error: the callback form;
        on_piece(text) is called on the worker thread for each piece as it is generated. Inputs are checked here:
        RuntimeInputError at once, nothing queued."""
        if policy not in POLICIES:
            raise RuntimeInputError(f"unknown policy {policy!r}; use one of {', '.join(POLICIES)}")
        if not isinstance(stream, str) or not stream:
            raise RuntimeInputError(f"stream={stream!r}; pass a non-empty name (a camera, a topic)")
        deadline = deadline_after(deadline_s)
        request = self._request(image, question, max_new_tokens, experts, False, sampling)
        future = AnswerFuture(stream, policy, deadline)
        callbacks(future, on_answer, on_error)

        def run(f: AnswerFuture) -> Answer:
            request.stop = f.stop_reason
            request.start = time.perf_counter()    # the answer's timings start when it runs, not when queued
            with self.ask_stream(PreparedRequest(request), request.question) as pieces:
                for piece in pieces:
                    if on_piece is not None:
                        on_piece(piece)
            assert pieces.answer is not None
            return pieces.answer

        return self._worker.submit(future, run)

    def warmup(self, question: str = "Describe the image.", image: Any = None) -> Answer:
        """One full request on a synthetic frame (a gradient) so the first real frame does not pay for lazy
        initialisation (allocations, kernel selection); with the resident policy every expert runs once (forced
        routing, topk at a time). Returns the last warm-up Answer."""
        frame = image if image is not None else _warmup_frame()
        letters = [e.letter for e in self.facts.experts if e.component in self.vision.experts]
        groups: list[list[str]] = [[]]
        if self.vision.expert_policy == "resident" and letters:
            k = max(1, self.facts.topk_experts)
            groups = [letters[i:i + k] for i in range(0, len(letters), k)]
        answer = None
        for group in groups:
            answer = self.ask(frame, question, max_new_tokens=2, experts=group)
        self.frames.clear()        # the synthetic frame is no robot's
        assert answer is not None
        return answer

    # ---- internals ----------------------------------------------------------------------------------------------
    def _frame_pixels(self, image: Any) -> np.ndarray:
        if self._closed:
            raise RuntimeInputError("this MoVARuntime is closed; create a new one with MoVARuntime.from_bundle")
        if image is None:
            raise RuntimeInputError("the frame is None; pass an HxWx3 uint8 numpy array, a PIL image or an image path")
        if isinstance(image, np.ndarray) and image.ndim == 4:
            raise RuntimeInputError(f"image array has shape {list(image.shape)}: a batch; MoVA answers one frame "
                                    "at a time (B=1): pass HxWx3")
        rgb = load_image(image)  # RuntimeInputError: wrong shape or dtype, unreadable file, unknown type
        if min(rgb.shape[:2]) < 2:
            raise RuntimeInputError(f"image has {rgb.shape[1]}x{rgb.shape[0]} pixels; pass a real frame "
                                    "(at least 2x2)")
        if isinstance(image, np.ndarray) and np.shares_memory(rgb, image):
            rgb = rgb.copy()          # a camera loop reuses its buffer: the request keeps the pixels it was given
        rgb.flags.writeable = False
        return rgb

    def _request(self, image: Any, question: Any, max_new_tokens: Any, experts: Sequence[str] | None,  # noqa: PLR0913 (ask's options)
                 keep_tensors: bool, sampling: Sampling | None = None) -> Request:
        if isinstance(image, PreparedRequest):
            return image.request
        if not isinstance(question, str):
            raise RuntimeInputError(f"the question is a {type(question).__name__}; pass a non-empty string")
        if not question.strip():
            raise RuntimeInputError("the question is empty; pass a non-empty question string")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or not (
                1 <= int(max_new_tokens) <= MAX_NEW_TOKENS_LIMIT):
            raise RuntimeInputError(f"max_new_tokens={max_new_tokens!r}; pass an integer from 1 to "
                                    f"{MAX_NEW_TOKENS_LIMIT}")
        check_context(self, question, int(max_new_tokens))   # both passes fit the LLM's context (runtime/limits.py)
        mask = None if experts is None else self.facts.mask_of(experts)
        if isinstance(image, FrameHandle):
            state = image.state_for(self)
        else:
            state = self.frames.state(self._frame_pixels(image))[0]
        if sampling is not None and not isinstance(sampling, Sampling):
            raise RuntimeInputError(f"sampling is a {type(sampling).__name__}; pass runtime.sampling_of(temperature, "
                                    "top_p, seed) or None for greedy")
        return Request(state.rgb, question, int(max_new_tokens), mask, keep_tensors, frame=state,
                       helper=self._helper if self.overlap else None, sampling=sampling)

    def _wait_idle(self) -> None:
        with self._lock:
            pass

    def _acquire(self) -> None:
        if self._owner == threading.get_ident():
            raise RuntimeInputError("this thread holds an unfinished ask_stream; exhaust or close() it before "
                                    "asking again")
        self._lock.acquire()
        self._owner = threading.get_ident()

    def _release(self) -> None:
        self._owner = None
        self._lock.release()

    def _serve(self, request: Request, out: StreamingAnswer) -> Iterator[str]:
        self._acquire()
        try:
            if self._closed:
                raise RuntimeInputError("this MoVARuntime was closed while the request waited")
            out.answer = yield from two_passes(self.facts, self.vision, self._language, request)
        finally:
            self.frames.trim()
            self._release()

    # ---- lifecycle ----------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Free the LLM and every session. Cancels queued submits, stops a running one after its current token and
        waits for a request in flight on another thread."""
        if self._closed:
            return
        if self._owner == threading.get_ident():
            raise RuntimeInputError("close() called while this thread holds an unfinished ask_stream; close the "
                                    "stream first")
        self._worker.close()
        with self._lock:
            self._closed = True
            self.frames.clear()
            self._helper.shutdown()
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

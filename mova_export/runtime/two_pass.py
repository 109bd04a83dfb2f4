"""MoVA's two passes, written once. The PyTorch reference and the device runtime differ only in the runners given.

Per request (mova/eval/model_vqa_loader.py): preprocess the base encoder's input -> base once -> adapter with no
expert -> routing tokens -> LLM routing generation (<= 16 tokens, its own KV state) -> letters parsed as upstream
does -> only the routed experts (their inputs preprocessed then) and the question's text feature -> adapter with the
routing mask (skipped when nothing is routed: it would repeat the routing pass's K=0 tokens exactly) -> LLM answer,
streamed. The text feature only feeds the adapter's gates, which only run when an expert is routed (binary = 0
removes the whole expert term otherwise), so a request that routes none does not need BERT.

Two additions for a robot's loop, neither changing a number: the pixel-only results (preprocessed inputs, base,
routing tokens, each expert's features) come from the request's FrameState when an earlier question on the same
frame computed them (runtime/frames.py); with a helper thread (RuntimeOptions.overlap) BERT runs while the LLM
generates the routing letters (ONNX Runtime and llama.cpp release the GIL; wasted when nothing is routed) and the
routed towers' inputs are preprocessed while the first expert's graph runs. `Request.stop` ends a request after
the current token (cancel, deadline).

Pure Python + numpy: the device runtime imports it without torch.
"""
from __future__ import annotations

import time
from concurrent.futures import Executor, Future, wait
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Iterator, Protocol, Sequence

import numpy as np

from ..core.facts import ModelFacts, TowerFacts
from ..core.prompts import chat_prompt
from .frames import FrameState

# Stages in the order a request meets them (the per-expert stages are expert_<letter>).
STAGES = ("preprocess", "base", "adapter_routing", "llm_routing", "experts", "text_encoder", "adapter_answer",
          "llm_prefill", "time_to_first_token", "llm_decode", "total")


class VisionRunners(Protocol):
    """The vision side of one MoVA: numpy in, numpy out."""

    def preprocess(self, rgb: np.ndarray, kind: str) -> list[np.ndarray]:
        """The arrays of one preprocessed image input (facts.image_inputs[kind].outputs order)."""

    def base(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        """[1, grid, C] base features."""

    def text(self, question: str) -> np.ndarray:
        """[1, Ct] text feature of the question (tokenization included)."""

    def adapter_routing(self, base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(image tokens with no expert, routing tokens)."""

    def expert(self, component: str, arrays: Sequence[np.ndarray]) -> np.ndarray:
        """[1, grid, C_j] aligned features of one expert."""

    def adapter_answer(self, base: np.ndarray, text: np.ndarray, mask: Sequence[int],
                       experts: dict[int, np.ndarray]) -> np.ndarray:
        """Image tokens with the routed experts (routing index -> features)."""


class LanguageModel(Protocol):
    def encode_prompt(self, prompt: str) -> list[int]:
        """Prompt ids with IMAGE_TOKEN_INDEX where <image> stands (prompts.tokenize_with_image)."""

    def generate(self, ids: Sequence[int], image_embeddings: np.ndarray, max_new_tokens: int
                 ) -> Iterator[tuple[int, str]]:
        """Greedy (token id, text piece) from a fresh KV state until a stop id or max_new_tokens; a model that
        samples also takes `sampling=Sampling(...)` (only passed when a request asks for it)."""

    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of ids, special tokens dropped."""


@dataclass(frozen=True)
class Sampling:
    """The answer pass's decoding when it is not plain greedy: logit_bias (token id -> added logit, OpenAI's
    -100..100) then, at temperature > 0, llama.cpp's chain (top-p, temperature, a draw seeded by `seed`; None: a
    fresh seed per request). The routing pass stays greedy and unbiased, as upstream MoVA decodes it."""
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()


@dataclass
class Answer:
    text: str
    experts: list[str]                      # routed letters, e.g. ["A", "D"]
    routing_text: str                       # what the LLM said in the routing pass
    routing_mask: list[int]                 # multi-hot over the experts
    token_ids: list[int]                    # answer ids (no stop id)
    routing_ids: list[int]
    timings_ms: dict[str, float] = field(default_factory=dict)
    tokens_per_s: float = 0.0               # decode throughput (forwards after the first token / llm_decode)
    tensors: dict[str, np.ndarray] = field(default_factory=dict)  # keep_tensors=True: the intermediates
    cache_hits: list[str] = field(default_factory=list)  # stages served from the frame's state (not in timings_ms)
    cut: str | None = None                  # "cancelled" / "deadline": stopped early, text is what came before
    prompt_tokens: int = 0                  # the answer pass's prompt positions (image tokens included)

    def to_json(self) -> dict[str, Any]:
        return {"experts": self.experts, "answer": self.text, "routing_text": self.routing_text,
                "routing_mask": self.routing_mask, "answer_ids": self.token_ids, "routing_ids": self.routing_ids,
                "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()},
                "tokens_per_s": round(self.tokens_per_s, 3), "cache_hits": self.cache_hits, "cut": self.cut}


@dataclass
class Request:
    rgb: np.ndarray                         # HxWx3 uint8
    question: str
    max_new_tokens: int
    mask: list[int] | None = None           # forced routing (the routing generation still runs)
    keep_tensors: bool = False
    start: float = field(default_factory=time.perf_counter)
    frame: FrameState | None = None         # the frame's pixel-only results so far (cache, rt.frame handle)
    stop: Callable[[], str | None] | None = None   # a reason ("cancelled", "deadline") ends it after this token
    helper: Executor | None = None          # a second thread: BERT during the routing generation, inputs ahead
    sampling: Sampling | None = None        # None: greedy (the reference's decoding)


class _Clock:
    def __init__(self) -> None:
        self.ms: dict[str, float] = {}

    def run(self, stage: str, fn: Callable[..., Any], *args: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args)
        self.add(stage, t0)
        return out

    def add(self, stage: str, t0: float, t1: float | None = None) -> None:
        self.ms[stage] = self.ms.get(stage, 0.0) + ((t1 or time.perf_counter()) - t0) * 1e3


def _timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float, float]:
    t0 = time.perf_counter()
    return fn(*args), t0, time.perf_counter()


class _Pixels:
    """A request's pixel-only stages, served from the frame's state where an earlier question computed them (a
    hit is listed in `hits` and not timed); what is computed is stored there for the next question. With a helper
    thread, `ahead` starts towers' preprocessing before their graphs need it."""

    def __init__(self, vision: VisionRunners, request: Request, clock: _Clock):
        self.vision, self.clock, self.helper = vision, clock, request.helper
        self.state = request.frame or FrameState(request.rgb)
        self.hits: list[str] = []
        self._pending: dict[str, Future] = {}
        self._had_inputs = set(self.state.inputs)     # a kind two towers share is no hit within one request

    def _hit(self, stage: str) -> None:
        if stage not in self.hits:
            self.hits.append(stage)

    def ahead(self, towers: Sequence[TowerFacts]) -> None:
        for kind in (k for t in towers for k in t.image_inputs):
            if self.helper is not None and kind not in self.state.inputs and kind not in self._pending:
                self._pending[kind] = self.helper.submit(_timed, self.vision.preprocess, self.state.rgb, kind)

    def arrays(self, tower: TowerFacts) -> list[np.ndarray]:
        for kind in tower.image_inputs:
            if kind in self.state.inputs:
                if kind in self._had_inputs:
                    self._hit("preprocess")
            elif kind in self._pending:
                value, t0, t1 = self._pending.pop(kind).result()
                self.clock.add("preprocess", t0, t1)
                self.state.inputs[kind] = [self.state.keep(a) for a in value]
            else:
                value = self.clock.run("preprocess", self.vision.preprocess, self.state.rgb, kind)
                self.state.inputs[kind] = [self.state.keep(a) for a in value]
        return [a for kind in tower.image_inputs for a in self.state.inputs[kind]]

    def base(self, tower: TowerFacts) -> np.ndarray:
        if self.state.base is None:
            arrays = self.arrays(tower)      # timed as "preprocess", not as part of "base"
            self.state.base = self.state.keep(self.clock.run("base", self.vision.base, arrays))
        else:
            self._hit("base")
        return self.state.base

    def routing(self, base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.state.routing is None:
            tokens = self.clock.run("adapter_routing", self.vision.adapter_routing, base)
            self.state.routing = (self.state.keep(tokens[0]), self.state.keep(tokens[1]))
        else:
            self._hit("adapter_routing")
        return self.state.routing

    def expert(self, tower: TowerFacts) -> np.ndarray:
        stage = f"expert_{tower.letter}"
        if tower.component in self.state.experts:
            self._hit(stage)
        else:
            arrays = self.arrays(tower)
            self.state.experts[tower.component] = self.state.keep(
                self.clock.run(stage, self.vision.expert, tower.component, arrays))
        return self.state.experts[tower.component]

    def finish(self, more: Sequence[Future]) -> None:
        """Wait for work still on the helper (a stopped request, an unrouted question's BERT): no work outlives
        its request, and an error there does not hide the request's own."""
        wait([*self._pending.values(), *more])


def two_passes(facts: ModelFacts, vision: VisionRunners, llm: LanguageModel, request: Request
               ) -> Generator[str, None, Answer]:
    """Yield the answer's text pieces as they are generated; the generator's return value is the Answer."""
    clock = _Clock()
    pixels = _Pixels(vision, request, clock)
    question = request.question
    stopped = request.stop or (lambda: None)
    text_job = None
    try:
        base = pixels.base(facts.base)
        image_tokens, routing_tokens = pixels.routing(base)
        if request.helper is not None and (request.mask is None or any(request.mask)):
            text_job = request.helper.submit(_timed, vision.text, question)   # needs no routing: overlap it
        routing_in = llm.encode_prompt(chat_prompt(question, routing_prompt=facts.routing_prompt,
                                                   use_im_start_end=facts.mm_use_im_start_end))
        routing_ids = clock.run("llm_routing", lambda: [t for t, _ in llm.generate(
            routing_in, routing_tokens[0], facts.max_routing_tokens)])
        routing_text = llm.detokenize(routing_ids).strip()
        mask = list(request.mask) if request.mask is not None else facts.parse_routing(routing_text)
        routed = {i: tower for i, (tower, on) in enumerate(zip(facts.experts, mask)) if on}
        pixels.ahead(list(routed.values()))
        experts: dict[int, np.ndarray] = {}
        text = None
        if routed and not stopped():
            experts = {i: pixels.expert(tower) for i, tower in routed.items()}
            if text_job is not None:
                text, t0, t1 = text_job.result()
                clock.add("text_encoder", t0, t1)
            else:
                text = clock.run("text_encoder", vision.text, question)
            image_tokens = clock.run("adapter_answer", vision.adapter_answer, base, text, mask, experts)
        ids: list[int] = []
        answer_in = llm.encode_prompt(chat_prompt(question, use_im_start_end=facts.mm_use_im_start_end))
        timing = _Generation(request)
        cut = stopped()
        sampled = {} if request.sampling is None else {"sampling": request.sampling}
        if cut is None:
            for token, piece in llm.generate(answer_in, image_tokens[0], request.max_new_tokens, **sampled):
                timing.token()
                ids.append(token)
                if piece:
                    yield piece
                cut = stopped()
                if cut is not None:
                    break
    finally:
        pixels.finish([text_job] if text_job is not None else [])
    timings = timing.finish(clock.ms, ids, request.max_new_tokens, cut)
    tensors: dict[str, np.ndarray] = {}
    if request.keep_tensors:
        tensors = {"base": base, "routing_tokens": routing_tokens, "image_tokens": image_tokens}
        if text is not None:
            tensors["text_features"] = text
        tensors.update({f"expert_{facts.experts[i].letter}": f for i, f in experts.items()})
    return Answer(text=llm.detokenize(ids).strip(), experts=facts.routed(mask), routing_text=routing_text,
                  routing_mask=mask, token_ids=ids, routing_ids=routing_ids, timings_ms=timings,
                  tokens_per_s=timing.tokens_per_s, tensors=tensors, cache_hits=pixels.hits, cut=cut,
                  prompt_tokens=sum(t >= 0 for t in answer_in) + int(image_tokens[0].shape[0]))


class _Generation:
    """The answer generation's clock: prefill (to the first token), decode, time to first token."""

    def __init__(self, request: Request):
        self.start, self.t0 = request.start, time.perf_counter()
        self.first: float | None = None
        self.tokens_per_s = 0.0

    def token(self) -> None:
        if self.first is None:
            self.first = time.perf_counter()

    def finish(self, timings: dict[str, float], ids: Sequence[int], max_new_tokens: int, cut: str | None
               ) -> dict[str, float]:
        end = time.perf_counter()
        first = end if self.first is None else self.first   # the first token was a stop token: prefill only
        timings["llm_prefill"] = (first - self.t0) * 1e3
        timings["time_to_first_token"] = (first - self.start) * 1e3
        timings["llm_decode"] = (end - first) * 1e3
        timings["total"] = (end - self.start) * 1e3
        expert_ms = [v for k, v in timings.items() if k.startswith("expert_")]
        if expert_ms:
            timings["experts"] = sum(expert_ms)
        # decode forwards after the prefill: one per token after the first, plus the one that produced the stop id
        forwards = len(ids) - 1 + (1 if 0 < len(ids) < max_new_tokens and cut is None else 0)
        decode_s = timings["llm_decode"] / 1e3
        self.tokens_per_s = forwards / decode_s if forwards > 0 and decode_s > 0 else 0.0
        return timings


def run_to_end(pieces: Generator[str, None, Answer]) -> Answer:
    """Drain a two_passes generator and return its Answer."""
    while True:
        try:
            next(pieces)
        except StopIteration as stop:
            return stop.value

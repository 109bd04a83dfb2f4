"""MoVA's two passes, written once. The PyTorch reference and the device runtime differ only in the runners given.

Per request (mova/eval/model_vqa_loader.py): preprocess the base encoder's input -> base once -> adapter with no
expert -> routing tokens -> LLM routing generation (<= 16 tokens, its own KV state) -> letters parsed as upstream
does -> only the routed experts (their inputs preprocessed then) and the question's text feature -> adapter with the
routing mask (skipped when nothing is routed: it would repeat the routing pass's K=0 tokens exactly) -> LLM answer,
streamed. The text feature only feeds the adapter's gates, which only run when an expert is routed (binary = 0
removes the whole expert term otherwise), so a request that routes none never runs BERT.

Pure Python + numpy: the device runtime imports it without torch.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Iterator, Protocol, Sequence

import numpy as np

from ..core.facts import ModelFacts, TowerFacts
from ..core.prompts import chat_prompt

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
        """Greedy (token id, text piece) from a fresh KV state until a stop id or max_new_tokens."""

    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of ids, special tokens dropped."""


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

    def to_json(self) -> dict[str, Any]:
        return {"experts": self.experts, "answer": self.text, "routing_text": self.routing_text,
                "routing_mask": self.routing_mask, "answer_ids": self.token_ids, "routing_ids": self.routing_ids,
                "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()},
                "tokens_per_s": round(self.tokens_per_s, 3)}


@dataclass
class Request:
    rgb: np.ndarray                         # HxWx3 uint8
    question: str
    max_new_tokens: int
    mask: list[int] | None = None           # forced routing (the routing generation still runs)
    keep_tensors: bool = False
    start: float = field(default_factory=time.perf_counter)


class _Clock:
    def __init__(self) -> None:
        self.ms: dict[str, float] = {}

    def run(self, stage: str, fn: Callable[..., Any], *args: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args)
        self.ms[stage] = self.ms.get(stage, 0.0) + (time.perf_counter() - t0) * 1e3
        return out


def two_passes(facts: ModelFacts, vision: VisionRunners, llm: LanguageModel, request: Request
               ) -> Generator[str, None, Answer]:
    """Yield the answer's text pieces as they are generated; the generator's return value is the Answer."""
    clock = _Clock()
    inputs: dict[str, list[np.ndarray]] = {}

    def arrays(tower: TowerFacts) -> list[np.ndarray]:
        for kind in tower.image_inputs:
            if kind not in inputs:
                inputs[kind] = clock.run("preprocess", vision.preprocess, request.rgb, kind)
        return [a for kind in tower.image_inputs for a in inputs[kind]]

    question = request.question
    base_in = arrays(facts.base)            # timed as "preprocess", not as part of "base"
    base = clock.run("base", vision.base, base_in)
    image_tokens, routing_tokens = clock.run("adapter_routing", vision.adapter_routing, base)
    routing_in = llm.encode_prompt(chat_prompt(question, routing_prompt=facts.routing_prompt,
                                               use_im_start_end=facts.mm_use_im_start_end))
    routing_ids = clock.run("llm_routing", lambda: [t for t, _ in llm.generate(routing_in, routing_tokens[0],
                                                                                facts.max_routing_tokens)])
    routing_text = llm.detokenize(routing_ids).strip()
    mask = list(request.mask) if request.mask is not None else facts.parse_routing(routing_text)

    experts: dict[int, np.ndarray] = {}
    text = None
    if any(mask):
        for index, (tower, on) in enumerate(zip(facts.experts, mask)):
            if on:
                feed = arrays(tower)
                experts[index] = clock.run(f"expert_{tower.letter}", vision.expert, tower.component, feed)
        text = clock.run("text_encoder", vision.text, question)
        image_tokens = clock.run("adapter_answer", vision.adapter_answer, base, text, mask, experts)

    answer_in = llm.encode_prompt(chat_prompt(question, use_im_start_end=facts.mm_use_im_start_end))
    ids: list[int] = []
    t0 = time.perf_counter()
    t_first = None
    for token, piece in llm.generate(answer_in, image_tokens[0], request.max_new_tokens):
        if t_first is None:
            t_first = time.perf_counter()
        ids.append(token)
        if piece:
            yield piece
    t_end = time.perf_counter()
    t_first = t_end if t_first is None else t_first        # the first token was a stop token: prefill only
    timings = clock.ms
    timings["llm_prefill"] = (t_first - t0) * 1e3
    timings["time_to_first_token"] = (t_first - request.start) * 1e3
    timings["llm_decode"] = (t_end - t_first) * 1e3
    timings["total"] = (t_end - request.start) * 1e3
    expert_ms = [v for k, v in timings.items() if k.startswith("expert_")]
    if expert_ms:
        timings["experts"] = sum(expert_ms)
    # decode forwards after the prefill: one per token after the first, plus the one that produced the stop id
    forwards = len(ids) - 1 + (1 if 0 < len(ids) < request.max_new_tokens else 0)
    decode_s = timings["llm_decode"] / 1e3
    tensors: dict[str, np.ndarray] = {}
    if request.keep_tensors:
        tensors = {"base": base, "routing_tokens": routing_tokens, "image_tokens": image_tokens}
        if text is not None:
            tensors["text_features"] = text
        tensors.update({f"expert_{facts.experts[i].letter}": f for i, f in experts.items()})
    return Answer(text=llm.detokenize(ids).strip(), experts=facts.routed(mask), routing_text=routing_text,
                  routing_mask=mask, token_ids=ids, routing_ids=routing_ids, timings_ms=timings,
                  tokens_per_s=forwards / decode_s if forwards > 0 and decode_s > 0 else 0.0, tensors=tensors)


def run_to_end(pieces: Generator[str, None, Answer]) -> Answer:
    """Drain a two_passes generator and return its Answer."""
    while True:
        try:
            next(pieces)
        except StopIteration as stop:
            return stop.value

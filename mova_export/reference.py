"""MoVA's two-pass inference in PyTorch, greedy: the ground truth every exported piece is compared against.

Control flow (mova/eval/model_vqa_loader.py): base encoder once -> adapter with no experts -> routing generation
(<=16 tokens) -> letter parsing -> only the routed experts -> adapter with the routing mask -> answer generation.
The adapter runs in upstream's B==1 inference mode (unrouted experts skipped, not computed densely).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from .checkpoint import Checkpoint
from .config import EXPERTS, NUM_EXPERTS
from .errors import RuntimeInputError
from .preprocess import load_image, preprocess, tower_inputs
from .prompts import MAX_ROUTING_TOKENS, STOP_TOKEN, chat_prompt, parse_routing, routed_letters, tokenize_with_image


@dataclass
class ReferenceResult:
    experts: list[str]                     # routed letters, e.g. ["A", "D"]
    routing_mask: list[int]                # [7] multi-hot
    routing_text: str                      # what the LLM said in the routing pass
    answer: str
    answer_ids: list[int]
    routing_ids: list[int]
    timings_ms: dict[str, float] = field(default_factory=dict)
    tensors: dict[str, np.ndarray] = field(default_factory=dict)  # intermediate features, for parity checks

    def to_json(self) -> dict[str, Any]:
        return {"experts": self.experts, "answer": self.answer, "routing_text": self.routing_text,
                "routing_mask": self.routing_mask, "answer_ids": self.answer_ids, "routing_ids": self.routing_ids,
                "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()}}


class ReferencePipeline:
    """Loads the components of one checkpoint lazily (experts only when first routed) and runs MoVA."""

    def __init__(self, checkpoint_dir: str | Path, dtype: torch.dtype = torch.float32):
        from .tokenizers import load_llm_tokenizer, load_text_tokenizer

        self.checkpoint = Checkpoint.open(checkpoint_dir)
        self.cfg = self.checkpoint.config
        self.dtype = dtype
        self.llm_tokenizer = load_llm_tokenizer(checkpoint_dir)
        self.text_tokenizer = load_text_tokenizer(self.checkpoint.text_tokenizer_dir)
        self._modules: dict[str, torch.nn.Module] = {}

    def module(self, name: str) -> torch.nn.Module:
        if name not in self._modules:
            self._modules[name] = self.checkpoint.build(name, dtype=self.dtype)
        return self._modules[name]

    # ---- pieces (also used by parity benchmarks) ---------------------------------------------------------------
    def encode_prompt(self, question: str, *, routing: bool) -> list[int]:
        tok = self.llm_tokenizer
        prompt = chat_prompt(question, routing=routing, use_im_start_end=self.cfg.mm_use_im_start_end)
        return tokenize_with_image(prompt, lambda text: tok(text).input_ids, tok.bos_token_id)

    def stop_ids(self) -> list[int]:
        tok = self.llm_tokenizer
        ids = {tok.convert_tokens_to_ids(STOP_TOKEN)}
        if tok.eos_token_id is not None:
            ids.add(tok.eos_token_id)
        return sorted(i for i in ids if i is not None and i >= 0)

    def text_features(self, question: str) -> torch.Tensor:
        from .components.text_encoder import encode_text_inputs

        ids, mask = encode_text_inputs(self.text_tokenizer, question, self.cfg)
        return self.module("text_encoder")(ids, mask)

    def expert_features(self, inputs: dict[str, np.ndarray], mask: list[int]) -> list[torch.Tensor | None]:
        feats: list[torch.Tensor | None] = []
        for expert in EXPERTS:
            if mask[expert.index]:
                spec_inputs = [torch.from_numpy(a) for a in tower_inputs(inputs, expert.input_kind)]
                feats.append(self.module(f"expert_{expert.letter}")(*spec_inputs))
            else:
                feats.append(None)
        return feats

    def adapter(self, base: torch.Tensor, experts: list[torch.Tensor | None], text: torch.Tensor,
                mask: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        routing = torch.tensor([mask], dtype=torch.float32)
        return self.module("adapter").forward_reference(base, experts, text, routing)

    def generate(self, ids: list[int], image_embeddings: torch.Tensor, max_new_tokens: int) -> list[int]:
        from .llm import hf_generate

        return hf_generate(self.module("llm"), ids, image_embeddings, max_new_tokens, self.stop_ids())

    # ---- the two passes ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, image: Any, question: str, *, max_new_tokens: int = 64,
            force_experts: list[str] | None = None, keep_tensors: bool = False) -> ReferenceResult:
        if not isinstance(question, str) or not question.strip():
            raise RuntimeInputError("the question is empty; pass a non-empty question string")
        timings: dict[str, float] = {}
        tensors: dict[str, np.ndarray] = {}

        def timed(stage: str, fn: Callable[[], Any]) -> Any:
            start = time.perf_counter()
            out = fn()
            timings[stage] = timings.get(stage, 0.0) + (time.perf_counter() - start) * 1e3
            return out

        inputs = timed("preprocess", lambda: preprocess(load_image(image), self.cfg))
        base = timed("base", lambda: self.module("base")(torch.from_numpy(inputs["clip672"])))
        text = timed("text_encoder", lambda: self.text_features(question))
        no_experts = [0] * NUM_EXPERTS
        image_tokens, routing_tokens = timed("adapter_routing", lambda: self.adapter(base, [None] * NUM_EXPERTS,
                                                                                      text, no_experts))
        routing_ids = self.encode_prompt(question, routing=True)
        routing_out = timed("llm_routing", lambda: self.generate(routing_ids, routing_tokens[0], MAX_ROUTING_TOKENS))
        routing_text = self.llm_tokenizer.decode(routing_out, skip_special_tokens=True).strip()
        mask = parse_routing(", ".join(force_experts)) if force_experts is not None else parse_routing(routing_text)

        if any(mask):
            experts = timed("experts", lambda: self.expert_features(inputs, mask))
            image_tokens, _ = timed("adapter_answer", lambda: self.adapter(base, experts, text, mask))
        else:  # with no expert routed the second adapter run would repeat the first exactly
            experts = [None] * NUM_EXPERTS
        answer_ids_in = self.encode_prompt(question, routing=False)
        answer_ids = timed("llm_answer", lambda: self.generate(answer_ids_in, image_tokens[0], max_new_tokens))
        answer = self.llm_tokenizer.decode(answer_ids, skip_special_tokens=True).strip()
        if keep_tensors:
            tensors = {"base": base.numpy(), "text_features": text.numpy(), "routing_tokens": routing_tokens.numpy(),
                       "image_tokens": image_tokens.numpy()}
            for expert, feat in zip(EXPERTS, experts):
                if feat is not None:
                    tensors[f"expert_{expert.letter}"] = feat.numpy()
        return ReferenceResult(experts=routed_letters(mask), routing_mask=mask, routing_text=routing_text,
                               answer=answer, answer_ids=answer_ids, routing_ids=routing_out, timings_ms=timings,
                               tensors=tensors)


def sample_images() -> dict[str, np.ndarray]:
    """Real photographs shipped with scikit-image (no download), as HxWx3 uint8 (gray ones repeated to RGB):
    natural scenes, a micrograph (BiomedCLIP's domain) and a scanned page (text: Vary / Pix2Struct)."""
    from skimage import data

    images = {name: getattr(data, name)() for name in SAMPLE_QUESTIONS}
    return {name: np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img for name, img in images.items()}


# The first three are the demo's and the export's parity images; build calibrates on all of them.
SAMPLE_QUESTIONS = {
    "astronaut": "What is the person in the image wearing?",
    "coffee": "What is in the cup?",
    "chelsea": "What animal is this?",
    "rocket": "What is the vehicle in the picture?",
    "immunohistochemistry": "What kind of medical image is this?",
    "page": "What does the text on the page say?",
}


def iter_sample_questions(names: Iterable[str] | None = None) -> Iterator[tuple[str, str]]:
    """(image name, question) for the demo's three images, or for the given sample names."""
    for name in (names if names is not None else list(SAMPLE_QUESTIONS)[:3]):
        yield name, SAMPLE_QUESTIONS[name]

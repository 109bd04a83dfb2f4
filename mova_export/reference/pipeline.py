"""MoVA's two-pass inference in PyTorch, greedy: the ground truth every exported piece is compared against.

It runs the same orchestration as the device runtime (runtime.two_pass) with runners of its own: transformers'
image processors, the PyTorch components built from the checkpoint, transformers' BERT tokenizer (padding to the
longest question, truncation at 512, as upstream) and transformers' LlamaForCausalLM. The adapter runs in upstream's
B == 1 inference mode: unrouted experts are skipped, not computed densely.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from ..components import facts_from_config, one_of_kind
from ..core.errors import CheckpointError, RuntimeInputError
from ..core.image_inputs import load_image
from ..core.prompts import STOP_TOKEN, adapter_text, tokenize_with_image
from ..runtime.two_pass import Answer, Request, run_to_end, two_passes
from ..source.checkpoint import Checkpoint
from ..source.llama3 import load_llm_tokenizer
from .llm import hf_generate_stream
from .preprocess import preprocess_input


def load_text_tokenizer(path: str | Path) -> Any:
    """The BERT (uncased WordPiece) tokenizer of the MoV-Adapter's text encoder, from a folder with vocab.txt."""
    from transformers import BertTokenizerFast

    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"BERT tokenizer folder {folder} does not exist; it must hold bert-large-uncased's "
                              "vocab.txt (config.json mm_projector_text_encoder points at it)")
    if not (folder / "vocab.txt").is_file() and not (folder / "tokenizer.json").is_file():
        raise CheckpointError(f"{folder} has no vocab.txt or tokenizer.json; copy bert-large-uncased's vocab.txt there")
    try:
        return BertTokenizerFast.from_pretrained(str(folder))
    except Exception as exc:  # transformers raises many types for a broken file
        first = str(exc).strip().splitlines()
        raise CheckpointError(f"cannot load the BERT tokenizer from {folder}: {type(exc).__name__}: "
                              f"{first[0] if first else ''}; replace vocab.txt with bert-large-uncased's") from exc


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


class ReferenceVision:
    """The PyTorch components of one checkpoint behind the two-pass VisionRunners interface; built lazily (experts
    when first routed) and kept."""

    def __init__(self, checkpoint: Checkpoint, dtype: torch.dtype = torch.float32):

        self.checkpoint, self.cfg, self.dtype = checkpoint, checkpoint.config, dtype
        self.facts = facts_from_config(self.cfg)
        self.text_tokenizer = load_text_tokenizer(checkpoint.text_tokenizer_dir)
        self.names = {kind: one_of_kind(kind).name for kind in ("text", "adapter")}
        self.modules: dict[str, torch.nn.Module] = {}

    def module(self, name: str) -> torch.nn.Module:
        if name not in self.modules:
            self.modules[name] = self.checkpoint.build(name, dtype=self.dtype)
        return self.modules[name]

    def _tensors(self, arrays: Sequence[np.ndarray]) -> list[torch.Tensor]:
        return [torch.from_numpy(np.array(a)) for a in arrays]   # a writable copy: frames may be read-only

    def preprocess(self, rgb: np.ndarray, kind: str) -> list[np.ndarray]:
        return preprocess_input(rgb, self.facts.image_inputs[kind], self.cfg)

    @torch.inference_mode()
    def base(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        return _numpy(self.module(self.facts.base.component)(*self._tensors(arrays)))

    @torch.inference_mode()
    def expert(self, component: str, arrays: Sequence[np.ndarray]) -> np.ndarray:
        return _numpy(self.module(component)(*self._tensors(arrays)))

    @torch.inference_mode()
    def text(self, question: str) -> np.ndarray:
        encoded = self.text_tokenizer(adapter_text(question), truncation=True, max_length=512, return_tensors="pt")
        return _numpy(self.module(self.names["text"])(encoded["input_ids"], encoded["attention_mask"]))

    @torch.inference_mode()
    def _adapter(self, base: np.ndarray, text: np.ndarray, mask: Sequence[int],
                 experts: dict[int, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        features = [torch.from_numpy(experts[i]) if i in experts else None for i in range(len(mask))]
        out = self.module(self.names["adapter"]).forward_reference(
            torch.from_numpy(base), features, torch.from_numpy(text), torch.tensor([list(mask)], dtype=torch.float32))
        return _numpy(out[0]), _numpy(out[1])

    def adapter_routing(self, base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """No expert routed: the text feature has no effect (no gate runs), zeros stand in for it."""
        width = self.module(self.names["adapter"]).blocks[0].gate[0].in_features - int(self.cfg.mm_hidden_size)
        return self._adapter(base, np.zeros((1, width), np.float32), [0] * len(self.facts.experts), {})

    def adapter_answer(self, base: np.ndarray, text: np.ndarray, mask: Sequence[int],
                       experts: dict[int, np.ndarray]) -> np.ndarray:
        return self._adapter(base, text, mask, experts)[0]


class ReferenceLLM:
    """transformers' LlamaForCausalLM with the checkpoint's Llama-3 tokenizer, behind the LanguageModel interface."""

    def __init__(self, checkpoint: Checkpoint, dtype: torch.dtype = torch.float32):
        self.checkpoint, self.dtype = checkpoint, dtype
        self.tokenizer = load_llm_tokenizer(checkpoint.path)
        tok = self.tokenizer
        stops = {tok.convert_tokens_to_ids(STOP_TOKEN), tok.eos_token_id}
        self.stop_ids = sorted(i for i in stops if i is not None and i >= 0)
        self._model: torch.nn.Module | None = None

    @property
    def model(self) -> torch.nn.Module:
        if self._model is None:
            self._model = self.checkpoint.build("llm", dtype=self.dtype)
        return self._model

    def encode_prompt(self, prompt: str) -> list[int]:
        tok = self.tokenizer
        return tokenize_with_image(prompt, lambda text: tok(text).input_ids, tok.bos_token_id)

    def generate(self, ids: Sequence[int], image_embeddings: np.ndarray, max_new_tokens: int
                 ) -> Iterator[tuple[int, str]]:
        for token in hf_generate_stream(self.model, ids, image_embeddings, max_new_tokens, self.stop_ids):
            yield token, ""   # the reference's text is decoded once at the end (detokenize)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


class ReferencePipeline:
    """Loads the components of one checkpoint lazily and runs MoVA's two passes in PyTorch."""

    def __init__(self, checkpoint_dir: str | Path, dtype: torch.dtype = torch.float32):
        self.checkpoint = Checkpoint.open(checkpoint_dir)
        self.cfg = self.checkpoint.config
        self.vision = ReferenceVision(self.checkpoint, dtype)
        self.llm = ReferenceLLM(self.checkpoint, dtype)
        self.facts = self.vision.facts

    def module(self, name: str) -> torch.nn.Module:
        return self.vision.module(name)

    def release(self, name: str) -> None:
        """Drop one built component (bounded memory when timing the experts one by one)."""
        self.vision.modules.pop(name, None)

    def run(self, image: Any, question: str, *, max_new_tokens: int = 64, force_experts: Sequence[str] | None = None,
            keep_tensors: bool = False) -> Answer:
        if not isinstance(question, str) or not question.strip():
            raise RuntimeInputError("the question is empty; pass a non-empty question string")
        start = time.perf_counter()
        mask = None if force_experts is None else self.facts.mask_of(force_experts)
        request = Request(load_image(image), question, max_new_tokens, mask, keep_tensors, start)
        return run_to_end(two_passes(self.facts, self.vision, self.llm, request))

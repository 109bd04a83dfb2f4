"""The LLM's shape, for the memory planner: its KV cache and llama.cpp's compute buffer per context length."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from ..source.config import FULL_LLM

LLAMA_UBATCH = 512             # llama.cpp default micro-batch
KV_BYTES = 2                   # f16 KV cache


@dataclass(frozen=True)
class LLMShape:
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    vocab: int
    tied: bool = False

    @classmethod
    def from_fields(cls, llm: Mapping[str, Any]) -> "LLMShape":
        """From LlamaConfig fields (MoVAConfig.llm or a manifest's config)."""
        heads = int(llm["num_attention_heads"])
        hidden = int(llm["hidden_size"])
        return cls(int(llm["num_hidden_layers"]), heads, int(llm.get("num_key_value_heads") or heads),
                   int(llm.get("head_dim") or hidden // heads), hidden, int(llm["intermediate_size"]),
                   int(llm["vocab_size"]), bool(llm.get("tie_word_embeddings", False)))

    @property
    def params(self) -> int:
        attn = 2 * self.hidden * self.heads * self.head_dim + 2 * self.hidden * self.kv_heads * self.head_dim
        per_layer = attn + 3 * self.hidden * self.intermediate + 2 * self.hidden
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.layers * per_layer + self.hidden

    def kv_bytes(self, context: int) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * context * KV_BYTES

    def compute_bytes(self, context: int) -> int:
        """llama.cpp compute buffer: KQ scores of one micro-batch over the context, plus its logits (fp32)."""
        ubatch = min(LLAMA_UBATCH, context)
        return self.heads * ubatch * context * 4 + ubatch * self.vocab * 4


def full_llm() -> LLMShape:
    """MoVA-8B's Llama-3-8B."""
    return LLMShape.from_fields(FULL_LLM)

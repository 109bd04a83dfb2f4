"""The LLM: Llama-3-8B-Instruct as transformers' LlamaForCausalLM (`model.embed_tokens`, `model.layers.*`,
`model.norm`, `lm_head`): every checkpoint key outside the vision tower and the projector.

It never becomes an ONNX graph: `mova-export gguf` converts it for llama.cpp. Its architecture comes from the Llama
fields at the top of config.json (`cfg.llm`), so the presets are empty; TINY_LLM is what synthetic tiny
checkpoints write there (hidden 256 so llama.cpp's K-quants, which need rows of 256, really run on it).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import ComponentSpec, MemoryFigures, TensorSpec, register

NAME = "llm"

TINY_LLM: dict[str, Any] = dict(
    vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=2048,
    bos_token_id=768, eos_token_id=777, tie_word_embeddings=False, hidden_act="silu",
)


def build_llm(cfg: Any) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**dict(cfg.llm), attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


def _sample(cfg: Any, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, int(cfg.llm["vocab_size"]), (1, 16), generator=gen)}


register(ComponentSpec(
    name=NAME,
    kind="llm",
    prefix="",
    memory=MemoryFigures(params=8_030_000_000, activation=(1, 4096)),
    presets={"full": {}, "tiny": {}},
    build=build_llm,
    inputs=lambda cfg: (TensorSpec("input_ids", (1, 16), "int64"),),
    outputs=lambda cfg: (TensorSpec("logits", (1, 16, int(cfg.llm["vocab_size"]))),),
    sample_inputs=_sample,
    # Llama's own module tree; the vision tower and projector live under model.* too, so ownership is by inclusion
    include_prefixes=("model.embed_tokens.", "model.layers.", "model.norm.", "model.rotary_emb.", "lm_head."),
    # checkpoints saved by transformers < 4.31 carry the RoPE inverse frequencies; the model recomputes them
    unused_keys=("model.layers.*.self_attn.rotary_emb.inv_freq",),
    description="Llama-3-8B (LlamaForCausalLM, untied lm_head); goes to GGUF for llama.cpp, not to ONNX",
))

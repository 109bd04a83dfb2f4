"""The MoV-Adapter's text encoder: BERT (bert-large-uncased), [CLS] output of the user question.

Upstream (`builder.py:396-417`): `BertLMHeadModel.bert` with `cls` replaced by Identity, so the checkpoint carries
`model.mm_projector.text_encoder.bert.*` (embeddings and encoder, no pooler). The text is
`"question 0: <question.lower()>\n\n"`, tokenized with padding='longest' (one question: no padding at all) and
`last_hidden_state[:, 0]` is the text feature shared by every adapter block.

For static shapes the ids are padded to the smallest length bucket that holds them (facts.TEXT_BUCKETS: 64, 128,
512; upstream truncates at 512) with attention mask 0: BERT's absolute position embeddings and the mask make the
[CLS] output independent of right padding (tests/test_text_encoder.py checks it at every bucket). The graph has one
symbolic dimension, `text_length`, which only ever takes a bucket's size.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ..core.bert_inputs import TEXT_BUCKETS
from . import ComponentSpec, MemoryFigures, TensorSpec, arch, register

NAME = "text_encoder"
TEXT_AXIS = "text_length"   # the one symbolic dimension: the question padded to a length bucket
PREFIX = "model.mm_projector.text_encoder."

_COMMON = dict(max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12, hidden_act="gelu")
PRESETS: dict[str, dict[str, Any]] = {
    "full": {**_COMMON, "vocab_size": 30522, "hidden_size": 1024, "num_hidden_layers": 24,
             "num_attention_heads": 16, "intermediate_size": 4096},
    "tiny": {**_COMMON, "vocab_size": 1000, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64},
}


class TextEncoder(nn.Module):
    """input_ids, attention_mask [1, T] int64 -> [CLS] feature [1, hidden] (fp32)."""

    def __init__(self, arch: Mapping[str, Any]):
        super().__init__()
        from transformers import BertConfig, BertModel

        config = BertConfig(**dict(arch), attn_implementation="eager")  # eager: plain MatMul/Softmax in ONNX
        self.bert = BertModel(config, add_pooling_layer=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                        token_type_ids=torch.zeros_like(input_ids))
        return out.last_hidden_state[:, 0].float()


def _inputs(cfg: Any) -> tuple[TensorSpec, ...]:
    return (TensorSpec("input_ids", (1, TEXT_AXIS), "int64"), TensorSpec("attention_mask", (1, TEXT_AXIS), "int64"))


def _out_channels(arch: Mapping[str, Any]) -> int:
    return int(arch["hidden_size"])


def _sample(cfg: Any, seed: int) -> dict[str, torch.Tensor]:
    """Random ids (a [CLS]-like first id, then words) over a random length, right-padded with mask 0."""
    gen = torch.Generator().manual_seed(seed)
    length = TEXT_BUCKETS[0]
    vocab = int(arch(cfg, NAME)["vocab_size"])
    used = int(torch.randint(4, max(5, length // 2), (1,), generator=gen))
    ids = torch.zeros(1, length, dtype=torch.int64)
    ids[0, :used] = torch.randint(5, vocab, (used,), generator=gen)
    mask = torch.zeros(1, length, dtype=torch.int64)
    mask[0, :used] = 1
    return {"input_ids": ids, "attention_mask": mask}


register(ComponentSpec(
    name=NAME,
    kind="text",
    prefix=PREFIX,
    memory=MemoryFigures(params=335_000_000, activation=(64, 1024), attention=(16, 64, 2)),
    presets=PRESETS,
    build=lambda cfg: TextEncoder(arch(cfg, NAME)).eval(),
    inputs=_inputs,
    outputs=lambda cfg: (TensorSpec("text_features", (1, _out_channels(arch(cfg, NAME)))),),
    sample_inputs=_sample,
    out_channels=_out_channels,
    description="BERT-large-uncased (no pooler), [CLS] of 'question 0: <question>' padded to text_max_length",
))

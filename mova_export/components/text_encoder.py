"""The MoV-Adapter's text encoder: BERT (bert-large-uncased), [CLS] output of the user question.

Upstream (`builder.py:396-417`): `BertLMHeadModel.bert` with `cls` replaced by Identity, so the checkpoint carries
`model.mm_projector.text_encoder.bert.*` (embeddings and encoder, no pooler). The text is
`"question 0: <question.lower()>\n\n"`, tokenized with padding='longest' (one question: no padding at all) and
`last_hidden_state[:, 0]` is the text feature shared by every adapter block.

For a static graph the ids are padded to `text_max_length` (an inferred, visible config default) with attention
mask 0: BERT's absolute position embeddings and the mask make the [CLS] output independent of right padding
(tests/test_text_encoder.py checks it). A question longer than that static length is refused, not truncated,
since truncation would change the routing and the answer.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from ..errors import RuntimeInputError
from . import ComponentSpec, TensorSpec, register

NAME = "text_encoder"
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


def encode_text_inputs(tokenizer: Any, question: str, cfg: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each [1, cfg.text_max_length] int64, of the adapter text of `question`."""
    from ..prompts import adapter_text

    length = int(cfg.text_max_length)
    ids = tokenizer(adapter_text(question), truncation=True, max_length=512)["input_ids"]
    if len(ids) > length:
        raise RuntimeInputError(f"the question is {len(ids)} BERT tokens; the static text length is {length}: "
                                "shorten the question or re-export with a larger text_max_length in config.json")
    pad = tokenizer.pad_token_id or 0
    padded = np.full((1, length), pad, dtype=np.int64)
    padded[0, :len(ids)] = ids
    mask = np.zeros((1, length), dtype=np.int64)
    mask[0, :len(ids)] = 1
    return torch.from_numpy(padded), torch.from_numpy(mask)


def _inputs(cfg: Any) -> tuple[TensorSpec, ...]:
    length = int(cfg.text_max_length)
    return (TensorSpec("input_ids", (1, length), "int64"), TensorSpec("attention_mask", (1, length), "int64"))


def _out_channels(arch: Mapping[str, Any]) -> int:
    return int(arch["hidden_size"])


def _sample(cfg: Any, seed: int) -> dict[str, torch.Tensor]:
    """Random ids (a [CLS]-like first id, then words) over a random length, right-padded with mask 0."""
    gen = torch.Generator().manual_seed(seed)
    length = int(cfg.text_max_length)
    vocab = int(cfg.arch(NAME)["vocab_size"])
    used = int(torch.randint(4, max(5, length // 2), (1,), generator=gen))
    ids = torch.zeros(1, length, dtype=torch.int64)
    ids[0, :used] = torch.randint(5, vocab, (used,), generator=gen)
    mask = torch.zeros(1, length, dtype=torch.int64)
    mask[0, :used] = 1
    return {"input_ids": ids, "attention_mask": mask}


register(ComponentSpec(
    name=NAME,
    prefix=PREFIX,
    presets=PRESETS,
    build=lambda cfg: TextEncoder(cfg.arch(NAME)).eval(),
    inputs=_inputs,
    outputs=lambda cfg: (TensorSpec("text_features", (1, _out_channels(cfg.arch(NAME)))),),
    sample_inputs=_sample,
    out_channels=_out_channels,
    description="BERT-large-uncased (no pooler), [CLS] of 'question 0: <question>' padded to text_max_length",
))

"""Llama-3's tokenizer facts and the transformers loader of a checkpoint's LLM tokenizer (build side).

MoVA-8B ships Meta-Llama-3-8B-Instruct's tokenizer next to config.json; the GGUF converter, the PyTorch reference
and the synthetic checkpoints read these facts from here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core.errors import CheckpointError
from ..core.prompts import STOP_TOKEN

LLAMA3_VOCAB_SIZE = 128256
NUM_SPECIAL = 256
BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = STOP_TOKEN  # <|eot_id|>: load_pretrained_model sets it as eos for mova-8b

# Llama-3's pre-tokenizer regex (tokenizer.json of Meta-Llama-3-8B-Instruct; llama.cpp's "llama-bpe").
LLAMA3_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Meta-Llama-3-8B-Instruct's chat template.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def llama3_special_tokens() -> list[str]:
    """Llama-3's 256 special tokens in id order (offset 0 = id 128000 in the real vocabulary)."""
    names = ["<|begin_of_text|>", "<|end_of_text|>", *(f"<|reserved_special_token_{i}|>" for i in range(4)),
             "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
    names += [f"<|reserved_special_token_{i}|>" for i in range(5, 5 + NUM_SPECIAL - len(names))]
    return names


def special_token_ids(vocab_size: int) -> dict[str, int]:
    """Where each Llama-3 special token sits for a given vocab_size (e.g. <|eot_id|> -> 128009 at 128256)."""
    first = vocab_size - NUM_SPECIAL
    return {t: first + i for i, t in enumerate(llama3_special_tokens())}


# ---- loading -------------------------------------------------------------------------------------------------
def load_llm_tokenizer(checkpoint_dir: str | Path) -> Any:
    """The LLM tokenizer of a checkpoint (or bundle tokenizer folder) with eos = <|eot_id|>, as MoVA-8B loads it."""
    from transformers import PreTrainedTokenizerFast

    path = Path(checkpoint_dir)
    if not path.is_dir():
        raise CheckpointError(f"LLM tokenizer folder {path} does not exist; pass the checkpoint folder that holds "
                              "tokenizer.json")
    if not (path / "tokenizer.json").is_file():
        raise CheckpointError(f"{path / 'tokenizer.json'} not found; MoVA-8B ships the Llama-3 tokenizer.json next to "
                              "config.json (synthetic checkpoints: `mova-export synth` writes one)")
    try:
        tok = PreTrainedTokenizerFast.from_pretrained(str(path))
    except Exception as exc:  # transformers raises many types for a broken file
        raise CheckpointError(f"cannot load the LLM tokenizer from {path}: {_first_line(exc)}; re-download "
                              "tokenizer.json / tokenizer_config.json") from exc
    if tok.convert_tokens_to_ids(EOS_TOKEN) not in (None, tok.unk_token_id):
        tok.eos_token = EOS_TOKEN
    return tok


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")

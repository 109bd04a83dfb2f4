"""The MoV-Adapter's BERT text inputs without torch or transformers (the `tokenizers` library only).

Upstream (`builder.py:396-417`) tokenizes `"question 0: <question.lower()>\\n\\n"` (prompts.adapter_text) with
bert-large-uncased's BertTokenizer, padding='longest' (one question: no padding), truncation=True,
max_length=512. BertTextTokenizer builds the same WordPiece pipeline transformers' BertTokenizerFast builds from
vocab.txt (BertNormalizer, BertPreTokenizer, [CLS] $A [SEP], the five specials as added tokens), so the ids are
transformers' to the last one, truncated at 512 like upstream.

A static graph needs a fixed length, so the ids are right-padded with [PAD] (attention mask 0) to the smallest
of a few length buckets that holds them (TEXT_BUCKETS, one text-encoder graph per bucket). BERT's absolute
position embeddings and the mask make the [CLS] output independent of that padding, and the 512 bucket holds
anything upstream would keep, so no question is refused.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
from tokenizers import AddedToken, Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

from .errors import CheckpointError, MoVAExportError, RuntimeInputError
from .prompts import adapter_text

TEXT_BUCKETS = (64, 128, 512)
MAX_TEXT_TOKENS = 512            # upstream: truncation=True, max_length=512 ([CLS] and [SEP] included)
_SPECIALS = ("pad_token", "unk_token", "cls_token", "sep_token", "mask_token")
_DEFAULT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


@dataclass(frozen=True)
class BertTextTokenizer:
    """bert-large-uncased's WordPiece tokenizer as a `tokenizers.Tokenizer` that adds [CLS] / [SEP] and truncates
    at MAX_TEXT_TOKENS; `pad_id` is the [PAD] id the buckets are filled with."""

    backend: Tokenizer
    pad_id: int

    @classmethod
    def from_folder(cls, folder: str | Path, error: type[MoVAExportError] = CheckpointError) -> "BertTextTokenizer":
        """From a folder with vocab.txt and, when present, tokenizer_config.json (do_lower_case,
        tokenize_chinese_chars, strip_accents, the special token names). Problems raise `error` (CheckpointError
        for a checkpoint's folder, BundleError for a bundle's tokenizer/text)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise error(f"BERT tokenizer folder {folder} does not exist; point at the folder with bert-large-"
                        "uncased's vocab.txt (a checkpoint's mm_projector_text_encoder, a bundle's tokenizer/text)")
        vocab_file = folder / "vocab.txt"
        if not vocab_file.is_file():
            raise error(f"{vocab_file} not found; copy bert-large-uncased's vocab.txt there")
        options = _tokenizer_config(folder / "tokenizer_config.json", error)
        specials = [_token_name(options.get(key, default)) for key, default in zip(_SPECIALS, _DEFAULT_SPECIALS)]
        pad, unk, cls_token, sep = specials[:4]
        try:
            model = WordPiece.from_file(str(vocab_file), unk_token=unk)
        except Exception as exc:  # the Rust reader raises plain Exceptions for unreadable files
            raise error(f"cannot read {vocab_file} ({exc}); replace it with bert-large-uncased's vocab.txt") from None
        backend = Tokenizer(model)
        ids = {token: backend.token_to_id(token) for token in specials}
        missing = [token for token, token_id in ids.items() if token_id is None]
        if missing:
            raise error(f"{vocab_file} has no {', '.join(missing)} entry; use bert-large-uncased's vocab.txt")
        backend.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=bool(options.get("tokenize_chinese_chars", True)),
            strip_accents=options.get("strip_accents"), lowercase=bool(options.get("do_lower_case", True)))
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        backend.post_processor = processors.TemplateProcessing(
            single=f"{cls_token}:0 $A:0 {sep}:0", special_tokens=[(cls_token, ids[cls_token]), (sep, ids[sep])])
        # as transformers registers them: a literal "[SEP]" in a question is the special token, not text
        backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
        backend.enable_truncation(MAX_TEXT_TOKENS)
        return cls(backend=backend, pad_id=ids[pad])

    def encode(self, text: str) -> list[int]:
        """[CLS] ids [SEP] of `text`, at most MAX_TEXT_TOKENS of them."""
        return self.backend.encode(text).ids


def _tokenizer_config(path: Path, error: type[MoVAExportError]) -> dict:
    if not path.is_file():
        return {}
    try:
        options = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path} is not valid JSON ({exc}); fix it or delete it to use bert-large-uncased's "
                    "defaults") from None
    if not isinstance(options, dict):
        raise error(f"{path} holds a {type(options).__name__}, not an object; fix it or delete it to use "
                    "bert-large-uncased's defaults")
    return options


def _token_name(value) -> str:
    """tokenizer_config.json spells a special token as a string or as an AddedToken dict with "content"."""
    return str(value["content"] if isinstance(value, dict) else value)


def bucket_for(length: int, buckets: Iterable[int] = TEXT_BUCKETS) -> int:
    """The smallest bucket that holds `length` tokens."""
    buckets = tuple(buckets)
    fitting = [bucket for bucket in buckets if bucket >= length]
    if not fitting:
        raise RuntimeInputError(f"the question is {length} BERT tokens, more than the largest text bucket "
                                f"{max(buckets, default=0)}; re-export the text encoder with a "
                                f"{MAX_TEXT_TOKENS}-token bucket, which holds any question")
    return min(fitting)


def text_inputs(tokenizer: BertTextTokenizer, question: str,
                buckets: Iterable[int] = TEXT_BUCKETS) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), each [1, T] int64, of the adapter text of `question`: upstream's ids right-
    padded with [PAD] (mask 0) to T = the smallest bucket that holds them."""
    ids = tokenizer.encode(adapter_text(question))
    length = bucket_for(len(ids), buckets)
    input_ids = np.full((1, length), tokenizer.pad_id, dtype=np.int64)
    input_ids[0, :len(ids)] = ids
    mask = np.zeros((1, length), dtype=np.int64)
    mask[0, :len(ids)] = 1
    return input_ids, mask

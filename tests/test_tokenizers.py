"""Offline tokenizer files: Llama-3-style BPE with the special tokens at their real ids, BERT WordPiece vocab.txt."""
from __future__ import annotations

import json

import pytest

from mova_export.components import routing_prompt_lines
from mova_export.core.errors import CheckpointError
from mova_export.core.prompts import (
    ASSISTANT_ROLE,
    SEP,
    SYSTEM,
    USER_ROLE,
    chat_prompt,
    routing_prompt,
    tokenize_with_image,
)
from mova_export.reference import load_text_tokenizer
from mova_export.source.llama3 import llama3_special_tokens, load_llm_tokenizer, special_token_ids
from mova_export.synth.tokenizers import BERT_SPECIALS, iter_sample_texts, write_bert_vocab, write_llama3_tokenizer

ROUTING_PROMPT = routing_prompt(routing_prompt_lines())


@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory):
    return write_llama3_tokenizer(tmp_path_factory.mktemp("tok1024"), 1024)


@pytest.fixture(scope="module")
def full_tok(tmp_path_factory):
    return write_llama3_tokenizer(tmp_path_factory.mktemp("tok128k"), 128256)


def test_llama3_special_tokens_order():
    names = llama3_special_tokens()
    assert len(names) == len(set(names)) == 256
    ids = special_token_ids(128256)  # Meta-Llama-3-8B-Instruct's ids
    assert (ids["<|begin_of_text|>"], ids["<|end_of_text|>"], ids["<|start_header_id|>"], ids["<|end_header_id|>"],
            ids["<|eot_id|>"]) == (128000, 128001, 128006, 128007, 128009)
    assert ids["<|reserved_special_token_0|>"] == 128002 and ids["<|reserved_special_token_250|>"] == 128255


def test_full_size_ids_and_files(full_tok):
    tok = load_llm_tokenizer(full_tok)
    assert len(tok) == 128256
    assert (tok.bos_token, tok.eos_token, tok.bos_token_id, tok.eos_token_id) == (
        "<|begin_of_text|>", "<|eot_id|>", 128000, 128009)
    for name, i in special_token_ids(128256).items():
        assert tok.convert_tokens_to_ids(name) == i
    raw = json.loads((full_tok / "tokenizer.json").read_text())
    assert raw["normalizer"] is None and raw["model"]["ignore_merges"] is True
    assert len(raw["model"]["vocab"]) == 128000 and len(raw["model"]["merges"]) == 128000 - 256
    config = json.loads((full_tok / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is True and config["eos_token"] == "<|eot_id|>"
    assert json.loads((full_tok / "special_tokens_map.json").read_text())["eos_token"] == "<|eot_id|>"


def test_tokenizes_like_llama3(tiny_tok):
    tok = load_llm_tokenizer(tiny_tok)
    ids = tok("What is in the image?").input_ids
    assert ids[0] == tok.bos_token_id
    assert tok.convert_ids_to_tokens(ids[1:]) == ["What", "Ġis", "Ġin", "Ġthe", "Ġimage", "?"]  # trained merges
    assert tok("<|eot_id|><|start_header_id|>", add_special_tokens=False).input_ids == [777, 774]  # parsed specials
    for text in iter_sample_texts():
        assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text
    # upstream tokenizer_image_token keeps both BOS ids (tokenizer BOS + the one in the system string)
    ids = tokenize_with_image(chat_prompt("Q?", routing_prompt=ROUTING_PROMPT), lambda t: tok(t).input_ids, tok.bos_token_id)
    assert ids[:2] == [tok.bos_token_id] * 2 and ids.count(-200) == 1


def test_chat_template_renders_movas_frame(tiny_tok):
    tok = load_llm_tokenizer(tiny_tok)
    question = "What is in the cup?"
    system = SYSTEM.split("<|end_header_id|>\n\n", 1)[1]
    text = tok.apply_chat_template([{"role": "system", "content": system},
                                    {"role": "user", "content": "<image>\n" + ROUTING_PROMPT + question}],
                                   tokenize=False, add_generation_prompt=True)
    assert text == chat_prompt(question, routing_prompt=ROUTING_PROMPT)
    assert text.endswith(SEP + ASSISTANT_ROLE) and USER_ROLE in text


def test_deterministic_bytes(tmp_path, tiny_tok):
    again = write_llama3_tokenizer(tmp_path / "again", 1024)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (again / name).read_bytes() == (tiny_tok / name).read_bytes()
    a, b = write_bert_vocab(tmp_path / "b1", 4096), write_bert_vocab(tmp_path / "b2", 4096)
    assert (a / "vocab.txt").read_bytes() == (b / "vocab.txt").read_bytes()


def test_bert_vocab(tmp_path):
    out = write_bert_vocab(tmp_path / "bert")
    lines = (out / "vocab.txt").read_text().splitlines()
    assert len(lines) == 30522 and tuple(lines[:5]) == BERT_SPECIALS and len(set(lines)) == len(lines)
    assert "question" in lines and "##s" in lines
    tok = load_text_tokenizer(out)
    enc = tok("Question 0: What is IN the Cup?\n\n")
    assert tok.convert_ids_to_tokens(enc.input_ids) == ["[CLS]", "question", "0", ":", "what", "is", "in", "the",
                                                         "cup", "?", "[SEP]"]
    assert (tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id) == (0, 1, 2, 3, 4)
    small = write_bert_vocab(tmp_path / "small", 512)
    assert len((small / "vocab.txt").read_text().splitlines()) == 512


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=600 is too small"):
        write_llama3_tokenizer(tmp_path / "x", 600)
    with pytest.raises(ValueError, match="smaller than the corpus alphabet needs"):
        write_bert_vocab(tmp_path / "y", 20)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_llm_tokenizer(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="tokenizer.json not found"):
        load_llm_tokenizer(tmp_path)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot load the LLM tokenizer"):
        load_llm_tokenizer(tmp_path / "bad")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_text_tokenizer(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="has no vocab.txt"):
        load_text_tokenizer(tmp_path)

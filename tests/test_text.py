"""BERT text inputs without transformers: ids equal to BertTokenizerFast's (truncation at 512 included), the
smallest length bucket, [PAD] / mask 0 behind the ids, one-line errors, no torch or transformers imported, and a
[CLS] feature that does not depend on the bucket."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mova_export
from mova_export.components import arch
from mova_export.core.bert_inputs import MAX_TEXT_TOKENS, TEXT_BUCKETS, BertTextTokenizer, bucket_for, text_inputs
from mova_export.core.errors import BundleError, CheckpointError, RuntimeInputError
from mova_export.core.prompts import adapter_text
from mova_export.synth.tokenizers import iter_sample_texts, write_bert_vocab

REPO = Path(mova_export.__file__).resolve().parents[1]   # the subprocess imports this checkout's package

TEXTS = [
    *iter_sample_texts(),
    "What is in the cup?", "WHAT IS IN THE CUP?", "what's this?!?", "", " ", "\n\n\t  \n",
    "naïve café résumé Ångström Crème Brûlée", "e\u0301te\u0301 (combining accents)", "Straße ß ǅ ﬁ",
    "東京タワーはどこですか？ 北京欢迎你 서울", "中文abc混合123文本", "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ",
    "مرحبا بالعالم", "สวัสดีครับ", "Привет, мир!", "😀🦙👍🏽 emoji and ZWJ 👨‍👩‍👧",
    "punctuation: .,;:!?-()[]{}<>/\\|@#$%^&*_+=~`'\"", "a--b...c???d!!!", "1,234.56 $20 3.14 50% #1",
    "multiple     spaces\tand\ttabs\r\nand\u00a0nbsp\u2003em-space", "zero\u200bwidth\u200djoiner\ufeffbom",
    "control\x00chars\x07here\x1f", "[CLS] [SEP] [PAD] [MASK] [UNK] inside the text", "[sep] [mask] lower-case",
    "<image>\nWhat is in the image?", "supercalifragilisticexpialidocious " + "x" * 120,
    " ".join(["the quick brown fox jumps over the lazy dog"] * 80),                 # > 512 tokens
    "東" * 700,                                                                     # > 512 CJK characters
]


@pytest.fixture(scope="module")
def vocab_folder(tmp_path_factory) -> Path:
    return write_bert_vocab(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def ours(vocab_folder) -> BertTextTokenizer:
    return BertTextTokenizer.from_folder(vocab_folder)


@pytest.fixture(scope="module")
def theirs(vocab_folder):
    from transformers import BertTokenizerFast

    return BertTokenizerFast.from_pretrained(str(vocab_folder))


def _upstream_ids(theirs, text: str) -> list[int]:
    """MoVA's call (builder.py): padding='longest' over one text is no padding."""
    return theirs([text], padding="longest", truncation=True, max_length=512)["input_ids"][0]


# ---- ids --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", TEXTS)
def test_ids_equal_bert_tokenizer_fast(ours, theirs, text):
    assert ours.encode(text) == _upstream_ids(theirs, text)
    assert ours.encode(adapter_text(text)) == _upstream_ids(theirs, adapter_text(text))


def test_long_questions_are_truncated_at_512_like_upstream(ours, theirs):
    question = " ".join(["what is the person in the image wearing"] * 120)
    ids = ours.encode(adapter_text(question))
    assert len(theirs(adapter_text(question))["input_ids"]) > 600                  # it really is longer
    assert ids == _upstream_ids(theirs, adapter_text(question)) and len(ids) == MAX_TEXT_TOKENS
    assert ids[0] == theirs.cls_token_id and ids[-1] == theirs.sep_token_id


def test_special_ids_and_vocab_match(ours, theirs):
    assert ours.pad_id == theirs.pad_token_id == 0
    assert ours.backend.get_vocab() == theirs.get_vocab()


def test_tokenizer_config_options_are_read(tmp_path, theirs):
    """do_lower_case false keeps capitals (they then fall to [UNK] in this uncased vocab), as transformers does."""
    folder = write_bert_vocab(tmp_path / "cased")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(config | {"do_lower_case": False}))
    from transformers import BertTokenizerFast

    cased_ours, cased_theirs = BertTextTokenizer.from_folder(folder), BertTokenizerFast.from_pretrained(str(folder))
    text = "What Is In The Cup? Café"
    assert cased_ours.encode(text) == cased_theirs(text)["input_ids"] != theirs(text)["input_ids"]
    (folder / "tokenizer_config.json").unlink()                 # no config: bert-large-uncased's defaults
    assert BertTextTokenizer.from_folder(folder).encode(text) == theirs(text)["input_ids"]


# ---- buckets ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("length, bucket", [(1, 64), (64, 64), (65, 128), (128, 128), (129, 512), (512, 512)])
def test_bucket_for_boundaries(length, bucket):
    assert bucket_for(length) == bucket
    assert bucket_for(length, reversed(TEXT_BUCKETS)) == bucket                  # order of the buckets is free


def test_bucket_for_refuses_what_no_bucket_holds():
    with pytest.raises(RuntimeInputError, match=r"is 600 BERT tokens, more than the largest text bucket 128; "
                                                r"re-export the text encoder with a 512-token bucket") as info:
        bucket_for(600, (64, 128))
    assert "\n" not in str(info.value)


def _question_of(ours, tokens: int) -> str:
    """A question whose adapter text is exactly `tokens` ids ("cat" is one WordPiece)."""
    base = len(ours.encode(adapter_text("")))
    question = " ".join(["cat"] * (tokens - base))
    assert len(ours.encode(adapter_text(question))) == tokens
    return question


@pytest.mark.parametrize("tokens, bucket", [(64, 64), (65, 128), (128, 128), (129, 512), (512, 512), (600, 512)])
def test_text_inputs_pad_to_the_smallest_bucket(ours, theirs, tokens, bucket):
    question = _question_of(ours, min(tokens, MAX_TEXT_TOKENS)) + " cat" * max(0, tokens - MAX_TEXT_TOKENS)
    ids, mask = text_inputs(ours, question)
    assert ids.shape == mask.shape == (1, bucket) and ids.dtype == mask.dtype == np.int64
    used = int(mask.sum())
    expected = _upstream_ids(theirs, adapter_text(question))
    assert used == len(expected) == min(tokens, MAX_TEXT_TOKENS)
    assert ids[0, :used].tolist() == expected and (mask[0, :used] == 1).all()
    assert (ids[0, used:] == ours.pad_id).all() and (mask[0, used:] == 0).all()


def test_everyday_long_questions_get_the_128_and_512_buckets(ours, theirs):
    sentence = "Describe the person standing next to the red car on the left side of the street, please. "
    for repeats, bucket in ((4, 128), (16, 512)):               # 101 and 389 BERT tokens
        question = sentence * repeats
        length = len(_upstream_ids(theirs, adapter_text(question)))
        assert (90 <= length <= 110) if bucket == 128 else (380 <= length <= 420), length
        assert text_inputs(ours, question)[0].shape == (1, bucket)


# ---- errors ------------------------------------------------------------------------------------------------------
def test_loading_errors_name_the_problem(tmp_path, vocab_folder):
    cases = []
    cases.append((tmp_path / "nowhere", CheckpointError, r"BERT tokenizer folder .*nowhere does not exist"))
    (tmp_path / "empty").mkdir()
    cases.append((tmp_path / "empty", CheckpointError, r"vocab.txt not found; copy bert-large-uncased's vocab.txt"))
    bad_json = write_bert_vocab(tmp_path / "bad_json", vocab_size=1000)
    (bad_json / "tokenizer_config.json").write_text("{not json")
    cases.append((bad_json, CheckpointError, r"tokenizer_config.json is not valid JSON .*; fix it or delete it"))
    list_json = write_bert_vocab(tmp_path / "list_json", vocab_size=1000)
    (list_json / "tokenizer_config.json").write_text("[1, 2]")
    cases.append((list_json, CheckpointError, r"tokenizer_config.json holds a list, not an object"))
    no_pad = tmp_path / "no_pad"
    no_pad.mkdir()
    (no_pad / "vocab.txt").write_text("\n".join(["[UNK]", "[CLS]", "[SEP]", "[MASK]", "cat"]) + "\n")
    cases.append((no_pad, CheckpointError, r"vocab.txt has no \[PAD\] entry"))
    not_utf8 = tmp_path / "not_utf8"
    not_utf8.mkdir()
    (not_utf8 / "vocab.txt").write_bytes(b"\xff\xfe[PAD]\n\xc3\x28\n")
    cases.append((not_utf8, CheckpointError, r"cannot read .*vocab.txt \(.*UTF-8\); replace it with bert-large"))
    for folder, error, message in cases:
        with pytest.raises(error, match=message) as info:
            BertTextTokenizer.from_folder(folder)
        assert "\n" not in str(info.value)
    with pytest.raises(BundleError, match=r"does not exist"):                    # the runtime's error class
        BertTextTokenizer.from_folder(tmp_path / "nowhere", error=BundleError)


# ---- no torch, no transformers -----------------------------------------------------------------------------------
def test_runs_without_torch_and_transformers(vocab_folder, ours):
    code = f"""
import json, sys
sys.modules["torch"] = None          # any import of them now raises ImportError
sys.modules["transformers"] = None
from mova_export.core.bert_inputs import BertTextTokenizer, text_inputs
tok = BertTextTokenizer.from_folder({str(vocab_folder)!r})
ids, mask = text_inputs(tok, "What is in the cup?")
print(json.dumps([ids.tolist(), mask.tolist()]))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    ids, mask = text_inputs(ours, "What is in the cup?")
    assert json.loads(done.stdout) == [ids.tolist(), mask.tolist()]


# ---- the [CLS] feature does not depend on the bucket ------------------------------------------------------------
def test_cls_feature_is_the_same_in_every_bucket(tmp_path):
    import torch

    from mova_export.components import get_spec
    from mova_export.synth import synthetic_config

    cfg = synthetic_config("tiny")
    assert arch(cfg, "text_encoder")["max_position_embeddings"] >= max(TEXT_BUCKETS)
    tokenizer = BertTextTokenizer.from_folder(write_bert_vocab(tmp_path, arch(cfg, "text_encoder")["vocab_size"]))
    torch.manual_seed(0)
    encoder = get_spec("text_encoder").build(cfg)
    with torch.no_grad():
        for p in encoder.parameters():
            p.normal_(0.0, 0.2)
    question = "What is the person in the image wearing?"
    feeds = {bucket: text_inputs(tokenizer, question, (bucket,)) for bucket in TEXT_BUCKETS}
    used = int(feeds[64][1].sum())
    with torch.no_grad():
        features = {bucket: encoder(torch.from_numpy(ids), torch.from_numpy(mask))
                    for bucket, (ids, mask) in feeds.items()}
        unpadded = encoder(torch.from_numpy(feeds[64][0][:, :used]), torch.from_numpy(feeds[64][1][:, :used]))
        unmasked = encoder(torch.from_numpy(feeds[512][0]), torch.ones(1, 512, dtype=torch.int64))
    for bucket, feature in features.items():
        assert feature.shape == (1, arch(cfg, "text_encoder")["hidden_size"])
        assert float((feature - unpadded).abs().max()) <= 1e-5, bucket
    assert float((unmasked - features[512]).abs().max()) > 1e-3                   # the mask is what makes it so

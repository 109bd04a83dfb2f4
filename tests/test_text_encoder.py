"""The adapter's BERT text encoder: [CLS] of the question, unchanged by the static right padding; long questions are
refused; the static ONNX graph reproduces it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mova_export.components import get_spec
from mova_export.components.text_encoder import encode_text_inputs
from mova_export.errors import RuntimeInputError
from mova_export.synth import synthetic_config
from mova_export.tokenizers import load_text_tokenizer, write_bert_vocab

CFG = synthetic_config("tiny")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = write_bert_vocab(tmp_path_factory.mktemp("bert"), vocab_size=CFG.arch("text_encoder")["vocab_size"])
    return load_text_tokenizer(folder)


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    module = get_spec("text_encoder").build(CFG)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.2)
    return module


def test_ids_are_the_upstream_text_padded_to_the_static_length(tokenizer):
    ids, mask = encode_text_inputs(tokenizer, "<image>\nWhat Is In The Cup?", CFG)
    assert ids.shape == mask.shape == (1, CFG.text_max_length) and ids.dtype == torch.int64
    used = int(mask.sum())
    expected = tokenizer("question 0: what is in the cup?\n\n")["input_ids"]
    assert ids[0, :used].tolist() == expected
    assert ids[0, 0] == tokenizer.cls_token_id and ids[0, used - 1] == tokenizer.sep_token_id
    assert (ids[0, used:] == tokenizer.pad_token_id).all() and (mask[0, used:] == 0).all()


def test_padding_does_not_change_the_cls_output(tokenizer, encoder):
    ids, mask = encode_text_inputs(tokenizer, "What animal is this?", CFG)
    used = int(mask.sum())
    with torch.no_grad():
        padded = encoder(ids, mask)
        unpadded = encoder(ids[:, :used], mask[:, :used])
        garbage = ids.clone()
        garbage[0, used:] = 7  # whatever sits behind the mask must not matter either
        other = encoder(garbage, mask)
    assert padded.shape == (1, CFG.arch("text_encoder")["hidden_size"])
    assert float((padded - unpadded).abs().max()) <= 1e-5
    assert float((padded - other).abs().max()) <= 1e-5
    with torch.no_grad():  # and the mask really is used: unmasking the padding changes the output
        assert float((encoder(ids, torch.ones_like(mask)) - padded).abs().max()) > 1e-3


def test_too_long_question_is_refused(tokenizer):
    with pytest.raises(RuntimeInputError, match=r"is \d+ BERT tokens; the static text length is 64"):
        encode_text_inputs(tokenizer, "what is this " * 40, CFG)


def test_onnx_graph_matches(tokenizer, encoder, tmp_path):
    from mova_export.export import onnx_from_component
    from mova_export.runners import OrtRunner, TorchRunner
    from mova_export.validate import compare

    spec = get_spec("text_encoder")
    path = tmp_path / "text.onnx"
    onnx_from_component(spec, encoder, CFG, path)
    names = [t.name for t in spec.inputs(CFG)]
    ort_runner, torch_runner = OrtRunner(path), TorchRunner(encoder, names, ["text_features"])
    for question in ("What is in the cup?", "Read the text in the image, please."):
        ids, mask = encode_text_inputs(tokenizer, question, CFG)
        feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
        compare(torch_runner.infer(feed), ort_runner.infer(feed), component="text_encoder", sample=question)

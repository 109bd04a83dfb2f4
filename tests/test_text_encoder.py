"""The adapter's BERT text encoder: [CLS] of the question, unchanged by the right padding to a length bucket; the
ONNX graph (one symbolic length, text_length) reproduces PyTorch at every bucket, long questions included."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from mova_export.components import arch, get_spec
from mova_export.core.bert_inputs import TEXT_BUCKETS, BertTextTokenizer, text_inputs
from mova_export.synth import synthetic_config
from mova_export.synth.tokenizers import write_bert_vocab

CFG = synthetic_config("tiny")
# ~10, ~100 and ~400 BERT tokens: one question per bucket
QUESTIONS = ("What is in the cup?", "Describe every object on the table, " * 14 + "please.",
             "Read the text on the page and tell me what it says, line by line, " * 28 + "thanks.")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = write_bert_vocab(tmp_path_factory.mktemp("bert"), vocab_size=arch(CFG, "text_encoder")["vocab_size"])
    return BertTextTokenizer.from_folder(folder)


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    module = get_spec("text_encoder").build(CFG)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.2)
    return module


def test_questions_take_the_bucket_that_holds_them(tokenizer):
    buckets = [text_inputs(tokenizer, q, TEXT_BUCKETS)[0].shape[1] for q in QUESTIONS]
    used = [int(text_inputs(tokenizer, q, TEXT_BUCKETS)[1].sum()) for q in QUESTIONS]
    assert buckets == [64, 128, 512], used
    assert used[0] < 64 < used[1] <= 128 < used[2] <= 512


def test_padding_does_not_change_the_cls_output(tokenizer, encoder):
    ids, mask = (torch.from_numpy(a) for a in text_inputs(tokenizer, "What animal is this?", TEXT_BUCKETS))
    used = int(mask.sum())
    with torch.no_grad():
        padded = encoder(ids, mask)
        unpadded = encoder(ids[:, :used], mask[:, :used])
        garbage = ids.clone()
        garbage[0, used:] = 7  # whatever sits behind the mask must not matter either
        other = encoder(garbage, mask)
    assert padded.shape == (1, arch(CFG, "text_encoder")["hidden_size"])
    assert float((padded - unpadded).abs().max()) <= 1e-5
    assert float((padded - other).abs().max()) <= 1e-5
    with torch.no_grad():  # and the mask really is used: unmasking the padding changes the output
        assert float((encoder(ids, torch.ones_like(mask)) - padded).abs().max()) > 1e-3


def test_onnx_graph_matches_at_every_bucket(tokenizer, encoder, tmp_path):
    from mova_export.core.tolerance import compare_outputs
    from mova_export.export import onnx_from_component
    from mova_export.runners.ort import OrtRunner
    from mova_export.runners.pytorch import TorchRunner

    spec = get_spec("text_encoder")
    path = tmp_path / "text.onnx"
    onnx_from_component(spec, encoder, CFG, path)
    dims = [d.dim_param for d in onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim]
    assert dims[1] == "text_length"          # the one symbolic dimension
    names = [t.name for t in spec.inputs(CFG)]
    ort_runner, torch_runner = OrtRunner(path), TorchRunner(encoder, names, ["text_features"])
    for question in QUESTIONS:
        ids, mask = text_inputs(tokenizer, question, TEXT_BUCKETS)
        used = int(mask.sum())
        for bucket in (b for b in TEXT_BUCKETS if b >= used):
            ids, mask = text_inputs(tokenizer, question, (bucket,))
            feed = {"input_ids": ids, "attention_mask": mask}
            compare_outputs(torch_runner.infer(feed), ort_runner.infer(feed), component="text_encoder",
                    sample=f"{used} tokens @ {bucket}")
            unpadded = torch_runner.infer({"input_ids": ids[:, :used], "attention_mask": mask[:, :used]})
            assert np.abs(unpadded["text_features"] - ort_runner.infer(feed)["text_features"]).max() <= 1e-5

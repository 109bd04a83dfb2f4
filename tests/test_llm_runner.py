"""The llama.cpp runner with image embeddings injected at the <image> marker, against transformers inputs_embeds.

Uses the session's tiny LLM from test_gguf (synthetic checkpoint, or its local fallback). Image embeddings are
random with the scale of the text embeddings; prompts are MoVA's real routing and answer frames.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mova_export.components import routing_prompt_lines
from mova_export.core.errors import LLMError
from mova_export.core.prompts import (
    IMAGE_TOKEN_INDEX,
    MAX_ROUTING_TOKENS,
    chat_prompt,
    routing_prompt,
    tokenize_with_image,
)
from mova_export.reference.llm import hf_generate, hf_inputs_embeds, hf_logits
from mova_export.runtime.llm import split_at_marker
from mova_export.source.llama3 import load_llm_tokenizer

ROUTING_PROMPT = routing_prompt(routing_prompt_lines())
from test_gguf import HAS_LLAMA_CPP, LOGIT_TOL, clear_margin, tiny  # noqa: F401 - tiny is a fixture

llamacpp = pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed (pip install '.[llm]')")
N_ROUTING, N_ANSWER = 12, 24  # image tokens (MoVA-8B: 144 and 576)


def image_embeddings(n: int, width: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((n, width)) * 0.02).astype(np.float32)


@pytest.fixture(scope="module")
def prompts(tiny):
    tok = load_llm_tokenizer(tiny.root)
    encode = lambda text: tok(text).input_ids  # noqa: E731
    q = "What is in the image?"
    return {"routing": tokenize_with_image(chat_prompt(q, routing_prompt=ROUTING_PROMPT), encode, tok.bos_token_id),
            "answer": tokenize_with_image(chat_prompt(q), encode, tok.bos_token_id),
            "stop": sorted({tok.eos_token_id, tok.convert_tokens_to_ids("<|eot_id|>")})}


def _llm(tiny, qtype, **kw):
    from mova_export.runtime.llm import LlamaCppLLM

    return LlamaCppLLM(tiny.gguf(qtype), n_ctx=512, n_threads=2, **{"f32_kv": True, **kw})


# ---- transformers side (no llama.cpp needed) ------------------------------------------------------------------------
def test_hf_inputs_embeds_splices_at_marker(tiny, prompts):
    ids = prompts["answer"]
    emb = image_embeddings(N_ANSWER, tiny.model.config.hidden_size)
    x = hf_inputs_embeds(tiny.model, ids, emb)
    at = ids.index(IMAGE_TOKEN_INDEX)
    assert x.shape == (1, len(ids) - 1 + N_ANSWER, tiny.model.config.hidden_size)
    np.testing.assert_array_equal(x[0, at:at + N_ANSWER].numpy(), emb)
    table = tiny.model.get_input_embeddings().weight
    torch.testing.assert_close(x[0, :at], table[ids[:at]])
    torch.testing.assert_close(x[0, at + N_ANSWER:], table[ids[at + 1:]])
    # hf_generate's first token is the argmax of the prefill's last logits
    first = hf_generate(tiny.model, ids, emb, 1, [])
    assert first == [int(hf_logits(tiny.model, ids, emb)[-1].argmax())]
    assert hf_generate(tiny.model, ids, emb, 4, first) == []  # the stop id is never returned


def test_marker_rules():
    assert split_at_marker([1, 2, -200, 3], True, "t") == ([1, 2], [3])
    assert split_at_marker([1, 2], False, "t") == ([1, 2], None)
    for ids, has, msg in (([1, -200, 2, -200], True, "2 image markers"), ([1, -200], False, "no image embeddings"),
                          ([1, 2], True, "no -200 marker")):
        with pytest.raises(LLMError, match=msg):
            split_at_marker(ids, has, "t")


# ---- llama.cpp vs transformers ---------------------------------------------------------------------------------------
@llamacpp
@pytest.mark.llamacpp
@pytest.mark.parametrize("qtype", ["f32", "f16", "q8_0"])
def test_injected_embedding_logits_match(tiny, prompts, qtype, record_property):
    ids = prompts["routing"]
    emb = image_embeddings(N_ROUTING, tiny.model.config.hidden_size)
    ref = hf_logits(tiny.model, ids, emb)
    with _llm(tiny, qtype, n_batch=32) as llm:  # the routing prompt (~290 positions) spans several chunks
        got = llm.logits_for(ids, emb)
    assert got.shape == ref.shape == (len(ids) - 1 + N_ROUTING, tiny.model.config.vocab_size)
    diff = float(np.abs(got - ref).max())
    record_property("max_abs_logit_diff", diff)
    assert diff < LOGIT_TOL[qtype], f"{qtype}: max |diff| {diff:.3g}"
    rows = clear_margin(ref, diff)
    assert rows.sum() >= len(rows) // 4
    np.testing.assert_array_equal(got[rows].argmax(-1), ref[rows].argmax(-1))


@llamacpp
@pytest.mark.llamacpp
def test_chunking_does_not_change_logits(tiny, prompts):
    ids = prompts["answer"]
    emb = image_embeddings(N_ANSWER, tiny.model.config.hidden_size)
    with _llm(tiny, "f32", n_batch=512) as whole, _llm(tiny, "f32", n_batch=7) as chunked:
        np.testing.assert_allclose(chunked.logits_for(ids, emb), whole.logits_for(ids, emb), atol=2e-5, rtol=0)


@llamacpp
@pytest.mark.llamacpp
@pytest.mark.parametrize("qtype", ["f32", "f16", "q8_0"])
def test_greedy_generation_matches_transformers(tiny, prompts, qtype):
    width = tiny.model.config.hidden_size
    with _llm(tiny, qtype) as llm:
        for name, n, max_new in (("routing", N_ROUTING, MAX_ROUTING_TOKENS), ("answer", N_ANSWER, 24)):
            emb = image_embeddings(n, width, seed=n)
            ref = hf_generate(tiny.model, prompts[name], emb, max_new, prompts["stop"])
            got = llm.generate_ids(prompts[name], emb, max_new, prompts["stop"])
            if qtype == "f32":
                assert got == ref, name
            else:  # may part only where transformers itself has a near-tie (top-2 gap within the tolerance)
                split = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), None)
                if split is not None:
                    top2 = np.sort(hf_logits(tiny.model, prompts[name] + ref[:split], emb)[-1])[-2:]
                    assert top2[1] - top2[0] < 2 * LOGIT_TOL[qtype], (name, split, got, ref)
                else:
                    assert len(got) == len(ref), (name, got, ref)


@llamacpp
@pytest.mark.llamacpp
def test_streaming_pieces_and_stop(tiny, prompts):
    tok = load_llm_tokenizer(tiny.root)
    emb = image_embeddings(N_ANSWER, tiny.model.config.hidden_size)
    with _llm(tiny, "f32") as llm:
        assert llm.stop_ids == tuple(prompts["stop"])
        stream = list(llm.generate(prompts["answer"], emb, 12))
        ids = [t for t, _ in stream]
        assert len(ids) == 12
        # control tokens (specials) have no text, as with the reference's decode(skip_special_tokens=True)
        assert "".join(p for _, p in stream) == tok.decode(ids, skip_special_tokens=True) == llm.detokenize(ids)
        # a stop id ends generation and is not yielded
        assert llm.generate_ids(prompts["answer"], emb, 12, stop_ids=[ids[3]]) == ids[:ids.index(ids[3])]
        assert llm.generate_ids(prompts["answer"], emb, 12, stop_ids=[ids[0]]) == []


@llamacpp
@pytest.mark.llamacpp
def test_passes_do_not_share_kv_state(tiny, prompts):
    width = tiny.model.config.hidden_size
    routing_emb, answer_emb = image_embeddings(N_ROUTING, width, 1), image_embeddings(N_ANSWER, width, 2)
    with _llm(tiny, "f32") as fresh:
        alone = fresh.generate_ids(prompts["answer"], answer_emb, 8)
    with _llm(tiny, "f32") as llm:
        llm.generate_ids(prompts["routing"], routing_emb, MAX_ROUTING_TOKENS)
        assert llm.generate_ids(prompts["answer"], answer_emb, 8) == alone
        assert llm.llama.n_tokens == len(prompts["answer"]) - 1 + N_ANSWER + 7  # the last token is not evaluated
        at = prompts["answer"].index(IMAGE_TOKEN_INDEX)
        assert list(llm.llama.input_ids[at:at + N_ANSWER]) == [IMAGE_TOKEN_INDEX] * N_ANSWER
        # a half-consumed stream leaves nothing behind for the next call either
        stream = llm.generate(prompts["routing"], routing_emb, MAX_ROUTING_TOKENS)
        next(stream)
        assert llm.generate_ids(prompts["answer"], answer_emb, 8) == alone


@llamacpp
@pytest.mark.llamacpp
def test_runner_errors(tiny, prompts):
    width = tiny.model.config.hidden_size
    ids, emb = prompts["answer"], image_embeddings(N_ANSWER, width)
    with _llm(tiny, "q8_0") as llm:
        with pytest.raises(LLMError, match=rf"shape \[24, 128\], the LLM needs \[N, {width}\]"):
            llm.generate(ids, emb[:, :128], 4)
        with pytest.raises(LLMError, match=r"exceeds the context of 512; raise n_ctx"):
            llm.generate(ids, emb, 512)
        with pytest.raises(LLMError, match="image marker .* but no image embeddings"):
            llm.logits_for(ids)
        with pytest.raises(LLMError, match="outside the GGUF vocabulary"):
            llm.logits_for([llm.bos_id, 5000])
        with pytest.raises(LLMError, match="NaN or inf"):
            llm.logits_for(ids, np.full_like(emb, np.nan))
        with pytest.raises(LLMError, match="at least one token"):
            llm.generate(ids, emb, 0)
        # torch tensors and [1, N, H] batches are accepted
        a = llm.logits_for(ids, torch.from_numpy(emb)[None])
        np.testing.assert_array_equal(a, llm.logits_for(ids, emb))

"""GGUF conversion: metadata, tensor layout and types, vocabulary, errors; llama.cpp loads every type and matches
transformers on tokens and logits.

The tiny LLM (hidden 256 so K-quants really apply, 2 layers, 4 heads, 2 KV heads, vocab 1024) comes from a
synthetic checkpoint when the `llm` component is registered (mova_export/components/llm.py), otherwise from a
transformers LlamaForCausalLM with the same shapes and the same N(0, 0.02) init; bf16 weights either way, so the
f32 reference and the f32/bf16 GGUFs hold identical values.
"""
from __future__ import annotations

import importlib.util
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from mova_export.components import routing_prompt_lines
from mova_export.core.errors import ComponentError, LLMError
from mova_export.core.prompts import routing_prompt
from mova_export.gguf import QTYPES
from mova_export.gguf.convert import convert_checkpoint_to_gguf, gguf_from_source, source_from_state_dict
from mova_export.source.llama3 import load_llm_tokenizer, special_token_ids
from mova_export.synth.tokenizers import iter_sample_texts, write_llama3_tokenizer

ROUTING_PROMPT = routing_prompt(routing_prompt_lines())

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
llamacpp = pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed (pip install '.[llm]')")

TINY_LLM = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=2048,
                bos_token_id=768, eos_token_id=777, tie_word_embeddings=False, hidden_act="silu")
# Measured max |logit - transformers fp32| on this model (logit std ~0.3), with headroom; KV cache F32 unless noted.
# The notes' figures for another tiny model: F32 ~2e-6, F16 ~3e-3, Q8_0 ~6e-2, Q4_K_M ~0.4.
LOGIT_TOL = {"f32": 1e-4, "f32+f16kv": 1e-3, "f16": 3e-3, "bf16": 2e-2, "q8_0": 6e-2, "q6_k": 0.15, "q5_k_m": 0.25,
             "q4_k_m": 0.5}
QUANT_TENSOR_TYPE = {"q8_0": "Q8_0", "q6_k": "Q6_K", "q5_k_m": "Q5_K", "q4_k_m": "Q4_K"}  # type of blk.*.attn_q


@dataclass
class TinyLLM:
    root: Path                                # checkpoint (or tokenizer) folder
    model: torch.nn.Module                    # fp32 transformers LlamaForCausalLM, eval
    convert: Callable[[str, Path], Path]      # (qtype, out) -> GGUF path
    via_checkpoint: bool
    state: dict                               # HF state dict (bf16)

    _files: dict | None = None

    def gguf(self, qtype: str) -> Path:
        """The session's GGUF of that type (converted once)."""
        path = self.root.parent / f"{self.root.name}-{qtype}.gguf"
        if not path.exists():
            self.convert(qtype, path)
        return path


_TINY: dict[str, TinyLLM] = {}


def tiny_llm(tmp_path_factory) -> TinyLLM:
    """The session's tiny LLM: a synthetic checkpoint with only the llm component, or a local fallback."""
    if "llm" in _TINY:
        return _TINY["llm"]
    root = tmp_path_factory.getbasetemp() / "mova-tiny-llm"
    try:
        from mova_export.components import get_spec

        get_spec("llm")
        have_component = True
    except ComponentError:
        have_component = False
    if have_component:
        from mova_export.core.progress import NULL
        from mova_export.source.checkpoint import Checkpoint
        from mova_export.synth import write_synthetic_checkpoint

        if not (root / "config.json").exists():
            write_synthetic_checkpoint(root, scale="tiny", components=["llm"], fmt="safetensors", console=NULL)
        ckpt = Checkpoint.open(root)
        model = ckpt.build("llm").eval()
        state = dict(ckpt.tensors(ckpt.component_keys("llm")))
        convert = lambda q, out: convert_checkpoint_to_gguf(root, out, q, threads=2)  # noqa: E731
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**TINY_LLM))
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.normal_(0.0, 0.02)
                if "norm" in name:
                    p.add_(1.0)
        state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
        model.load_state_dict({k: v.float() for k, v in state.items()})
        model.eval()
        write_llama3_tokenizer(root, TINY_LLM["vocab_size"])
        source = source_from_state_dict(TINY_LLM, state, root, name="tiny")
        convert = lambda q, out: gguf_from_source(source, out, q, threads=2)  # noqa: E731
    _TINY["llm"] = TinyLLM(root=root, model=model, convert=convert, via_checkpoint=have_component, state=state)
    return _TINY["llm"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> TinyLLM:
    return tiny_llm(tmp_path_factory)


def clear_margin(ref: np.ndarray, diff: float) -> np.ndarray:
    """Rows whose top-2 gap in the reference exceeds twice the observed difference (argmax must agree there)."""
    top2 = np.sort(ref, axis=-1)[:, -2:]
    return (top2[:, 1] - top2[:, 0]) > 2 * diff


def read_gguf(path: Path):
    import gguf

    reader = gguf.GGUFReader(path)

    def field(name):
        f = reader.get_field(name)
        return None if f is None else f.contents()

    return reader, field


# ---- conversion without llama.cpp --------------------------------------------------------------------------------------
def test_metadata_and_vocab(tiny):
    import gguf

    path = tiny.gguf("f16")
    reader, field = read_gguf(path)
    cfg = tiny.model.config
    specials = special_token_ids(cfg.vocab_size)
    assert field("general.architecture") == "llama"
    assert field("llama.vocab_size") == cfg.vocab_size
    assert field("llama.embedding_length") == cfg.hidden_size
    assert field("llama.block_count") == cfg.num_hidden_layers
    assert field("llama.feed_forward_length") == cfg.intermediate_size
    assert field("llama.attention.head_count") == cfg.num_attention_heads
    assert field("llama.attention.head_count_kv") == cfg.num_key_value_heads
    assert field("llama.context_length") == cfg.max_position_embeddings
    assert field("llama.rope.dimension_count") == cfg.hidden_size // cfg.num_attention_heads
    assert field("llama.rope.freq_base") == pytest.approx(500000.0)
    assert field("llama.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.rms_norm_eps)
    assert field("general.file_type") == 1  # MOSTLY_F16
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "llama-bpe"
    assert field("tokenizer.ggml.bos_token_id") == specials["<|begin_of_text|>"]
    assert field("tokenizer.ggml.eos_token_id") == specials["<|eot_id|>"]  # MoVA-8B's eos
    assert field("tokenizer.ggml.add_bos_token") is True
    assert "<|start_header_id|>" in field("tokenizer.chat_template")
    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == cfg.vocab_size
    tok = load_llm_tokenizer(tiny.root)
    assert tokens == [tok.convert_ids_to_tokens(i) for i in range(cfg.vocab_size)]
    first = min(specials.values())
    assert all(t == gguf.TokenType.CONTROL for t in types[first:])
    assert all(t == gguf.TokenType.NORMAL for t in types[:first])
    merges = json.loads((tiny.root / "tokenizer.json").read_text())["model"]["merges"]
    assert field("tokenizer.ggml.merges") == [" ".join(m) for m in merges]


def test_tensors_types_and_qk_permutation(tiny):
    path = tiny.gguf("f16")
    reader, _ = read_gguf(path)
    tensors = {t.name: t for t in reader.tensors}
    n_layer = tiny.model.config.num_hidden_layers
    assert len(tensors) == 3 + 9 * n_layer  # token_embd, output_norm, output + 9 per block
    for name, t in tensors.items():
        assert t.tensor_type.name == ("F32" if name.endswith("norm.weight") else "F16"), name
    cfg = tiny.model.config
    for hf, gg, heads in (("model.layers.1.self_attn.q_proj.weight", "blk.1.attn_q.weight", cfg.num_attention_heads),
                          ("model.layers.1.self_attn.k_proj.weight", "blk.1.attn_k.weight", cfg.num_key_value_heads)):
        w = tiny.state[hf].float()
        stored = torch.from_numpy(np.array(tensors[gg].data, dtype=np.float32)).reshape(w.shape)
        # undo GGML's interleaved layout: rows (head, pair, 2) -> (head, 2, pair)
        unpermuted = stored.reshape(heads, w.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)
        torch.testing.assert_close(unpermuted, w.half().float(), rtol=0, atol=0)
        assert not torch.equal(stored, w.half().float())
    emb = np.array(tensors["token_embd.weight"].data, dtype=np.float32)
    np.testing.assert_array_equal(emb, tiny.state["model.embed_tokens.weight"].half().float().numpy())


def test_direct_types_and_atomic_write(tiny, tmp_path):
    for qtype, want in (("f32", "F32"), ("bf16", "BF16")):
        reader, field = read_gguf(tiny.gguf(qtype))
        types = {t.name: t.tensor_type.name for t in reader.tensors}
        assert types["blk.0.attn_q.weight"] == want and types["blk.0.attn_norm.weight"] == "F32"
    out = tiny.convert("f16", tmp_path / "sub" / "llm.gguf")
    assert out.is_file() and [p.name for p in out.parent.iterdir()] == ["llm.gguf"]  # no temp files left


def test_padded_vocab_and_error_messages(tiny, tmp_path):
    state = {k: v.clone() for k, v in tiny.state.items()}
    n = tiny.model.config.vocab_size
    for key in ("model.embed_tokens.weight", "lm_head.weight"):  # 8 more rows than the tokenizer has tokens
        state[key] = torch.cat([state[key], torch.zeros(8, state[key].shape[1], dtype=state[key].dtype)])
    hp = {**TINY_LLM, "vocab_size": n + 8}
    tok_dir = tiny.root
    out = gguf_from_source(source_from_state_dict(hp, state, tok_dir), tmp_path / "padded.gguf", "f16")
    import gguf

    _, field = read_gguf(out)
    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    assert field("llama.vocab_size") == n + 8 and tokens[n:] == [f"[PAD{i}]" for i in range(n, n + 8)]
    assert set(types[n:]) == {gguf.TokenType.UNUSED}

    def fails(match, hparams=TINY_LLM, st=None, qtype="f16", tokdir=tok_dir):
        with pytest.raises(LLMError, match=match):
            gguf_from_source(source_from_state_dict(hparams, st or tiny.state, tokdir), tmp_path / "x.gguf", qtype)
        assert not (tmp_path / "x.gguf").exists()

    fails("unknown GGUF type 'q3_k'", qtype="q3_k")
    small = {k: (v[:512] if k in ("model.embed_tokens.weight", "lm_head.weight") else v) for k, v in tiny.state.items()}
    fails(r"tokenizer has 1024 tokens but the LLM's embedding has 512 rows", {**TINY_LLM, "vocab_size": 512}, small)
    fails(r"no GGUF name, e.g. \['model.mm_projector.mlp.0.weight'\]",
          st={**tiny.state, "model.mm_projector.mlp.0.weight": torch.zeros(4, 4)})
    fails(r"no tensor for \['blk.1.ffn_down.weight'\]",
          st={k: v for k, v in tiny.state.items() if k != "model.layers.1.mlp.down_proj.weight"})
    fails("rope_scaling=.*not supported", {**TINY_LLM, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    fails("num_attention_heads=4 is not a multiple of num_key_value_heads=3", {**TINY_LLM, "num_key_value_heads": 3})
    big = dict(tiny.state)
    big["model.layers.0.mlp.up_proj.weight"] = big["model.layers.0.mlp.up_proj.weight"].float() * 1e7
    fails("overflows float16.*bf16", st=big)
    fails("GGUF needs the LLM tokenizer: .*tokenizer.json not found", tokdir=tmp_path)
    (tmp_path / "wp").mkdir()
    write_llama3_tokenizer(tmp_path / "wp", 1024)
    raw = json.loads((tmp_path / "wp" / "tokenizer.json").read_text())
    raw["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    (tmp_path / "wp" / "tokenizer.json").write_text(json.dumps(raw))
    fails("not a Llama-3 byte-level BPE", tokdir=tmp_path / "wp")
    with pytest.raises(LLMError, match="is a folder"):
        tiny.convert("f16", tmp_path)


# ---- llama.cpp --------------------------------------------------------------------------------------------------------
def _llm(path, **kw):
    from mova_export.runtime.llm import LlamaCppLLM

    return LlamaCppLLM(path, n_ctx=512, n_threads=2, **{"f32_kv": True, **kw})


@llamacpp
@pytest.mark.llamacpp
def test_q8_0_written_directly_is_bit_identical_to_llama_cpp_quantizing_the_lossless_file(tiny, tmp_path):
    import gguf

    from mova_export.gguf.convert import quantize_gguf

    assert {t.dtype for t in tiny.state.values() if t.is_floating_point()} == {torch.bfloat16}
    by_llama_cpp, _ = read_gguf(quantize_gguf(tiny.gguf("bf16"), tmp_path / "q8.gguf", "q8_0", threads=2))
    direct, field = read_gguf(tiny.gguf("q8_0"))
    theirs_by_name = {t.name: t for t in by_llama_cpp.tensors}             # llama.cpp writes them in its own order
    assert sorted(t.name for t in direct.tensors) == sorted(theirs_by_name)
    q8 = 0
    for ours in direct.tensors:
        theirs = theirs_by_name[ours.name]
        assert ours.tensor_type == theirs.tensor_type, ours.name
        np.testing.assert_array_equal(np.asarray(ours.data), np.asarray(theirs.data), err_msg=ours.name)
        q8 += ours.tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert q8 == sum(len(t.shape) == 2 for t in direct.tensors) > 0     # every matrix, none left lossless
    assert field("general.file_type") == 7                              # LLAMA_FTYPE_MOSTLY_Q8_0


@llamacpp
@pytest.mark.llamacpp
def test_llama_cpp_quantization_reports_the_bytes_it_has_written(tiny, tmp_path):
    from mova_export.gguf.convert import quantize_gguf

    heard = []
    dst = quantize_gguf(tiny.gguf("f16"), tmp_path / "q8.gguf", "q8_0", threads=2, expected_bytes=123,
                        progress=lambda done, total, what: heard.append((done, total, what)), every_s=0.001)
    size = dst.stat().st_size
    assert heard[-1] == (size, size, f"llama.cpp quantizing to q8_0: done, {size / 1e9:.2f} GB")
    assert all(total == 123 and 0 <= done <= size for done, total, _ in heard[:-1])


@llamacpp
@pytest.mark.llamacpp
@pytest.mark.parametrize("qtype", list(QTYPES))
def test_every_type_loads_in_llama_cpp(tiny, qtype):
    path = tiny.gguf(qtype)
    reader, field = read_gguf(path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    if qtype in QUANT_TENSOR_TYPE:  # hidden 256: llama.cpp really applied the K-quant, no per-tensor fallback
        assert types["blk.0.attn_q.weight"] == QUANT_TENSOR_TYPE[qtype]
    assert types["blk.0.attn_norm.weight"] == "F32"
    with _llm(path) as llm:
        assert (llm.n_embd, llm.n_vocab) == (tiny.model.config.hidden_size, tiny.model.config.vocab_size)
        assert llm.logits_for([llm.bos_id, 300, 301]).shape == (3, llm.n_vocab)


@llamacpp
@pytest.mark.llamacpp
def test_gguf_tokenizer_matches_transformers(tiny):
    from mova_export.core.prompts import chat_prompt, tokenize_with_image

    tok = load_llm_tokenizer(tiny.root)
    with _llm(tiny.gguf("q8_0")) as llm:  # the vocabulary is the same in every type
        for text in iter_sample_texts():
            assert llm.tokenize(text) == tok(text).input_ids, text
            assert llm.tokenize(text, add_bos=False) == tok(text, add_special_tokens=False).input_ids, text
        for routing in (True, False):
            prompt = chat_prompt("What is in the image?", routing_prompt=ROUTING_PROMPT if routing else None)
            hf = tokenize_with_image(prompt, lambda t: tok(t).input_ids, tok.bos_token_id)
            assert llm.encode_prompt(prompt) == hf
            assert hf[:2] == [llm.bos_id, llm.bos_id]  # upstream keeps two BOS: tokenizer BOS + the system string's
        ids = tok("What is in the image? A, D").input_ids
        assert llm.detokenize(ids[1:]) == tok.decode(ids[1:])
        assert special_token_ids(llm.n_vocab)["<|eot_id|>"] in llm.stop_ids


@llamacpp
@pytest.mark.llamacpp
@pytest.mark.parametrize("qtype", list(QTYPES))
def test_text_logits_match_transformers(tiny, qtype, record_property):
    from mova_export.core.prompts import chat_prompt
    from mova_export.reference.llm import hf_logits

    tok = load_llm_tokenizer(tiny.root)
    ids = tok(chat_prompt("Describe this image in detail.").replace("<image>\n", "")).input_ids
    ref = hf_logits(tiny.model, ids)
    with _llm(tiny.gguf(qtype)) as llm:
        got = llm.logits_for(ids)
    diff = float(np.abs(got - ref).max())
    record_property("max_abs_logit_diff", diff)
    assert diff < LOGIT_TOL[qtype], f"{qtype}: max |diff| {diff:.3g}"
    rows = clear_margin(ref, diff)
    record_property("clear_margin_positions", f"{int(rows.sum())}/{len(ids)}")
    if qtype in ("f32", "f16", "bf16", "q8_0"):  # K-quants' error is close to this random model's top-2 gaps
        assert rows.sum() >= len(ids) // 4, "too few clear-margin positions to compare argmax"
    np.testing.assert_array_equal(got[rows].argmax(-1), ref[rows].argmax(-1))


@llamacpp
@pytest.mark.llamacpp
def test_default_f16_kv_cache_is_looser_but_close(tiny):
    from mova_export.reference.llm import hf_logits

    ids = load_llm_tokenizer(tiny.root)("The quick brown fox jumps over the lazy dog.").input_ids
    ref = hf_logits(tiny.model, ids)
    with _llm(tiny.gguf("f32"), f32_kv=False) as llm:
        diff = float(np.abs(llm.logits_for(ids) - ref).max())
    assert LOGIT_TOL["f32"] / 100 < diff < LOGIT_TOL["f32+f16kv"]


@llamacpp
@pytest.mark.llamacpp
def test_corrupt_or_missing_gguf(tiny, tmp_path):
    from mova_export.runtime.llm import LlamaCppLLM

    with pytest.raises(LLMError, match="not found.*mova-export gguf"):
        LlamaCppLLM(tmp_path / "none.gguf")
    (tmp_path / "text.gguf").write_text("hello")
    with pytest.raises(LLMError, match="not a GGUF file"):
        LlamaCppLLM(tmp_path / "text.gguf")
    data = tiny.gguf("q8_0").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    t0 = time.perf_counter()
    with pytest.raises(LLMError, match="cannot load .*truncated, corrupt"):
        LlamaCppLLM(tmp_path / "cut.gguf")
    assert time.perf_counter() - t0 < 30

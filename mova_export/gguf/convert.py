"""The LLM becomes a GGUF file for llama.cpp: `gguf_from_checkpoint` / `convert_checkpoint_to_gguf`.

Steps (one tensor in memory at a time, so the 8B LLM is never held twice):
1. `LLMSource`: the Llama hyper-parameters, every LLM tensor's shape (from shard headers, no bytes read), a
   streaming reader and the tokenizer folder. `source_from_checkpoint` reads a MoVA checkpoint through
   `Checkpoint` (component `llm`); `source_from_state_dict` wraps an in-memory HF LlamaForCausalLM state dict.
2. Plan: map every HF name with gguf-py's TensorNameMap (a name nobody claims is an error that lists them), check
   the hyper-parameters, the vocabulary (GGUF vocab = the real embedding row count; the token list is padded with
   [PADi] when the model has more rows, an error when the tokenizer has more tokens than the model) and the disk.
3. Write the GGUF with gguf-py's GGUFWriter, streaming: header, metadata (Llama-3 hparams; tokenizer gpt2 /
   llama-bpe with tokens, token types, merges, bos, eos = <|eot_id|> as MoVA uses, chat template), tensor infos,
   then each tensor as it is read. Q/K are permuted from HF's rotate-half layout to GGML's; 1-D norms stay F32.
   f32 / f16 / bf16 / q8_0 are written directly (q8_0 by gguf-py's quantizer, bit-exact with llama.cpp's, a few
   thousand rows at a time). q6_k / q5_k_m / q4_k_m are written lossless first (the source precision: bf16, f16 or
   f32) and then quantized by llama.cpp itself (`llama_cpp.llama_model_quantize`).
4. Everything goes to a temporary file beside the output and is renamed into place at the end.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch

from ..components import get_spec
from ..core.errors import LLMError, MoVAExportError
from ..core.progress import NULL, Console
from ..core.qtypes import BITS_PER_WEIGHT, LOSSLESS, QTYPES
from ..runtime.llm import import_llama_cpp, llama_cpp_log
from ..source.llama3 import EOS_TOKEN, LLAMA3_SPLIT_REGEX, load_llm_tokenizer

# llama_ftype values (llama.h); used for general.file_type of directly written files, no llama_cpp import needed.
_FILE_TYPE = {"F32": 0, "F16": 1, "Q8_0": 7, "BF16": 32}
_Q8_ROWS = 4096      # rows quantized at once: the fp32 copy of a 128k-row embedding would be 2 GB, with temporaries
LLAMA3_PRE = "llama-bpe"
Progress = Callable[[int, int, str], None]  # (done, total, what): bytes written so far / all bytes


@dataclass(frozen=True)
class LLMSource:
    """Where the LLM comes from: hyper-parameters, tensor shapes/dtypes in stream order, a reader, the tokenizer."""
    hparams: Mapping[str, Any]                                   # LlamaConfig fields (config.LLM_FIELDS)
    infos: Mapping[str, tuple[tuple[int, ...], torch.dtype]]     # HF key -> (shape, dtype), in `read()` order
    read: Callable[[], Iterator[tuple[str, torch.Tensor]]]       # yields (HF key, tensor) in `infos` order
    tokenizer_dir: Path
    name: str = "MoVA LLM"


# ---- sources ---------------------------------------------------------------------------------------------------------
def source_from_checkpoint(checkpoint_dir: str | Path) -> LLMSource:
    """The `llm` component of a MoVA checkpoint, read shard by shard, memory-mapped (keys in spec.unused_keys skipped)."""
    from ..source.checkpoint import Checkpoint

    ckpt = Checkpoint.open(checkpoint_dir)
    spec = get_spec("llm")
    keys = [k for k in ckpt.component_keys("llm") if not spec.is_unused(k[len(spec.prefix):])]
    if not keys:
        raise LLMError(f"{ckpt.path} holds no LLM weights (no key owned by component llm); is it a MoVA checkpoint?")
    rank = {name: i for i, name in enumerate(ckpt.shards)}
    groups: dict[str, list[str]] = {}
    for key in sorted(keys, key=lambda k: rank[ckpt.shard_of(k)]):  # stable: checkpoint order within a shard
        groups.setdefault(ckpt.shard_of(key), []).append(key)
    ordered = [k for group in groups.values() for k in group]
    info = ckpt.tensor_info(ordered)

    def read() -> Iterator[tuple[str, torch.Tensor]]:
        for group in groups.values():  # one shard opened at a time, each tensor a private copy
            for key, tensor in ckpt.tensors(group):
                yield key[len(spec.prefix):], tensor

    infos = {k[len(spec.prefix):]: info[k] for k in ordered}
    return LLMSource(hparams=dict(ckpt.config.llm), infos=infos, read=read, tokenizer_dir=ckpt.path,
                     name=f"MoVA LLM ({ckpt.path.name})")


def source_from_state_dict(hparams: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor],
                           tokenizer_dir: str | Path, name: str = "MoVA LLM") -> LLMSource:
    """An HF LlamaForCausalLM state dict already in memory (tests, or a model built elsewhere)."""
    infos = {k: (tuple(t.shape), t.dtype) for k, t in state_dict.items()}

    def read() -> Iterator[tuple[str, torch.Tensor]]:
        for key, tensor in state_dict.items():
            yield key, tensor.detach()

    return LLMSource(hparams=dict(hparams), infos=infos, read=read, tokenizer_dir=Path(tokenizer_dir), name=name)


# ---- plan --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Hparams:
    n_vocab: int
    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ctx: int
    rope_theta: float
    rms_eps: float


def _hparams(h: Mapping[str, Any], infos: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> _Hparams:
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
               if h.get(k) is None]
    if missing:
        raise LLMError(f"LLM config lacks {missing}; config.json must carry the Llama fields at its top level")
    if "model.embed_tokens.weight" not in infos:
        raise LLMError("LLM weights lack model.embed_tokens.weight; the checkpoint is not a Llama LLM")
    n_head = int(h["num_attention_heads"])
    n_head_kv = int(h.get("num_key_value_heads") or n_head)
    n_embd = int(h["hidden_size"])
    head_dim = int(h.get("head_dim") or n_embd // n_head)
    if n_head % n_head_kv:
        raise LLMError(f"num_attention_heads={n_head} is not a multiple of num_key_value_heads={n_head_kv}")
    if h.get("hidden_act", "silu") != "silu":
        raise LLMError(f"hidden_act={h['hidden_act']!r}: llama.cpp's llama architecture uses silu")
    rope_scaling = h.get("rope_scaling")
    if rope_scaling and (rope_scaling.get("rope_type") or rope_scaling.get("type", "default")) != "default":
        raise LLMError(f"rope_scaling={dict(rope_scaling)} is not supported by this converter (MoVA-8B is Llama-3 "
                       "with plain RoPE); remove it from config.json if the model was not trained with it")
    rows = int(infos["model.embed_tokens.weight"][0][0])
    return _Hparams(n_vocab=rows, n_embd=n_embd, n_ff=int(h["intermediate_size"]),
                    n_layer=int(h["num_hidden_layers"]), n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim,
                    n_ctx=int(h.get("max_position_embeddings") or 8192),
                    rope_theta=float(h.get("rope_theta") or 500000.0), rms_eps=float(h.get("rms_norm_eps") or 1e-5))


def _name_map(infos: Mapping[str, Any], hp: _Hparams) -> dict[str, str]:
    """HF name -> GGUF name for every tensor; unclaimed names and missing required tensors are errors."""
    import gguf

    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, hp.n_layer)
    names: dict[str, str] = {}
    unmapped = []
    for key in infos:
        if key.endswith("rotary_emb.inv_freq"):  # old HF checkpoints carry the RoPE table; llama.cpp computes it
            continue
        mapped = table.get_name(key, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            unmapped.append(key)
        else:
            names[key] = mapped
    if unmapped:
        raise LLMError(f"{len(unmapped)} LLM tensor(s) have no GGUF name, e.g. {unmapped[:3]}; only LlamaForCausalLM "
                       "weights convert (vision/projector keys belong to other components)")
    gguf_names = set(names.values())
    required = ["token_embd.weight", "output_norm.weight"] + [
        f"blk.{i}.{t}.weight" for i in range(hp.n_layer)
        for t in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up",
                  "ffn_down")]
    absent = [n for n in required if n not in gguf_names]
    if absent:
        raise LLMError(f"LLM weights incomplete: no tensor for {absent[:3]} ({len(absent)} missing); "
                       f"config.json says num_hidden_layers={hp.n_layer}")
    return names


def _vocab(tokenizer_dir: Path, hp: _Hparams, rows_out: int | None) -> dict[str, Any]:
    """Token list, types, merges and special ids from the HF tokenizer folder, sized to the embedding rows."""
    import json

    import gguf


    try:
        tok = load_llm_tokenizer(tokenizer_dir)
    except MoVAExportError as exc:
        raise LLMError(f"GGUF needs the LLM tokenizer: {exc}") from None
    raw = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    if raw.get("model", {}).get("type") != "BPE" or LLAMA3_SPLIT_REGEX not in _split_regexes(raw.get("pre_tokenizer")):
        raise LLMError(f"{tokenizer_dir / 'tokenizer.json'} is not a Llama-3 byte-level BPE (model type "
                       f"{raw.get('model', {}).get('type')!r}, different pre-tokenizer regex); llama.cpp's 'llama-bpe' "
                       "tokenizer would split text differently")
    vocab = tok.get_vocab()
    n_tok = max(vocab.values()) + 1
    if n_tok > hp.n_vocab:
        raise LLMError(f"the tokenizer has {n_tok} tokens but the LLM's embedding has {hp.n_vocab} rows; token ids "
                       f">= {hp.n_vocab} could not be embedded (checkpoint and tokenizer do not belong together)")
    if rows_out is not None and rows_out != hp.n_vocab:
        raise LLMError(f"lm_head has {rows_out} rows but embed_tokens {hp.n_vocab}; the checkpoint is inconsistent")
    reverse = {i: t for t, i in vocab.items()}
    added = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(hp.n_vocab):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    gguf_log = logging.getLogger("gguf.vocab")
    level = gguf_log.level
    gguf_log.setLevel(logging.ERROR)  # it warns about the <|begin_of_text|> pair separator every Llama-3 has
    try:
        special = gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=hp.n_vocab)
    finally:
        gguf_log.setLevel(level)
    if not special.merges:
        raise LLMError(f"{tokenizer_dir / 'tokenizer.json'} has no BPE merges; re-download the tokenizer")
    eot = vocab.get(EOS_TOKEN)
    if eot is None:
        raise LLMError(f"the tokenizer in {tokenizer_dir} has no {EOS_TOKEN}; MoVA's chat frame needs it")
    special.special_token_ids["eos"] = eot  # MoVA-8B generates until <|eot_id|> (load_pretrained_model)
    return {"tokens": tokens, "types": types, "special": special}


def _split_regexes(node: Any) -> list[str]:
    """Every Split pre-tokenizer regex in a tokenizer.json pre_tokenizer tree."""
    if isinstance(node, dict):
        found = [node["pattern"]["Regex"]] if isinstance(node.get("pattern"), dict) and "Regex" in node["pattern"] else []
        return found + [r for v in node.values() for r in _split_regexes(v)]
    if isinstance(node, list):
        return [r for v in node for r in _split_regexes(v)]
    return []


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half Q/K rows -> GGML's interleaved RoPE layout (as llama.cpp's converter does)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---- writing ----------------------------------------------------------------------------------------------------------
def _direct_type(qtype: str, source_dtypes: set[torch.dtype]) -> str:
    """GGUF type of 2-D weights in the file written by Python: the qtype itself, or lossless for quantization."""
    if "direct" in QTYPES[qtype]:
        return QTYPES[qtype]["direct"]
    if source_dtypes <= {torch.bfloat16}:
        return "BF16"
    if source_dtypes <= {torch.float16}:
        return "F16"
    return "F32"


def _as_gguf_array(t: torch.Tensor, kind: str, name: str) -> tuple[np.ndarray, Any]:
    import gguf

    if kind == "Q8_0":
        q8 = gguf.GGMLQuantizationType.Q8_0
        block, block_bytes = gguf.GGML_QUANT_SIZES[q8]
        if t.shape[-1] % block:
            raise LLMError(f"tensor {name} has rows of {t.shape[-1]} values, not a multiple of {block}: it cannot be "
                           "q8_0; convert with --type f16 or bf16")
        rows = t.reshape(-1, t.shape[-1])
        out = np.empty((rows.shape[0], rows.shape[1] // block * block_bytes), np.uint8)
        for start in range(0, rows.shape[0], _Q8_ROWS):
            out[start:start + _Q8_ROWS] = gguf.quants.quantize(rows[start:start + _Q8_ROWS].float().numpy(), q8)
        return out, q8
    if kind == "F32":
        return t.to(torch.float32).contiguous().numpy(), gguf.GGMLQuantizationType.F32
    if kind == "BF16":
        return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy(), gguf.GGMLQuantizationType.BF16
    lo, hi = torch.aminmax(t)  # scalars: no tensor-sized temporaries
    if max(-float(lo), float(hi)) > 65504.0:
        raise LLMError(f"tensor {name} overflows float16 (|x| up to {max(-float(lo), float(hi)):.3g} > 65504); "
                       "convert with --type bf16 or f32 instead")
    return t.to(torch.float16).contiguous().numpy(), gguf.GGMLQuantizationType.F16


def write_gguf(source: LLMSource, path: str | Path, kind: str = "F16", progress: Progress | None = None) -> Path:
    """Write `source` as a GGUF with 2-D weights in `kind` (F32, F16, BF16 or Q8_0) and 1-D tensors in F32,
    streaming."""
    import gguf

    path = Path(path)
    hp = _hparams(source.hparams, source.infos)
    names = _name_map(source.infos, hp)
    out_info = source.infos.get("lm_head.weight")
    voc = _vocab(source.tokenizer_dir, hp, None if out_info is None else int(out_info[0][0]))

    w = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    w.add_name(source.name)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_vocab_size(hp.n_vocab)
    w.add_context_length(hp.n_ctx)
    w.add_embedding_length(hp.n_embd)
    w.add_block_count(hp.n_layer)
    w.add_feed_forward_length(hp.n_ff)
    w.add_head_count(hp.n_head)
    w.add_head_count_kv(hp.n_head_kv)
    w.add_rope_dimension_count(hp.head_dim)
    w.add_rope_freq_base(hp.rope_theta)
    w.add_layer_norm_rms_eps(hp.rms_eps)
    if hp.head_dim != hp.n_embd // hp.n_head:
        w.add_key_length(hp.head_dim)
        w.add_value_length(hp.head_dim)
    w.add_file_type(_FILE_TYPE[kind])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(LLAMA3_PRE)
    w.add_token_list(voc["tokens"])
    w.add_token_types(voc["types"])
    voc["special"].add_to_gguf(w, quiet=True)

    def nbytes(shape: Any, kind: str) -> int:
        block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
        return int(np.prod(shape)) // block * block_bytes

    kinds: dict[str, str] = {}
    for key, (shape, _) in source.infos.items():
        if key not in names:
            continue
        kinds[key] = "F32" if len(shape) == 1 else kind
        dt = np.float32 if kinds[key] in ("F32", "Q8_0") else np.float16   # element shape; the raw type says the rest
        w.add_tensor_info(names[key], shape, np.dtype(dt), nbytes(shape, kinds[key]),
                          raw_dtype=gguf.GGMLQuantizationType[kinds[key]])
    total = sum(nbytes(s, kinds[k]) for k, (s, _) in source.infos.items() if k in kinds)

    done = 0
    w.write_header_to_file(path)
    try:
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        seen = 0
        order = iter(kinds)
        for key, tensor in source.read():
            if key not in kinds:
                continue
            if key != next(order, None):
                raise RuntimeError(f"LLM source yielded {key} out of its declared order")  # a bug in a source
            if tuple(tensor.shape) != tuple(source.infos[key][0]):
                raise LLMError(f"tensor {key} has shape {list(tensor.shape)}, its header says "
                               f"{list(source.infos[key][0])}; the checkpoint is corrupt")
            if key.endswith("self_attn.q_proj.weight"):
                tensor = _permute(tensor, hp.n_head)
            elif key.endswith("self_attn.k_proj.weight"):
                tensor = _permute(tensor, hp.n_head_kv)
            array, _ = _as_gguf_array(tensor, kinds[key], key)
            del tensor
            w.write_tensor_data(array)
            done += array.nbytes
            seen += 1
            del array
            if progress:
                progress(done, total, f"wrote {names[key]}")
        if seen != len(kinds):
            raise LLMError(f"the LLM source yielded {seen} of {len(kinds)} tensors; the checkpoint is incomplete")
    finally:
        w.close()
    return path


def quantize_gguf(src: str | Path, dst: str | Path, qtype: str, threads: int | None = None,
                  verbose: bool = False, progress: Progress | None = None, expected_bytes: int = 0,
                  every_s: float = 10.0) -> Path:
    """Quantize an F32/F16/BF16 GGUF with llama.cpp's own quantizer (llama_model_quantize). `progress` hears
    (bytes of dst written, expected_bytes, what) every `every_s` seconds while llama.cpp works (minutes for an 8B
    model, and llama.cpp reports nothing through its API), and once more with dst's final size when it is done."""
    if qtype not in QTYPES or qtype in LOSSLESS:
        raise LLMError(f"cannot quantize to {qtype!r}; quantized types: {[q for q in QTYPES if q not in LOSSLESS]}")

    llama_cpp = import_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QTYPES[qtype]["ftype"])
    params.nthread = int(threads or os.cpu_count() or 1)
    dst = Path(dst)
    with llama_cpp_log(verbose), _watch_size(dst, expected_bytes, f"llama.cpp quantizing to {qtype}", progress,
                                             every_s):
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0 or not dst.is_file():
        raise LLMError(f"llama.cpp could not quantize {src} to {qtype} (llama_model_quantize returned {rc}); "
                       "run with verbose=True to see llama.cpp's log")
    return dst


@contextlib.contextmanager
def _watch_size(path: Path, expected: int, what: str, progress: Progress | None, every_s: float) -> Iterator[None]:
    """Report how much of `path` a blocking native call has written, from a thread (ctypes releases the GIL)."""
    if progress is None:
        yield
        return
    stop = threading.Event()

    def size() -> int:
        return path.stat().st_size if path.is_file() else 0

    def watch() -> None:
        while not stop.wait(every_s):
            progress(size(), expected, f"{what}: {size() / 1e9:.2f} of ~{expected / 1e9:.2f} GB written")

    thread = threading.Thread(target=watch, name="gguf-quantize-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
    if path.is_file():
        progress(size(), size(), f"{what}: done, {size() / 1e9:.2f} GB")


def estimate_bytes(source: LLMSource, qtype: str) -> int:
    params = sum(int(np.prod(shape)) for shape, _ in source.infos.values())
    return int(params * BITS_PER_WEIGHT[qtype] / 8)


def estimate_gguf_bytes(checkpoint: Any, qtype: str) -> int:
    """Disk a conversion of the checkpoint's LLM needs: the lossless file, plus the quantized one."""
    source = source_from_checkpoint(checkpoint.path)
    kind = _direct_type(qtype, {dt for _, dt in source.infos.values() if dt.is_floating_point}).lower()
    return estimate_bytes(source, kind) + (0 if "direct" in QTYPES[qtype] else estimate_bytes(source, qtype))


def gguf_from_source(source: LLMSource, out_path: str | Path, qtype: str = "f16", *, progress: Progress | None = None,
                     threads: int | None = None, keep_unquantized: str | Path | None = None,
                     verbose: bool = False, quantize_progress: Progress | None = None) -> Path:
    """Write `source` to out_path as a GGUF of `qtype` (see QTYPES); returns out_path.

    keep_unquantized: for quantized types, also keep the lossless GGUF written before quantization at this path.
    quantize_progress: hears llama.cpp's quantization as bytes written (quantize_gguf's `progress`).
    """
    qtype = qtype.lower()
    if qtype not in QTYPES:
        raise LLMError(f"unknown GGUF type {qtype!r}; use one of {', '.join(QTYPES)}")
    out = Path(out_path)
    if out.is_dir():
        raise LLMError(f"{out} is a folder; pass the GGUF file to write, e.g. {out / 'llm-' }{qtype}.gguf")
    out.parent.mkdir(parents=True, exist_ok=True)
    if "direct" not in QTYPES[qtype]:

        import_llama_cpp()  # fail before writing gigabytes
    kind = _direct_type(qtype, {dt for _, dt in source.infos.values() if dt.is_floating_point})
    need = estimate_bytes(source, kind.lower()) + (0 if "direct" in QTYPES[qtype] else estimate_bytes(source, qtype))
    free = shutil.disk_usage(out.parent).free
    if free < need + 64 * 2**20:
        raise LLMError(f"not enough disk space in {out.parent}: writing the {qtype} GGUF needs about "
                       f"{need / 1e9:.1f} GB, {free / 1e9:.1f} GB are free")
    tmp_direct = out.parent / f".{out.name}.{kind.lower()}.tmp-{os.getpid()}"
    tmp_final = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        if "direct" in QTYPES[qtype]:
            write_gguf(source, tmp_final, kind, progress)
        else:
            write_gguf(source, tmp_direct, kind, progress)
            quantize_gguf(tmp_direct, tmp_final, qtype, threads=threads, verbose=verbose,
                          progress=quantize_progress, expected_bytes=estimate_bytes(source, qtype))
            if keep_unquantized is not None:
                os.replace(tmp_direct, keep_unquantized)
        os.replace(tmp_final, out)
    finally:
        for tmp in (tmp_direct, tmp_final):
            tmp.unlink(missing_ok=True)
    return out


def convert_checkpoint_to_gguf(checkpoint_dir: str | Path, out_path: str | Path, qtype: str = "f16", *,
                               console: Console = NULL, threads: int | None = None,
                               keep_unquantized: str | Path | None = None, verbose: bool = False) -> Path:
    """`mova-export gguf CHECKPOINT --out FILE --type TYPE`: the checkpoint's LLM as one GGUF file, with a
    progress bar over the tensors written (in percent of the bytes) and the llama.cpp quantization."""
    source = source_from_checkpoint(checkpoint_dir)
    quantized = "direct" not in QTYPES[qtype.lower()] if qtype.lower() in QTYPES else False
    # steps 0..100: the lossless file by bytes; then 100..120: llama.cpp's output against its estimated size
    with console.task(f"gguf {qtype}", total=120 if quantized else 100) as steps:
        def to(step: int, what: str) -> None:
            if steps.done >= step:   # no new step, but a line in the log: the quantization can take many minutes
                console.line(f"gguf {qtype}: {what}")
            while steps.done < step:     # one line for a jump of many steps
                steps.advance(what if steps.done + 1 == step else "")

        def written(done: int, total: int, what: str) -> None:
            to(100 if not total else int(100 * done / total), what)

        def quantizing(done: int, total: int, what: str) -> None:
            to(100 + (20 if done == total else min(19, int(20 * done / max(total, 1)))), what)

        return gguf_from_source(source, out_path, qtype, progress=written, threads=threads,
                                keep_unquantized=keep_unquantized, verbose=verbose, quantize_progress=quantizing)


gguf_from_checkpoint = convert_checkpoint_to_gguf  # the style guide's <Output>From<Input> name

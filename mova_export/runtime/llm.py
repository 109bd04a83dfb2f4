"""MoVA's LLM passes on two backends with the same operations: llama.cpp (GGUF) and transformers (the reference).

Both take the prompt ids as `tokenize_with_image` makes them (one IMAGE_TOKEN_INDEX = -200 where `<image>` was)
plus the image embeddings [N, H] from the MoV-Adapter (N = 144 for the routing pass, 576 for the answer pass),
splice the embeddings in at the marker, prefill, and decode greedily until a stop id or max_new_tokens.
Generated ids never include the stop id.

* `LlamaCppLLM`: llama-cpp-python over a GGUF. The prompt is evaluated with `llama_decode` on batches made by
  `llama_batch_init` (token batches for text, `embd` batches for the image), in chunks of n_batch; the Llama
  object's n_tokens / input_ids are kept in step (image positions hold IMAGE_TOKEN_INDEX) so its own eval() could
  continue. Every generate() / logits_for() starts from an empty KV cache, so the routing pass and the answer
  pass never share state.
* `hf_generate` / `hf_generate_stream`, `hf_logits`, `hf_inputs_embeds`: the same on a transformers
  LlamaForCausalLM (inputs_embeds), for the PyTorch reference pipeline and the parity tests.
"""
from __future__ import annotations

import codecs
import ctypes
import logging
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..core.errors import LLMError
from ..core.prompts import IMAGE_TOKEN_INDEX, STOP_TOKEN, tokenize_with_image

GGML_TYPE_F32 = 0  # ggml_type for an F32 KV cache (type_k / type_v)
_LOGGER = logging.getLogger("llama-cpp-python")
# ggml_log_level as ggml.h 0.3.36 defines it. llama-cpp-python 0.3.36's own callback still maps the older enum
# (INFO=1 .. ERROR=3), which shows warnings at error level and hides errors; ours replaces it.
_GGML_LEVELS = {0: logging.CRITICAL, 1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
_LOG_STATE = {"callback": None, "last": logging.DEBUG}


def import_llama_cpp() -> Any:
    """llama_cpp, imported on first use, with a log callback that honours the `llama-cpp-python` logger's level
    (errors only unless a level was chosen; Llama(verbose=True) sets DEBUG)."""
    try:
        import llama_cpp
        import llama_cpp._logger  # noqa: F401 - installs its callback first, so ours below wins
    except ImportError as exc:
        raise LLMError(f"llama-cpp-python is not importable ({exc}); install it with `pip install "
                       "'mova-export[llm]'` (compiles llama.cpp, ~5-7 min on 2 cores)") from None
    if _LOG_STATE["callback"] is None:
        @llama_cpp.llama_log_callback
        def callback(level: int, text: bytes, user_data: Any) -> None:
            mapped = _GGML_LEVELS.get(level, _LOG_STATE["last"])  # 5 = continuation of the previous line
            _LOG_STATE["last"] = mapped
            if _LOGGER.isEnabledFor(mapped):
                print(text.decode("utf-8", errors="replace"), end="", flush=True, file=sys.stderr)

        _LOG_STATE["callback"] = callback  # keep a reference: llama.cpp holds only the C pointer
        llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
        if _LOGGER.level == logging.NOTSET:
            _LOGGER.setLevel(logging.ERROR)
    return llama_cpp


@contextmanager
def llama_cpp_log(verbose: bool) -> Iterator[None]:
    """llama.cpp's whole log inside the block when verbose; otherwise leave the level as it is."""
    level = _LOGGER.level
    if verbose:
        _LOGGER.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        _LOGGER.setLevel(level)


def as_embeddings(image_embeddings: Any, width: int, where: str) -> np.ndarray:
    """[N, width] float32 C-contiguous from a numpy array or torch tensor ([1, N, width] is accepted too)."""
    if hasattr(image_embeddings, "detach"):
        image_embeddings = image_embeddings.detach().float().cpu().numpy()
    arr = np.asarray(image_embeddings)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2 or arr.shape[1] != width or arr.shape[0] == 0:
        raise LLMError(f"{where}: image embeddings have shape {list(arr.shape)}, the LLM needs [N, {width}] "
                       "(N image tokens of the LLM's hidden size); pass the MoV-Adapter output of this checkpoint")
    if not np.issubdtype(arr.dtype, np.floating):
        raise LLMError(f"{where}: image embeddings are {arr.dtype}, expected a float array")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise LLMError(f"{where}: image embeddings contain NaN or inf")
    return arr


def split_at_marker(ids: Sequence[int], has_embeddings: bool, where: str) -> tuple[list[int], list[int] | None]:
    """(ids before the image, ids after it) or (ids, None) when the prompt has no image marker."""
    ids = [int(i) for i in ids]
    marks = [i for i, t in enumerate(ids) if t == IMAGE_TOKEN_INDEX]
    if len(marks) > 1:
        raise LLMError(f"{where}: the prompt has {len(marks)} image markers ({IMAGE_TOKEN_INDEX}); MoVA passes one image")
    if marks and not has_embeddings:
        raise LLMError(f"{where}: the prompt has an image marker ({IMAGE_TOKEN_INDEX}) but no image embeddings were given")
    if not marks:
        if has_embeddings:
            raise LLMError(f"{where}: image embeddings were given but the prompt has no {IMAGE_TOKEN_INDEX} marker; "
                           "build it with prompts.tokenize_with_image")
        return ids, None
    return ids[:marks[0]], ids[marks[0] + 1:]


# ---- llama.cpp ---------------------------------------------------------------------------------------------------------
class LlamaCppLLM:
    """A GGUF LLM in llama.cpp with image-embedding injection and greedy streaming generation."""

    def __init__(self, gguf_path: str | Path, *, n_ctx: int = 4096, n_batch: int = 512, n_gpu_layers: int = 0,
                 n_threads: int | None = None, f32_kv: bool = False, flash_attn: bool = False,
                 verbose: bool = False):
        self.path = Path(gguf_path)
        if not self.path.is_file():
            raise LLMError(f"GGUF file {self.path} not found; make it with `mova-export gguf CHECKPOINT --out "
                           f"{self.path}`")
        with open(self.path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise LLMError(f"{self.path} is not a GGUF file (bad magic); re-create it with `mova-export gguf`")
        self._lc = import_llama_cpp()
        kwargs: dict[str, Any] = dict(model_path=str(self.path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                                      n_gpu_layers=n_gpu_layers, n_threads=n_threads, n_threads_batch=n_threads,
                                      flash_attn=flash_attn, verbose=verbose)
        if f32_kv:
            kwargs.update(type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)
        try:
            self.llama = self._lc.Llama(**kwargs)  # sets llama-cpp-python's log level from verbose
        except (ValueError, RuntimeError, OSError) as exc:
            raise LLMError(f"llama.cpp cannot load {self.path} ({exc}); the file is truncated, corrupt or not a "
                           "llama GGUF: re-create it with `mova-export gguf`") from None
        self.f32_kv = f32_kv
        self.n_batch = int(n_batch)
        self.n_embd = int(self.llama.n_embd())
        self.n_vocab = int(self.llama.n_vocab())
        self.n_ctx = int(self.llama.n_ctx())
        self._vocab = self._lc.llama_model_get_vocab(self.llama.model)
        self._tok_batch = self._lc.llama_batch_init(self.n_batch, 0, 1)
        self._emb_batch = self._lc.llama_batch_init(self.n_batch, self.n_embd, 1)
        self.bos_id = int(self._lc.llama_vocab_bos(self._vocab))
        eot = self.tokenize(STOP_TOKEN, add_bos=False)
        stops = {int(self._lc.llama_vocab_eos(self._vocab))}
        if len(eot) == 1:
            stops.add(eot[0])
        self.stop_ids: tuple[int, ...] = tuple(sorted(i for i in stops if i >= 0))

    # ---- vocabulary ----------------------------------------------------------------------------------------------
    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        """Like HF `tokenizer(text).input_ids`: BOS first (add_bos), special tokens such as <|eot_id|> parsed."""
        return list(self.llama.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special))

    def encode_prompt(self, prompt: str) -> list[int]:
        """Upstream tokenizer_image_token with the GGUF vocabulary: `<image>` becomes IMAGE_TOKEN_INDEX."""
        return tokenize_with_image(prompt, self.tokenize, self.bos_id)

    def token_bytes(self, token: int) -> bytes:
        """The raw bytes of one token (control tokens give b"")."""
        buf = ctypes.create_string_buffer(64)
        n = self._lc.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._lc.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    def detokenize(self, ids: Sequence[int]) -> str:
        return b"".join(self.token_bytes(int(i)) for i in ids).decode("utf-8", errors="replace")

    # ---- state -----------------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the KV cache: the next prompt starts at position 0 with nothing cached."""
        mem = self._lc.llama_get_memory(self.llama.ctx)
        if mem is not None:
            self._lc.llama_memory_clear(mem, True)
        self.llama.n_tokens = 0

    def _check_prompt(self, ids: Sequence[int], image_embeddings: Any, extra: int, where: str
                      ) -> list[tuple[str, Any]]:
        before, after = split_at_marker(ids, image_embeddings is not None, where)
        segments: list[tuple[str, Any]] = [("tokens", before)]
        if after is not None:
            segments += [("embd", as_embeddings(image_embeddings, self.n_embd, where)), ("tokens", after)]
        segments = [(kind, data) for kind, data in segments if len(data)]
        text = [t for kind, data in segments if kind == "tokens" for t in data]
        bad = [t for t in text if not 0 <= t < self.n_vocab]
        if bad:
            raise LLMError(f"{where}: token id(s) {bad[:3]} are outside the GGUF vocabulary (0..{self.n_vocab - 1}); "
                           "the prompt was tokenized with another tokenizer")
        n = sum(len(data) for _, data in segments)
        if n == 0:
            raise LLMError(f"{where}: the prompt is empty")
        if n + extra > self.n_ctx:
            raise LLMError(f"{where}: prompt ({n} positions, image tokens included) + {extra} new tokens exceeds the "
                           f"context of {self.n_ctx}; raise n_ctx (the GGUF supports up to "
                           f"{self.llama.metadata.get('llama.context_length', '?')}) or lower max_new_tokens")
        return segments

    def _eval(self, segments: list[tuple[str, Any]], all_logits: bool) -> list[np.ndarray]:
        """Evaluate the segments after the current position; logits of every position, or of the last one."""
        lc, llama = self._lc, self.llama
        total = sum(len(d) for _, d in segments)
        out: list[np.ndarray] = []
        done = 0
        for kind, data in segments:
            batch = self._tok_batch if kind == "tokens" else self._emb_batch
            for start in range(0, len(data), self.n_batch):
                chunk = data[start:start + self.n_batch]
                n = len(chunk)
                pos0 = llama.n_tokens
                if kind == "tokens":
                    for i, t in enumerate(chunk):
                        batch.token[i] = int(t)
                else:
                    ctypes.memmove(batch.embd, chunk.ctypes.data, chunk.nbytes)
                flags = [all_logits or done + i == total - 1 for i in range(n)]
                for i in range(n):
                    batch.pos[i] = pos0 + i
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = 0
                    batch.logits[i] = flags[i]
                batch.n_tokens = n
                rc = lc.llama_decode(llama.ctx, batch)
                if rc != 0:
                    raise LLMError(f"llama_decode failed with code {rc} at position {pos0} (n_ctx {self.n_ctx}); "
                                   "the prompt may not fit the KV cache")
                for i in range(n):
                    if flags[i]:
                        ptr = lc.llama_get_logits_ith(llama.ctx, i)
                        out.append(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy())
                ids = chunk if kind == "tokens" else [IMAGE_TOKEN_INDEX] * n
                llama.input_ids[pos0:pos0 + n] = ids
                llama.n_tokens = pos0 + n
                done += n
        return out

    # ---- operations ------------------------------------------------------------------------------------------------
    def logits_for(self, ids: Sequence[int], image_embeddings: Any = None) -> np.ndarray:
        """Logits [positions, n_vocab] of a fresh prefill (image embeddings spliced in at the marker)."""
        segments = self._check_prompt(ids, image_embeddings, 0, "logits_for")
        self.reset()
        return np.stack(self._eval(segments, all_logits=True))

    def generate(self, ids: Sequence[int], image_embeddings: Any = None, max_new_tokens: int = 64,
                 stop_ids: Sequence[int] | None = None, sampling: Any = None) -> Iterator[tuple[int, str]]:
        """Greedy decoding from a fresh KV cache: yields (token id, text piece) until a stop id or max_new_tokens.
        sampling (two_pass.Sampling): llama.cpp's own sampler chain (top-p, temperature, seeded draw) instead.

        Pieces are decoded incrementally, so a multi-byte character split over tokens appears once complete.
        Checks (marker vs embeddings, width, context length) run here, before the iterator is returned.
        """
        if max_new_tokens < 1:
            raise LLMError(f"max_new_tokens={max_new_tokens}; ask for at least one token")
        segments = self._check_prompt(ids, image_embeddings, max_new_tokens, "generate")
        stops = set(self.stop_ids if stop_ids is None else (int(s) for s in stop_ids))
        return self._generate(segments, max_new_tokens, stops, sampling)

    def _generate(self, segments: list[tuple[str, Any]], max_new_tokens: int, stops: set[int], sampling: Any
                  ) -> Iterator[tuple[int, str]]:
        self.reset()
        logits = self._eval(segments, all_logits=False)[-1]
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        sampled = sampling is not None and sampling.temperature > 0
        chain = self._sampler(sampling) if sampled else None
        bias = None
        if sampling is not None and sampling.logit_bias and not sampled:
            bias = np.zeros(self.n_vocab, np.float32)
            for token_id, value in sampling.logit_bias:
                bias[token_id] = value
        try:
            for step in range(max_new_tokens):
                if chain is not None:
                    token = int(self._lc.llama_sampler_sample(chain, self.llama.ctx, -1))   # the last logits
                else:
                    token = int(np.argmax(logits if bias is None else logits + bias))
                if token in stops:
                    break
                yield token, decoder.decode(self.token_bytes(token))
                if step + 1 < max_new_tokens:
                    logits = self._eval([("tokens", [token])], all_logits=False)[-1]
        finally:
            if chain is not None:
                self._lc.llama_sampler_free(chain)

    def _sampler(self, sampling: Any) -> Any:
        """llama.cpp's sampler chain for one request: logit bias, top-p (where < 1), temperature, a seeded draw."""
        lc = self._lc
        chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        if sampling.logit_bias:
            biases = (lc.llama_logit_bias * len(sampling.logit_bias))(*sampling.logit_bias)
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_logit_bias(self.n_vocab, len(biases), biases))
        if sampling.top_p < 1.0:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_p(float(sampling.top_p), 1))
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_temp(float(sampling.temperature)))
        seed = lc.LLAMA_DEFAULT_SEED if sampling.seed is None else int(sampling.seed) & 0xFFFFFFFF
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_dist(seed))
        return chain

    def generate_ids(self, ids: Sequence[int], image_embeddings: Any = None, max_new_tokens: int = 64,
                     stop_ids: Sequence[int] | None = None) -> list[int]:
        return [t for t, _ in self.generate(ids, image_embeddings, max_new_tokens, stop_ids)]

    def close(self) -> None:
        if getattr(self, "_tok_batch", None) is not None:
            self._lc.llama_batch_free(self._tok_batch)
            self._lc.llama_batch_free(self._emb_batch)
            self._tok_batch = self._emb_batch = None
        if getattr(self, "llama", None) is not None:
            self.llama.close()
            self.llama = None

    def __enter__(self) -> "LlamaCppLLM":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

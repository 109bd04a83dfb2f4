"""MoVA's answer pass on the LLM: llama.cpp GGUF (Q4_K_M, F16) next to transformers bf16 eager.

Workload: one prompt of 616 positions (40 text tokens of MoVA's answer frame + 576 injected image embeddings, the
MoV-Adapter's output size), prefill, then greedy decode of --decode-tokens tokens with stop ids ignored. Reported
per backend: load time, prefill latency and rate, decode tokens/s (median of --repeats after one warm-up), file
size, and how many leading greedy tokens equal transformers'. Writes results.json and results.md under --out.

On the GPU machine (needs llama-cpp-python built with CUDA: CMAKE_ARGS="-DGGML_CUDA=on" pip install
llama-cpp-python==0.3.36 --no-binary llama-cpp-python; ~40 GB free disk for the full LLM):
    python benchmarks/llm_gguf_vs_hf.py --scale full --device cuda --out bench-llm
CPU smoke test (tiny synthetic LLM, seconds; the numbers say nothing about MoVA-8B):
    python benchmarks/llm_gguf_vs_hf.py --scale tiny --device cpu --decode-tokens 16 --out /tmp/bench-llm
--checkpoint DIR uses an existing MoVA checkpoint instead of writing a synthetic one.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mova_export.core.prompts import chat_prompt, tokenize_with_image
from mova_export.gguf.convert import convert_checkpoint_to_gguf, quantize_gguf
from mova_export.reference.llm import hf_generate_stream
from mova_export.runtime.llm import LlamaCppLLM, import_llama_cpp
from mova_export.source.llama3 import load_llm_tokenizer


def prompt_ids(tokenizer, positions: int, image_tokens: int) -> tuple[list[int], str]:
    """MoVA's answer-pass ids with exactly positions - image_tokens text ids, and how they were fitted.

    The real Llama-3 tokenizer gives ~40 text tokens for "Describe this image in detail."; the question is padded
    word by word to fit. A synthetic tokenizer (few merges) gives more: then ids are cut from inside the system
    text, which changes no shape or cost, only the words.
    """
    want = positions - image_tokens + 1  # + 1: the marker id is replaced by the image tokens
    question = "Describe this image in detail."
    while True:
        ids = tokenize_with_image(chat_prompt(question, routing=False), lambda t: tokenizer(t).input_ids,
                                  tokenizer.bos_token_id)
        if len(ids) == want:
            return ids, "answer frame, question padded" if question.endswith("image") else "answer frame"
        if len(ids) > want:
            break
        question += " image"  # one token per word
    excess = len(ids) - want
    if ids.index(-200) - excess < 8:
        raise SystemExit(f"--positions {positions} leaves too few text positions for MoVA's answer frame")
    return ids[:4] + ids[4 + excess:], f"answer frame with {excess} system-prompt ids cut to fit"


def timed_stream(stream, sync) -> tuple[list[int], float, float]:
    """(ids, seconds to the first token = prefill, seconds for the rest) of a token iterator."""
    start = time.perf_counter()
    ids: list[int] = []
    first = None
    for token in stream:
        sync()
        ids.append(token if isinstance(token, int) else token[0])
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return ids, (first or end) - start, end - (first or end)


def measure(name: str, run, sync, positions: int, decode_tokens: int, repeats: int) -> dict:
    run()  # warm-up (allocations, kernels, caches)
    prefill, decode, ids = [], [], []
    for _ in range(repeats):
        ids, p, d = timed_stream(run(), sync)
        prefill.append(p)
        decode.append(d)
    p, d = statistics.median(prefill), statistics.median(decode)
    print(f"{name}: prefill {p * 1e3:.1f} ms, decode {(len(ids) - 1) / d if d else float('nan'):.1f} tok/s",
          file=sys.stderr)
    return {"backend": name, "prefill_ms": round(p * 1e3, 2), "prefill_tok_s": round(positions / p, 1),
            "decode_tok_s": round((len(ids) - 1) / d, 2) if d else None, "generated": len(ids),
            "repeats": repeats, "ids": ids}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, help="existing MoVA checkpoint (default: write a synthetic one)")
    ap.add_argument("--scale", choices=["tiny", "full"], default="tiny", help="synthetic checkpoint scale")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, required=True, help="folder for results.json / results.md and the GGUFs")
    ap.add_argument("--types", default="q4_k_m,f16", help="GGUF types to time (comma-separated)")
    ap.add_argument("--positions", type=int, default=616, help="prompt positions incl. image tokens")
    ap.add_argument("--image-tokens", type=int, default=576)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp CPU threads")
    ap.add_argument("--flash-attn", action="store_true", help="llama.cpp flash attention")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers bf16 run")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    llama_cpp = import_llama_cpp()
    gpu_offload = bool(llama_cpp.llama_supports_gpu_offload())
    if args.device == "cuda" and not gpu_offload:
        print("warning: this llama-cpp-python build has no GPU offload; llama.cpp runs on the CPU", file=sys.stderr)

    timings: dict[str, float] = {}
    ckpt = args.checkpoint
    if ckpt is None:
        from mova_export.synth import write_synthetic_checkpoint

        ckpt = args.out / f"mova-{args.scale}-llm"
        if not (ckpt / "config.json").exists():
            t = time.perf_counter()
            write_synthetic_checkpoint(ckpt, scale=args.scale, components=["llm"], progress=True)
            timings["synth_s"] = round(time.perf_counter() - t, 1)
    types = [t.strip().lower() for t in args.types.split(",") if t.strip()]
    ggufs: dict[str, Path] = {}
    for qtype in sorted(types, key=lambda q: q not in ("f16", "bf16", "f32")):  # lossless first, quantize from it
        path = args.out / f"llm-{qtype}.gguf"
        if not path.exists():
            t = time.perf_counter()
            lossless = next((ggufs[q] for q in ("f16", "bf16", "f32") if q in ggufs), None)
            if lossless is not None and qtype not in ("f16", "bf16", "f32"):
                quantize_gguf(lossless, path, qtype, threads=args.threads)  # saves a second lossless write
            else:
                convert_checkpoint_to_gguf(ckpt, path, qtype, threads=args.threads)
            timings[f"convert_{qtype}_s"] = round(time.perf_counter() - t, 1)
        ggufs[qtype] = path

    tokenizer = load_llm_tokenizer(ckpt)
    ids, prompt_note = prompt_ids(tokenizer, args.positions, args.image_tokens)
    results = []
    hf_ids = None
    width = None
    if not args.no_hf:
        from mova_export.source.checkpoint import Checkpoint

        t = time.perf_counter()
        model = Checkpoint.open(ckpt).build("llm", dtype=torch.bfloat16)
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation("eager")
        else:
            model.config._attn_implementation = "eager"
        model = model.to(args.device).eval()
        load_s = time.perf_counter() - t
        width = model.config.hidden_size
        emb = (np.random.default_rng(0).standard_normal((args.image_tokens, width)) * 0.02).astype(np.float32)
        sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
        row = measure("transformers bf16 eager", lambda: hf_generate_stream(model, ids, emb, args.decode_tokens, []),
                      sync, args.positions, args.decode_tokens, args.repeats)
        row.update(load_s=round(load_s, 2), file_bytes=None)
        hf_ids = row.pop("ids")
        results.append(row)
        del model
        if args.device == "cuda":
            torch.cuda.empty_cache()
    for qtype, path in ggufs.items():
        t = time.perf_counter()
        llm = LlamaCppLLM(path, n_ctx=args.positions + args.decode_tokens + 8, n_batch=512,
                          n_gpu_layers=-1 if args.device == "cuda" else 0, n_threads=args.threads,
                          flash_attn=args.flash_attn)
        load_s = time.perf_counter() - t
        if width is None:
            width = llm.n_embd
        emb = (np.random.default_rng(0).standard_normal((args.image_tokens, width)) * 0.02).astype(np.float32)
        row = measure(f"llama.cpp {qtype.upper()}",
                      lambda llm=llm, emb=emb: llm.generate(ids, emb, args.decode_tokens, stop_ids=[]),
                      lambda: None, args.positions, args.decode_tokens, args.repeats)
        got = row.pop("ids")
        row.update(load_s=round(load_s, 2), file_bytes=path.stat().st_size)
        if hf_ids is not None:
            row["greedy_prefix_equal_to_hf"] = next((i for i, (a, b) in enumerate(zip(got, hf_ids)) if a != b),
                                                    min(len(got), len(hf_ids)))
        results.append(row)
        llm.close()

    report = {
        "workload": {"positions": args.positions, "image_tokens": args.image_tokens,
                     "text_tokens": args.positions - args.image_tokens, "decode_tokens": args.decode_tokens,
                     "greedy": True, "stop_ids_ignored": True, "prompt": prompt_note},
        "device": args.device, "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "cpu": platform.processor() or platform.machine(), "llama_cpp_gpu_offload": gpu_offload,
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                     "llama_cpp_python": llama_cpp.__version__, "python": platform.python_version()},
        "checkpoint": str(ckpt), "scale": args.scale if args.checkpoint is None else None,
        "timings": timings, "results": results,
    }
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"LLM answer pass: {args.positions} positions ({args.image_tokens} injected image embeddings), "
             f"{args.decode_tokens} greedy tokens, device {report['gpu'] or args.device}"
             f"{'' if args.checkpoint else f', synthetic {args.scale} checkpoint'}", "",
             "| backend | file | load s | prefill ms | prefill tok/s | decode tok/s | greedy = HF |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        size = ("checkpoint" if not r.get("file_bytes") else f"{r['file_bytes'] / 2**30:.2f} GiB"
                if r["file_bytes"] > 2**30 else f"{r['file_bytes'] / 2**20:.1f} MiB")
        lines.append(f"| {r['backend']} | {size} | {r['load_s']} | {r['prefill_ms']} | {r['prefill_tok_s']} | "
                     f"{r['decode_tok_s']} | {r.get('greedy_prefix_equal_to_hf', '-')} |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Latency and accuracy-parity benchmarks of a bundle's runtime against the PyTorch reference, in the same process.

latency_benchmark: per-stage p50/p95 over N requests after warm-up (preprocess, base, text, adapter x2, routing
  generation, each routed expert, LLM prefill, time to first token, decode tokens/s), every expert tower in
  isolation, peak host RSS (getrusage) and GPU memory (when torch sees CUDA); the reference pipeline on the bundle's
  source checkpoint runs the same requests (same routed experts) for a ratio column.
parity_benchmark: over real images and questions, per (backend, precision): routing agreement (same expert set),
  per-graph cosine (base, text, routing tokens, each expert, image tokens), answer exact match and the first
  divergence position of the answer ids. The LLM runs with an F32 KV cache so an f32 GGUF matches exactly.

Both cite the bundle's manifest sha256 and write <kind>.json, <kind>.md and <kind>.png into an output folder.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from .bundle import MANIFEST, load_bundle, sha256_file
from .errors import BundleError, RuntimeInputError

Log = Callable[[str], None]
DEFAULT_IMAGES = ("astronaut", "coffee", "chelsea")
PARITY_IMAGES = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "page")
DEFAULT_QUESTION = "Describe the image."
# runtime stage -> the reference's stage of the same work (experts: the sum of the routed towers; llm_answer:
# prefill + decode)
COMPARED = ("preprocess", "base", "text_encoder", "adapter_routing", "llm_routing", "experts", "adapter_answer",
            "llm_answer", "total")
PARITY_TENSORS = ("base", "text_features", "routing_tokens", "image_tokens")


def _quiet(_: str) -> None:
    pass


# ---- inputs ---------------------------------------------------------------------------------------------------------
def load_images(specs: Sequence[Any] | None, default: Sequence[str] = DEFAULT_IMAGES,
                question: str | None = None) -> list[tuple[str, np.ndarray, str]]:
    """(label, HxWx3 uint8, question) per image: scikit-image sample names (with their sample questions) or paths
    (with `question`, else DEFAULT_QUESTION)."""
    from .preprocess import load_image
    from .reference import SAMPLE_QUESTIONS, sample_images

    out = []
    samples = None
    for spec in (list(specs) if specs else list(default)):
        if isinstance(spec, str) and spec in SAMPLE_QUESTIONS and not Path(spec).exists():
            samples = samples or sample_images()
            out.append((spec, samples[spec], question or SAMPLE_QUESTIONS[spec]))
        elif isinstance(spec, (str, Path)):
            if not Path(spec).is_file():
                raise RuntimeInputError(f"image {spec!r} is neither a file nor a sample name "
                                        f"({', '.join(SAMPLE_QUESTIONS)})")
            out.append((Path(spec).name, load_image(spec), question or DEFAULT_QUESTION))
        else:
            out.append((f"image{len(out)}", load_image(spec), question or DEFAULT_QUESTION))
    return out


def stats(values: Iterable[float]) -> dict[str, float]:
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        return {"n": 0}
    return {"n": int(v.size), "p50": float(np.percentile(v, 50)), "p95": float(np.percentile(v, 95)),
            "mean": float(v.mean()), "min": float(v.min()), "max": float(v.max())}


def _round(obj: Any, nd: int = 3) -> Any:
    if isinstance(obj, float):
        return round(obj, nd)
    if isinstance(obj, dict):
        return {k: _round(v, nd) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_round(v, nd) for v in obj]
    return obj


def machine() -> dict[str, Any]:
    from .bundle import tool_versions

    info: dict[str, Any] = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                            "cpus": os.cpu_count(), "tools": tool_versions()}
    gpu = _gpu_name()
    if gpu:
        info["gpu"] = gpu
    return info


def _gpu_name() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def gpu_memory_mib() -> dict[str, float] | None:
    """Device-wide used memory (covers ONNX Runtime, TensorRT and llama.cpp too) and torch's peak allocation."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return {"device_used_mib": (total - free) / 2**20, "torch_peak_allocated_mib":
            torch.cuda.max_memory_allocated() / 2**20, "device_total_mib": total / 2**20}


def _bundle_info(path: Path) -> dict[str, Any]:
    bundle = load_bundle(path, verify=False)
    m = bundle.manifest
    return {"path": str(path), "manifest_sha256": sha256_file(path / MANIFEST),
            "scale": m["config"].get("mova_export", {}).get("scale"), "llm_qtype": (m.get("llm") or {}).get("qtype"),
            "runtime": m.get("runtime"), "source_checkpoint": (m.get("source_checkpoint") or {}).get("path")}


def _reference(bundle_path: Path, log: Log) -> Any:
    """The ReferencePipeline on the bundle's source checkpoint, or None (with a log line) when it is not here."""
    from .reference import ReferencePipeline

    source = (load_bundle(bundle_path, verify=False).manifest.get("source_checkpoint") or {}).get("path")
    if not source or not Path(source, "config.json").is_file():
        log(f"reference skipped: the bundle's source checkpoint {source} is not on this machine")
        return None
    return ReferencePipeline(source)


# ---- latency --------------------------------------------------------------------------------------------------------
def latency_benchmark(bundle: str | Path, *, runs: int = 5, warmup: int = 1, images: Sequence[Any] | None = None,
                      question: str | None = None, max_new_tokens: int = 16, device: str = "cpu",
                      backend: str = "auto", precision: str | Mapping[str, str] | None = None,
                      experts: Sequence[str] | None = None, reference: bool = True, towers: bool = True,
                      llm_threads: int | None = None, out_dir: str | Path | None = None,
                      log: Log = _quiet) -> dict[str, Any]:
    """Run the latency benchmark; returns the result dict and writes latency.{json,md,png} when out_dir is given."""
    from .runtime import MoVARuntime, peak_rss_mib

    if runs < 1 or warmup < 0:
        raise RuntimeInputError(f"runs={runs}, warmup={warmup}; pass runs >= 1 and warmup >= 0")
    bundle = Path(bundle)
    frames = load_images(images, question=question)
    result: dict[str, Any] = {"kind": "latency", "bundle": _bundle_info(bundle), "machine": machine(),
                              "settings": {"runs": runs, "warmup": warmup, "images": [f[0] for f in frames],
                                           "max_new_tokens": max_new_tokens, "device": device, "backend": backend,
                                           "precision": precision, "forced_experts": experts}}
    rss_before = peak_rss_mib()
    start = time.perf_counter()
    with MoVARuntime.from_bundle(bundle, device=device, backend=backend, precision=precision,
                                 llm_threads=llm_threads) as rt:
        load_s = time.perf_counter() - start
        log(f"runtime loaded in {load_s:.1f} s; warm-up")
        rt.warmup()
        for i in range(warmup):
            label, rgb, q = frames[i % len(frames)]
            rt.ask(rgb, q, max_new_tokens, experts=experts)
        per_stage: dict[str, list[float]] = {}
        tps: list[float] = []
        answers = []
        for i in range(runs):
            label, rgb, q = frames[i % len(frames)]
            ans = rt.ask(rgb, q, max_new_tokens, experts=experts)
            t = dict(ans.timings_ms)
            routed = [v for k, v in t.items() if k.startswith("expert_")]
            if routed:
                t["experts"] = sum(routed)
            t["llm_answer"] = t["llm_prefill"] + t["llm_decode"]
            for k, v in t.items():
                if not k.startswith("load_"):
                    per_stage.setdefault(k, []).append(v)
            if ans.tokens_per_s > 0:
                tps.append(ans.tokens_per_s)
            answers.append({"image": label, "experts": ans.experts, "tokens": len(ans.token_ids),
                            "total_ms": t["total"]})
            log(f"run {i + 1}/{runs} {label}: experts {','.join(ans.experts) or 'none'}, {t['total']:.0f} ms")
        result["runtime"] = rt.describe()
        result["load_s"] = load_s
        result["stages"] = {k: stats(v) for k, v in per_stage.items()}
        result["decode_tokens_per_s"] = stats(tps)
        result["requests"] = answers
        if towers:
            result["towers"] = _tower_latency(rt, frames[0][1], runs)
        result["memory"] = {"peak_rss_mib_before_load": rss_before, "peak_rss_mib_runtime": peak_rss_mib(),
                            "gpu": gpu_memory_mib()}
    if reference:
        result["reference"] = _reference_latency(bundle, frames, runs, warmup, max_new_tokens,
                                                 [a["experts"] for a in answers], towers, log)
        result["memory"]["peak_rss_mib_after_reference"] = peak_rss_mib()
        if result["reference"]:
            result["comparison"] = _comparison(result["stages"], result["reference"]["stages"])
    result = _round(result)
    if out_dir is not None:
        result["files"] = write_latency_report(result, Path(out_dir))
    return result


def _tower_latency(rt: Any, rgb: np.ndarray, runs: int) -> dict[str, dict[str, float]]:
    """Every expert graph on its own (the routed set of a request may leave some out), after one warm run."""
    from .preprocess import preprocess

    vision = rt.vision
    inputs = preprocess(rgb, vision.cfg)
    out = {}
    with rt._lock:
        for name in vision.experts:
            feed = vision._tower_feed(name, inputs)
            runner = vision.runner(name)
            runner.infer(feed)
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                runner.infer(feed)
                times.append((time.perf_counter() - t0) * 1e3)
            out[name] = stats(times)
    return out


def _reference_latency(bundle: Path, frames: list, runs: int, warmup: int, max_new_tokens: int,
                       routed: list[list[str]], towers: bool, log: Log) -> dict[str, Any] | None:
    import torch

    ref = _reference(bundle, log)
    if ref is None:
        return None
    log("reference (PyTorch eager, fp32) warm-up")
    for i in range(max(1, warmup)):
        label, rgb, q = frames[i % len(frames)]
        ref.run(rgb, q, max_new_tokens=max_new_tokens, force_experts=routed[i % len(routed)])
    per_stage: dict[str, list[float]] = {}
    for i in range(runs):
        label, rgb, q = frames[i % len(frames)]
        t0 = time.perf_counter()
        res = ref.run(rgb, q, max_new_tokens=max_new_tokens, force_experts=routed[i])  # same experts as the runtime
        t = dict(res.timings_ms, total=(time.perf_counter() - t0) * 1e3)
        for k, v in t.items():
            per_stage.setdefault(k, []).append(v)
        log(f"reference run {i + 1}/{runs} {label}: {t['total']:.0f} ms")
    out: dict[str, Any] = {"pipeline": "ReferencePipeline (PyTorch eager, fp32, transformers LLM)",
                           "stages": {k: stats(v) for k, v in per_stage.items()}}
    if towers:
        from .config import EXPERTS
        from .preprocess import preprocess
        from .preprocess import tower_inputs

        inputs = preprocess(frames[0][1], ref.cfg)
        tower_stats = {}
        with torch.inference_mode():
            for expert in EXPERTS:
                name = f"expert_{expert.letter}"
                args = [torch.from_numpy(a) for a in tower_inputs(inputs, expert.input_kind)]
                module = ref.module(name)
                module(*args)
                times = []
                for _ in range(runs):
                    t0 = time.perf_counter()
                    module(*args)
                    times.append((time.perf_counter() - t0) * 1e3)
                tower_stats[name] = stats(times)
                ref._modules.pop(name, None)  # bounded memory: one expert module at a time
        out["towers"] = tower_stats
    return out


def _comparison(runtime: Mapping[str, Any], reference: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for stage in COMPARED:
        a, b = runtime.get(stage, {}), reference.get(stage, {})
        if a.get("n") and b.get("n"):
            rows.append({"stage": stage, "runtime_p50_ms": a["p50"], "reference_p50_ms": b["p50"],
                         "speedup": b["p50"] / a["p50"] if a["p50"] > 0 else None})
    return rows


def _stage_order(stages: Iterable[str]) -> list[str]:
    from .runtime import STAGES

    order = list(STAGES[:-1]) + ["experts", "llm_answer", "total"]
    known = [s for s in order if s in stages]
    return known + sorted(s for s in stages if s not in known)


def latency_markdown(result: Mapping[str, Any]) -> str:
    b, s = result["bundle"], result["settings"]
    ref = result.get("reference") or {}
    rstages = ref.get("stages", {})
    lines = [f"# Latency: {b['path']}", "",
             f"manifest sha256 `{b['manifest_sha256']}`; {b.get('scale')} scale; LLM {b.get('llm_qtype')}; "
             f"device {s['device']}, backend {s['backend']}; {s['runs']} runs after {s['warmup']} warm-up "
             f"(+ the runtime's warmup()); images {', '.join(s['images'])}; max_new_tokens {s['max_new_tokens']}",
             f"machine: {result['machine']['platform']}, {result['machine']['cpus']} CPUs"
             + (f", {result['machine']['gpu']}" if result["machine"].get("gpu") else ""), "",
             "| stage | runtime p50 ms | runtime p95 ms | reference p50 ms | reference p95 ms | speedup (ref/rt) |",
             "|---|---:|---:|---:|---:|---:|"]
    ref_name = {"llm_prefill": None, "llm_decode": None, "time_to_first_token": None}
    for stage in _stage_order(result["stages"]):
        a = result["stages"][stage]
        rname = ref_name.get(stage, stage)
        r = rstages.get(rname, {}) if rname else {}
        speed = f"{r['p50'] / a['p50']:.2f}x" if r.get("n") and a.get("p50") else ""
        lines.append(f"| {stage} | {a['p50']:.2f} | {a['p95']:.2f} | "
                     f"{r['p50']:.2f} | {r['p95']:.2f} | {speed} |" if r.get("n") else
                     f"| {stage} | {a['p50']:.2f} | {a['p95']:.2f} | | | |")
    tps = result.get("decode_tokens_per_s", {})
    if tps.get("n"):
        lines += ["", f"decode: {tps['p50']:.1f} tokens/s (p50), {tps['p95']:.1f} (p95)"]
    if result.get("towers"):
        rt_t = ref.get("towers", {})
        lines += ["", "Every expert in isolation (one warm run, then the same runs):", "",
                  "| tower | runtime p50 ms | runtime p95 ms | reference p50 ms | speedup |", "|---|---:|---:|---:|---:|"]
        for name, a in result["towers"].items():
            r = rt_t.get(name, {})
            lines.append(f"| {name} | {a['p50']:.2f} | {a['p95']:.2f} | "
                         + (f"{r['p50']:.2f} | {r['p50'] / a['p50']:.2f}x |" if r.get("n") and a["p50"] else "| |"))
    mem = result.get("memory", {})
    lines += ["", f"peak host RSS: {mem.get('peak_rss_mib_runtime', 0):.0f} MiB with the runtime loaded"
              + (f", {mem['peak_rss_mib_after_reference']:.0f} MiB after the reference"
                 if "peak_rss_mib_after_reference" in mem else "")]
    if mem.get("gpu"):
        lines.append(f"GPU memory used (device-wide): {mem['gpu']['device_used_mib']:.0f} MiB")
    return "\n".join(lines) + "\n"


def write_latency_report(result: dict[str, Any], out_dir: Path) -> dict[str, str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"json": str(out_dir / "latency.json"), "markdown": str(out_dir / "latency.md"),
             "png": str(out_dir / "latency.png")}
    ref = (result.get("reference") or {}).get("stages", {})
    stages = [s for s in _stage_order(result["stages"]) if s != "total"]
    _bar_chart(Path(files["png"]), stages,
               {"runtime": [result["stages"][s] for s in stages], "reference": [ref.get(s, {}) for s in stages]},
               title=f"MoVA latency per stage (p50, p95 whisker), bundle {result['bundle']['manifest_sha256'][:12]}",
               xlabel="ms (log scale)")
    Path(files["markdown"]).write_text(latency_markdown(result))
    Path(files["json"]).write_text(json.dumps({**result, "files": files}, indent=2) + "\n")
    return files


def _bar_chart(path: Path, labels: list[str], series: Mapping[str, list[Mapping[str, float]]], title: str,
               xlabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 0.45 * len(labels) + 1.5))
    y = np.arange(len(labels))
    height = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        p50 = [v["p50"] if v.get("n") else float("nan") for v in values]  # NaN: no bar (stage not measured)
        p95 = [v["p95"] if v.get("n") else float("nan") for v in values]
        err = [max(0.0, b - a) if a == a else 0.0 for a, b in zip(p50, p95)]
        ax.barh(y + i * height, p50, height, xerr=[np.zeros(len(err)), err], label=name, capsize=2)
    ax.set_yticks(y + height * (len(series) - 1) / 2, labels)
    ax.invert_yaxis()
    if any(v.get("p50", 0) > 0 for vals in series.values() for v in vals):
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- parity ---------------------------------------------------------------------------------------------------------
def parse_config(text: str) -> dict[str, Any]:
    """"backend[:precision]" (precision: fp32/fp16/int8/fp8, or "bundle" for the manifest's per-component choice)."""
    from .vision import BACKENDS

    backend, _, precision = text.partition(":")
    if backend not in BACKENDS:
        raise RuntimeInputError(f"parity config {text!r}: unknown backend {backend!r}; use {', '.join(BACKENDS)}")
    return {"backend": backend, "precision": None if precision in ("", "bundle") else precision}


def default_configs(bundle: Path) -> list[dict[str, Any]]:
    """fp32 in ONNX Runtime, plus the bundle's own precision plan when it has one that is not all fp32."""
    configs = [{"backend": "onnxruntime", "precision": "fp32"}]
    plan = ((load_bundle(bundle, verify=False).manifest.get("runtime") or {}).get("precision") or {})
    if any(p != "fp32" for p in plan.values()):
        configs.append({"backend": "auto", "precision": None})
    return configs


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first differing id (the shorter length when one is a prefix of the other); None when equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def parity_benchmark(bundle: str | Path, *, images: Sequence[Any] | None = None, question: str | None = None,
                     configs: Sequence[Mapping[str, Any]] | None = None, max_new_tokens: int = 16,
                     device: str = "cpu", llm_threads: int | None = None, experts: Sequence[str] | None = None,
                     out_dir: str | Path | None = None, log: Log = _quiet) -> dict[str, Any]:
    """Run the parity benchmark; returns the result dict and writes parity.{json,md,png} when out_dir is given.
    experts: force this routing on both sides (the expert graphs then get cosines even where the LLM routes none;
    routing agreement is then about the routing generation's text only)."""
    from .runtime import MoVARuntime
    from .validate import parity

    bundle = Path(bundle)
    frames = load_images(images, default=PARITY_IMAGES, question=question)
    configs = [dict(c) for c in (configs or default_configs(bundle))]
    ref = _reference(bundle, log)
    if ref is None:
        raise BundleError(f"the parity benchmark needs the bundle's source checkpoint (for the PyTorch reference); "
                          f"{bundle} points at one that is not on this machine")
    references = []
    for label, rgb, q in frames:
        res = ref.run(rgb, q, max_new_tokens=max_new_tokens, keep_tensors=True, force_experts=experts)
        references.append(res)
        log(f"reference {label}: experts {','.join(res.experts) or 'none'}, answer {res.answer!r}")
    del ref
    result: dict[str, Any] = {"kind": "parity", "bundle": _bundle_info(bundle), "machine": machine(),
                              "settings": {"images": [f[0] for f in frames], "max_new_tokens": max_new_tokens,
                                           "device": device, "llm_f32_kv": True, "forced_experts": experts},
                              "configs": []}
    for i, config in enumerate(configs):
        with MoVARuntime.from_bundle(bundle, device=device, backend=config["backend"],
                                     precision=config["precision"], llm_threads=llm_threads, llm_f32_kv=True,
                                     verify=i == 0) as rt:
            described = rt.describe()
            rows = []
            for (label, rgb, q), r in zip(frames, references):
                ans = rt.ask(rgb, q, max_new_tokens, keep_tensors=True, experts=experts)
                forced = None
                if ans.experts != r.experts:  # compare the graphs on the reference's routing too
                    forced = rt.ask(rgb, q, max_new_tokens, experts=r.experts, keep_tensors=True)
                graphs = forced or ans
                cos = {}
                for key, ref_t in r.tensors.items():
                    if key in graphs.tensors:
                        fig = parity(ref_t, graphs.tensors[key])
                        cos[key] = {"cosine": fig.cosine, "rel_l2": fig.rel_l2, "max_abs": fig.max_abs}
                row = {"image": label, "question": q, "reference_experts": r.experts, "runtime_experts": ans.experts,
                       "routing_agree": set(ans.experts) == set(r.experts),
                       "routing_ids_equal": ans.routing_ids == r.routing_ids,
                       "answer_exact": ans.token_ids == r.answer_ids and ans.text == r.answer,
                       "first_divergence": first_divergence(r.answer_ids, ans.token_ids),
                       "answer_tokens": [len(r.answer_ids), len(ans.token_ids)],
                       "reference_answer": r.answer, "runtime_answer": ans.text,
                       "tensors_on_reference_routing": forced is not None, "cosine": cos}
                rows.append(row)
                log(f"[{config['backend']}:{config['precision'] or 'bundle'}] {label}: routing "
                    f"{'agrees' if row['routing_agree'] else 'DIFFERS'}, answer "
                    f"{'equal' if row['answer_exact'] else 'diverges at ' + str(row['first_divergence'])}")
        result["configs"].append({"backend": config["backend"], "precision": config["precision"] or "bundle",
                                  "components": {n: f"{c['backend']}:{c['precision']}"
                                                 for n, c in described["components"].items()},
                                  "fallbacks": described["fallbacks"], "llm": described["llm"],
                                  "summary": _parity_summary(rows), "images": rows})
    result = _round(result, 7)
    if out_dir is not None:
        result["files"] = write_parity_report(result, Path(out_dir))
    return result


def _parity_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(rows)
    mins: dict[str, float] = {}
    for row in rows:
        for key, fig in row["cosine"].items():
            mins[key] = min(mins.get(key, 1.0), fig["cosine"])
    divergent = [r["first_divergence"] for r in rows if r["first_divergence"] is not None]
    return {"images": n, "routing_agreement": sum(r["routing_agree"] for r in rows) / n,
            "routing_ids_equal": sum(r["routing_ids_equal"] for r in rows) / n,
            "answer_exact_match": sum(r["answer_exact"] for r in rows) / n,
            "first_divergence_min": min(divergent) if divergent else None,
            "min_cosine": dict(sorted(mins.items(), key=lambda kv: _tensor_order(kv[0])))}


def _tensor_order(key: str) -> tuple[int, str]:
    order = {"base": 0, "text_features": 1, "routing_tokens": 2, "image_tokens": 9}
    return order.get(key, 5), key


def parity_markdown(result: Mapping[str, Any]) -> str:
    b, s = result["bundle"], result["settings"]
    lines = [f"# Accuracy parity: {b['path']}", "",
             f"manifest sha256 `{b['manifest_sha256']}`; LLM {b.get('llm_qtype')} with an F32 KV cache; against "
             f"the PyTorch fp32 reference; images {', '.join(s['images'])}; max_new_tokens {s['max_new_tokens']}", "",
             "| backend:precision | routing agreement | routing ids equal | answer exact match | first divergence "
             "(min) | min cosine per graph |", "|---|---:|---:|---:|---:|---|"]
    for c in result["configs"]:
        sm = c["summary"]
        cos = ", ".join(f"{k} {v:.6f}" for k, v in sm["min_cosine"].items())
        lines.append(f"| {c['backend']}:{c['precision']} | {100 * sm['routing_agreement']:.0f}% | "
                     f"{100 * sm['routing_ids_equal']:.0f}% | {100 * sm['answer_exact_match']:.0f}% | "
                     f"{sm['first_divergence_min'] if sm['first_divergence_min'] is not None else '-'} | {cos} |")
    for c in result["configs"]:
        lines += ["", f"## {c['backend']}:{c['precision']}", "",
                  "| image | reference experts | runtime experts | answer equal | first divergence | image-token cosine |",
                  "|---|---|---|---|---:|---:|"]
        for r in c["images"]:
            it = r["cosine"].get("image_tokens", {}).get("cosine")
            lines.append(f"| {r['image']} | {','.join(r['reference_experts']) or 'none'} | "
                         f"{','.join(r['runtime_experts']) or 'none'} | {'yes' if r['answer_exact'] else 'no'} | "
                         f"{r['first_divergence'] if r['first_divergence'] is not None else '-'} | "
                         f"{'' if it is None else f'{it:.6f}'} |")
    return "\n".join(lines) + "\n"


def write_parity_report(result: dict[str, Any], out_dir: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"json": str(out_dir / "parity.json"), "markdown": str(out_dir / "parity.md"),
             "png": str(out_dir / "parity.png")}
    keys = sorted({k for c in result["configs"] for k in c["summary"]["min_cosine"]}, key=_tensor_order)
    fig, ax = plt.subplots(figsize=(9, 0.4 * len(keys) + 1.5))
    y = np.arange(len(keys))
    height = 0.8 / max(1, len(result["configs"]))
    for i, c in enumerate(result["configs"]):
        gap = [max(1e-9, 1.0 - c["summary"]["min_cosine"].get(k, 1.0)) for k in keys]
        ax.barh(y + i * height, gap, height, label=f"{c['backend']}:{c['precision']}")
    ax.set_yticks(y + height * (len(result["configs"]) - 1) / 2, keys)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("1 - min cosine vs the PyTorch reference (log; smaller is closer)")
    ax.set_title(f"MoVA parity per graph, bundle {result['bundle']['manifest_sha256'][:12]}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(files["png"], dpi=110)
    plt.close(fig)
    Path(files["markdown"]).write_text(parity_markdown(result))
    Path(files["json"]).write_text(json.dumps({**result, "files": files}, indent=2) + "\n")
    return files


__all__ = ["first_divergence", "latency_benchmark", "latency_markdown", "load_images", "parity_benchmark",
           "parity_markdown", "stats"]

"""Latency of a bundle's runtime against the PyTorch reference, in one process and one run.

Per stage p50/p95 over N requests after warm-up (preprocess, base, text, adapter x2, routing generation, each routed
expert, LLM prefill, time to first token, decode tokens/s, total), every expert tower in isolation, peak host RSS
and GPU memory; the reference runs the same requests with the same routed experts for a ratio column. Writes
latency.json, latency.md and latency.png, citing the bundle's manifest sha256. Public APIs only: MoVARuntime,
its vision runners, ReferencePipeline.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..core.errors import RuntimeInputError
from ..runtime import MoVARuntime, RuntimeOptions, peak_rss_mib
from ..runtime.two_pass import STAGES
from ..source.photos import demo_questions
from .common import (
    Log,
    barh,
    bundle_info,
    gpu_memory_mib,
    load_images,
    machine,
    quiet,
    reference_pipeline,
    rounded,
    run_title,
    stats,
    write_figure,
)
from .robot import frame_cache_comparison, overlap_comparison, robot_markdown

# The stages both sides measure the same way (experts: the sum of the routed towers).
COMPARED = ("preprocess", "base", "adapter_routing", "llm_routing", "experts", "text_encoder", "adapter_answer",
            "llm_answer", "total")


def _per_stage(timings: Mapping[str, float]) -> dict[str, float]:
    t = dict(timings)
    t["llm_answer"] = t["llm_prefill"] + t["llm_decode"]
    return t


def latency_benchmark(bundle: str | Path, *, runs: int = 5, warmup: int = 1, images: Sequence[Any] | None = None,  # noqa: PLR0913 (an option each)
                      question: str | None = None, max_new_tokens: int = 16, options: Any = None,
                      experts: Sequence[str] | None = None, reference: bool = True, towers: bool = True,
                      out_dir: str | Path | None = None, log: Log = quiet, robot_loop: bool = False
                      ) -> dict[str, Any]:
    """Run the latency benchmark; returns the result and writes latency.{json,md,png} when out_dir is given.
    options: runtime.RuntimeOptions for the bundle side. Every measured request computes from the pixels (the
    frame cache is dropped before each); robot_loop adds bench/robot.py's cache and overlap comparisons."""

    if runs < 1 or warmup < 0:
        raise RuntimeInputError(f"runs={runs}, warmup={warmup}; pass runs >= 1 and warmup >= 0")
    bundle = Path(bundle)
    options = options or RuntimeOptions()
    frames = load_images(images, demo_questions(), question)
    result: dict[str, Any] = {"kind": "latency", "bundle": bundle_info(bundle), "machine": machine(),
                              "settings": {"runs": runs, "warmup": warmup, "images": [f[0] for f in frames],
                                           "max_new_tokens": max_new_tokens, "device": options.device,
                                           "backend": options.backend, "precision": options.precision,
                                           "forced_experts": experts}}
    rss_before = peak_rss_mib()
    start = time.perf_counter()
    with MoVARuntime.from_bundle(bundle, options) as rt:
        result["load_s"] = time.perf_counter() - start
        log(f"runtime loaded in {result['load_s']:.1f} s; warm-up")
        rt.warmup()
        for i in range(warmup):
            _, rgb, q = frames[i % len(frames)]
            rt.ask(rgb, q, max_new_tokens, experts=experts)
        per_stage: dict[str, list[float]] = {}
        tps: list[float] = []
        requests = []
        for i in range(runs):
            label, rgb, q = frames[i % len(frames)]
            rt.frames.clear()
            ans = rt.ask(rgb, q, max_new_tokens, experts=experts)
            for k, v in _per_stage(ans.timings_ms).items():
                per_stage.setdefault(k, []).append(v)
            if ans.tokens_per_s > 0:
                tps.append(ans.tokens_per_s)
            requests.append({"image": label, "experts": ans.experts, "tokens": len(ans.token_ids),
                             "total_ms": ans.timings_ms["total"]})
            log(f"run {i + 1}/{runs} {label}: experts {','.join(ans.experts) or 'none'}, "
                f"{ans.timings_ms['total']:.0f} ms")
        if robot_loop:
            log("robot loop: three questions per frame with and without the frame cache; overlap on and off")
            result["frame_cache"] = frame_cache_comparison(rt, frames, runs, max_new_tokens, experts)
            result["overlap"] = overlap_comparison(rt, frames, runs, max_new_tokens, experts)
        result["runtime"] = rt.describe()
        result["bundle"]["title"] = run_title(result["bundle"], result["runtime"])
        result["stages"] = {k: stats(v) for k, v in per_stage.items()}
        result["decode_tokens_per_s"] = stats(tps)
        result["requests"] = requests
        if towers:
            result["towers"] = _tower_latency(rt.vision, rt.facts, frames[0][1], runs)
        adapter_feeds = _adapter_feeds(rt.vision, rt.facts, frames[0][1], frames[0][2])
        result["adapter"] = {"bundle": _adapter_latency(rt.vision, adapter_feeds, runs, bundle_side=True)}
        result["memory"] = {"peak_rss_mib_before_load": rss_before, "peak_rss_mib_runtime": peak_rss_mib(),
                            "gpu": gpu_memory_mib()}
    if reference:
        result["reference"] = _reference_latency(bundle, frames, runs, warmup, max_new_tokens,
                                                 [r["experts"] for r in requests], towers, log, adapter_feeds)
        if result["reference"]:
            result["adapter"]["reference"] = result["reference"].pop("adapter")
        result["memory"]["peak_rss_mib_after_reference"] = peak_rss_mib()
        if result["reference"]:
            result["comparison"] = comparison(result["stages"], result["reference"]["stages"])
    result = rounded(result)
    if out_dir is not None:
        result["files"] = write_latency_report(result, Path(out_dir))
    return result


def _tower_latency(vision: Any, facts: Any, rgb: np.ndarray, runs: int) -> dict[str, dict[str, float]]:
    """Every expert graph on its own (a request's routing may leave some out), after one warm run; preprocessing
    is not timed here."""
    out = {}
    for tower in facts.experts:
        arrays = [a for kind in tower.image_inputs for a in vision.preprocess(rgb, kind)]
        vision.expert(tower.component, arrays)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            vision.expert(tower.component, arrays)
            times.append((time.perf_counter() - t0) * 1e3)
        out[tower.component] = stats(times)
    return out


def _adapter_feeds(vision: Any, facts: Any, rgb: np.ndarray, question: str) -> dict[str, Any]:
    """One image's adapter inputs from the bundle's graphs: base, text feature and the first topk experts' features
    (the mask a full answer pass routes)."""
    base = vision.base([a for kind in facts.base.image_inputs for a in vision.preprocess(rgb, kind)])
    k = min(facts.topk_experts, len(facts.experts))
    mask = [1 if j < k else 0 for j in range(len(facts.experts))]
    experts = {j: vision.expert(t.component, [a for kind in t.image_inputs for a in vision.preprocess(rgb, kind)])
               for j, t in enumerate(facts.experts) if mask[j]}
    return {"base": base, "text": vision.text(question), "mask": mask, "experts": experts,
            "routed": facts.routed(mask)}


def _timed(fn: Any, runs: int) -> dict[str, float]:
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return stats(times)


def _adapter_latency(vision: Any, feeds: Mapping[str, Any], runs: int, bundle_side: bool) -> dict[str, Any]:
    """The adapter on its own, same inputs on both sides. Bundle: the routing graph (K = 0), the top-K slot graph
    and, for comparison, the dense seven-branch graph at K = 0 and K = topk (what a dense-only bundle would run).
    Reference: upstream's skipping forward at K = 0 and K = topk."""
    base, text, mask, experts = feeds["base"], feeds["text"], feeds["mask"], feeds["experts"]
    none = [0] * len(mask)
    if not bundle_side:
        return {"k0": _timed(lambda: vision.adapter_routing(base), runs),
                "topk": _timed(lambda: vision.adapter_answer(base, text, mask, experts), runs)}
    out = {"k0_routing": _timed(lambda: vision.adapter_routing(base), runs),
           "topk_slots": _timed(lambda: vision.adapter_answer(base, text, mask, experts, form="slots"), runs),
           "experts": feeds["routed"]}
    if vision.fallback_graph is not None:
        out["k0_dense"] = _timed(lambda: vision.adapter_answer(base, text, none, {}, form="dense"), runs)
        out["topk_dense"] = _timed(lambda: vision.adapter_answer(base, text, mask, experts, form="dense"), runs)
        vision.unload_adapter_fallback()
    return out


def _reference_latency(bundle: Path, frames: list, runs: int, warmup: int, max_new_tokens: int,  # noqa: PLR0913 (an option each)
                       routed: list[list[str]], towers: bool, log: Log,
                       adapter_feeds: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    ref = reference_pipeline(bundle, log)
    if ref is None:
        return None
    log("reference (PyTorch eager, fp32) warm-up")
    for i in range(max(1, warmup)):
        _, rgb, q = frames[i % len(frames)]
        ref.run(rgb, q, max_new_tokens=max_new_tokens, force_experts=routed[i % len(routed)])
    per_stage: dict[str, list[float]] = {}
    for i in range(runs):
        label, rgb, q = frames[i % len(frames)]
        res = ref.run(rgb, q, max_new_tokens=max_new_tokens, force_experts=routed[i])  # the runtime's experts
        for k, v in _per_stage(res.timings_ms).items():
            per_stage.setdefault(k, []).append(v)
        log(f"reference run {i + 1}/{runs} {label}: {res.timings_ms['total']:.0f} ms")
    out: dict[str, Any] = {"pipeline": "ReferencePipeline (PyTorch eager, fp32, transformers LLM)",
                           "stages": {k: stats(v) for k, v in per_stage.items()}}
    if towers:
        out["towers"] = _tower_latency(ref.vision, ref.facts, frames[0][1], runs)
        for tower in ref.facts.experts:
            ref.release(tower.component)     # bounded memory: one expert module at a time
    if adapter_feeds is not None:
        out["adapter"] = _adapter_latency(ref.vision, adapter_feeds, runs, bundle_side=False)
    return out


def comparison(runtime: Mapping[str, Any], reference: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for stage in COMPARED:
        a, b = runtime.get(stage, {}), reference.get(stage, {})
        if a.get("n") and b.get("n"):
            rows.append({"stage": stage, "runtime_p50_ms": a["p50"], "reference_p50_ms": b["p50"],
                         "speedup": b["p50"] / a["p50"] if a["p50"] > 0 else None})
    return rows


def stage_order(stages: Sequence[str]) -> list[str]:
    experts = sorted(s for s in stages if s.startswith("expert_"))
    order = [*STAGES[:5], *experts, *STAGES[5:], "llm_answer"]
    known = [s for s in order if s in stages]
    return known + sorted(s for s in stages if s not in known)


def latency_markdown(result: Mapping[str, Any]) -> str:
    b, s = result["bundle"], result["settings"]
    rstages = (result.get("reference") or {}).get("stages", {})
    lines = [f"# Latency: {b['title']}", "",
             f"`{b['path']}`, manifest sha256 `{b['manifest_sha256']}`; device {s['device']}, backend {s['backend']}; "
             f"{s['runs']} runs after {s['warmup']} warm-up (+ the runtime's warmup()); max_new_tokens "
             f"{s['max_new_tokens']}; images: {'; '.join(s['images'])}",
             f"machine: {result['machine']['platform']}, {result['machine']['cpus']} CPUs"
             + (f", {result['machine']['gpu']}" if result["machine"].get("gpu") else ""), "",
             "| stage | bundle p50 ms | bundle p95 ms | reference p50 ms | reference p95 ms | ratio (ref/bundle) |",
             "|---|---:|---:|---:|---:|---:|"]
    for stage in stage_order(list(result["stages"])):
        a, r = result["stages"][stage], rstages.get(stage, {})
        if r.get("n"):
            ratio = f"{r['p50'] / a['p50']:.2f}x" if a.get("p50") else ""
            lines.append(f"| {stage} | {a['p50']:.2f} | {a['p95']:.2f} | {r['p50']:.2f} | {r['p95']:.2f} | {ratio} |")
        else:
            lines.append(f"| {stage} | {a['p50']:.2f} | {a['p95']:.2f} | | | |")
    tps = result.get("decode_tokens_per_s", {})
    if tps.get("n"):
        lines += ["", f"decode: {tps['p50']:.1f} tokens/s (p50), {tps['p95']:.1f} (p95)"]
    if result.get("towers"):
        rt_t = (result.get("reference") or {}).get("towers", {})
        lines += ["", "Every expert in isolation (one warm run, then the same runs):", "",
                  "| tower | bundle p50 ms | bundle p95 ms | reference p50 ms | ratio |", "|---|---:|---:|---:|---:|"]
        for name, a in result["towers"].items():
            r = rt_t.get(name, {})
            lines.append(f"| {name} | {a['p50']:.2f} | {a['p95']:.2f} | "
                         + (f"{r['p50']:.2f} | {r['p50'] / a['p50']:.2f}x |" if r.get("n") and a["p50"] else "| |"))
    lines += adapter_markdown(result.get("adapter") or {})
    mem = result.get("memory", {})
    lines += ["", f"peak host RSS: {mem.get('peak_rss_mib_runtime', 0):.0f} MiB with the runtime loaded"
              + (f", {mem['peak_rss_mib_after_reference']:.0f} MiB after the reference"
                 if "peak_rss_mib_after_reference" in mem else "")]
    if mem.get("gpu"):
        lines.append(f"GPU memory used (device-wide): {mem['gpu']['device_used_mib']:.0f} MiB")
    lines += robot_markdown(result)
    return "\n".join(lines) + "\n"


def adapter_markdown(adapter: Mapping[str, Any]) -> list[str]:
    """The adapter forms table: K = 0 and K = topk, routing / slot graphs vs the dense graph and the reference."""
    b, r = adapter.get("bundle") or {}, adapter.get("reference") or {}
    if not b:
        return []

    def cell(entry: Mapping[str, Any] | None) -> str:
        return f"{entry['p50']:.2f}" if entry and entry.get("n") else ""

    def ratio(slow: Mapping[str, Any] | None, fast: Mapping[str, Any] | None) -> str:
        ok = slow and fast and slow.get("n") and fast.get("n") and fast["p50"] > 0
        return f"{slow['p50'] / fast['p50']:.2f}x" if ok else ""

    experts = ",".join(b.get("experts", []))
    lines = ["", f"Adapter alone, same inputs (p50 ms; K = {len(b.get('experts', []))}: {experts}):", "",
             "| pass | bundle graph | bundle | dense graph | dense / bundle | reference | reference / bundle |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for label, graph, ours, dense, ref in (("routing, K = 0", "adapter_routing", "k0_routing", "k0_dense", "k0"),
                                           ("answer, K = topk", "adapter_slots", "topk_slots", "topk_dense", "topk")):
        lines.append(f"| {label} | {graph} | {cell(b.get(ours))} | {cell(b.get(dense))} | "
                     f"{ratio(b.get(dense), b.get(ours))} | {cell(r.get(ref))} | {ratio(r.get(ref), b.get(ours))} |")
    return lines


def write_latency_report(result: dict[str, Any], out_dir: Path) -> dict[str, str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"json": str(out_dir / "latency.json"), "markdown": str(out_dir / "latency.md")}
    ref = (result.get("reference") or {}).get("stages", {})
    stages = [s for s in stage_order(list(result["stages"])) if s not in ("llm_prefill", "llm_decode")]
    series = {"bundle": [result["stages"][s]["p50"] for s in stages],
              "PyTorch reference": [ref.get(s, {}).get("p50", float("nan")) for s in stages]}
    errors = {"bundle": [result["stages"][s]["p95"] - result["stages"][s]["p50"] for s in stages],
              "PyTorch reference": [(ref[s]["p95"] - ref[s]["p50"]) if s in ref else 0.0 for s in stages]}
    if not ref:
        series.pop("PyTorch reference")
        errors.pop("PyTorch reference")

    def draw(fig: Any) -> None:
        ax = fig.add_subplot()
        barh(ax, stages, series, "ms per request, p50 with the p95 whisker (log scale)", log=True, errors=errors)
        ax.set_title(f"MoVA latency per stage: {result['bundle']['title']}", fontsize=9)

    if write_figure(out_dir / "latency.png", draw, 0.4 * len(stages) + 1.6):
        files["png"] = str(out_dir / "latency.png")
    Path(files["markdown"]).write_text(latency_markdown(result))
    Path(files["json"]).write_text(json.dumps({**result, "files": files}, indent=2) + "\n")
    return files

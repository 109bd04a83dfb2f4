"""Accuracy parity of a bundle against the PyTorch reference, per configuration (graph precision x GGUF type).

Over real images and questions, per configuration: routing agreement (same expert set), equal-answer rate (token for
token), the first divergence position of the answer ids, per-graph cosine (base, text, routing tokens, each routed
expert, image tokens). The LLM runs with an F32 KV cache, so an f32 GGUF and fp32 graphs reproduce the reference's
answers exactly. Writes parity.json, parity.md and parity.png (agreement and cosine per configuration).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..bundle import load_bundle
from ..core.errors import BundleError, RuntimeInputError
from ..core.tolerance import parity
from ..gguf import BITS_PER_WEIGHT
from ..runtime import MoVARuntime
from ..runtime.vision import BACKENDS
from ..source.photos import demo_questions
from .common import Log, barh, bundle_info, load_images, machine, quiet, reference_pipeline, rounded, write_figure

PARITY_QUESTIONS = 6


@dataclass(frozen=True)
class ParityConfig:
    """One way to run the bundle: a backend, a graph precision (None: the bundle's own per-graph choice) and a GGUF
    type (None: the bundle's default)."""
    backend: str = "auto"
    precision: str | None = None
    llm: str | None = None

    @property
    def label(self) -> str:
        return f"{self.precision or 'bundle'} graphs + {self.llm or 'default'} LLM ({self.backend})"

    @classmethod
    def parse(cls, text: str) -> "ParityConfig":
        """"backend[:precision[:llm]]", precision fp32/fp16/int8/fp8 or "bundle", llm a GGUF type or "default"."""

        backend, precision, llm = (text.split(":") + ["", ""])[:3]
        if backend not in BACKENDS:
            raise RuntimeInputError(f"parity config {text!r}: unknown backend {backend!r}; use {', '.join(BACKENDS)}")
        return cls(backend, None if precision in ("", "bundle") else precision, None if llm in ("", "default") else llm)


def default_configs(bundle: Path) -> list[ParityConfig]:
    """Each graph precision the bundle ships with its most exact GGUF (the vision side alone), the bundle's own
    precision plan with each GGUF it ships (the LLM side alone), and the bundle as shipped."""
    m = load_bundle(bundle, verify=False).manifest
    ggufs = list(m.llms) or ([m.llm.qtype] if m.llm else [])

    exact = max(ggufs, key=lambda q: BITS_PER_WEIGHT[q]) if ggufs else None
    shipped = {p for g in m.graphs.values() for p in g.variants}
    configs = [ParityConfig("onnxruntime", p, exact) for p in ("fp32", "fp16", "int8", "fp8")
               if p in shipped and all(p in g.variants for g in m.graphs.values())]
    configs += [ParityConfig("auto", None, q) for q in sorted(ggufs, key=lambda q: -BITS_PER_WEIGHT[q])]
    return list(dict.fromkeys(configs))


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first differing id (the shorter length when one is a prefix of the other); None when equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def parity_benchmark(bundle: str | Path, *, images: Sequence[Any] | None = None, question: str | None = None,  # noqa: PLR0913 (an option each)
                     configs: Sequence[ParityConfig] | None = None, max_new_tokens: int = 16, device: str = "cpu",
                     llm_threads: int | None = None, experts: Sequence[str] | None = None,
                     out_dir: str | Path | None = None, log: Log = quiet) -> dict[str, Any]:
    """Run the parity benchmark; returns the result and writes parity.{json,md,png} when out_dir is given.
    experts: force this routing on both sides (the expert graphs then get cosines even where the LLM routes none)."""

    bundle = Path(bundle)
    frames = load_images(images, demo_questions()[:PARITY_QUESTIONS], question)
    configs = list(configs or default_configs(bundle))
    ref = reference_pipeline(bundle, log)
    if ref is None:
        raise BundleError(f"the parity benchmark needs the PyTorch reference on the bundle's source checkpoint; "
                          f"{bundle} points at one that is not on this machine (or torch is not installed)")
    references = []
    for label, rgb, q in frames:
        res = ref.run(rgb, q, max_new_tokens=max_new_tokens, keep_tensors=True, force_experts=experts)
        references.append(res)
        log(f"reference {label}: experts {','.join(res.experts) or 'none'}, answer {res.text!r}")
    del ref
    result: dict[str, Any] = {"kind": "parity", "bundle": bundle_info(bundle), "machine": machine(),
                              "settings": {"images": [f[0] for f in frames], "max_new_tokens": max_new_tokens,
                                           "device": device, "llm_f32_kv": True, "forced_experts": experts},
                              "configs": []}
    llm_overrides: dict[str, Any] = {"f32_kv": True}
    if llm_threads:
        llm_overrides["n_threads"] = llm_threads
    for i, config in enumerate(configs):
        with MoVARuntime.from_bundle(bundle, device=device, backend=config.backend, precision=config.precision,
                                     llm_quant=config.llm, llm=llm_overrides, verify=i == 0) as rt:
            described = rt.describe()
            rows = []
            for (label, rgb, q), r in zip(frames, references):
                ans = rt.ask(rgb, q, max_new_tokens, keep_tensors=True, experts=experts)
                forced = None
                if ans.experts != r.experts:  # compare the graphs on the reference's routing too
                    forced = rt.ask(rgb, q, max_new_tokens, experts=r.experts, keep_tensors=True)
                graphs = forced or ans
                cos = {key: parity(t, graphs.tensors[key]).to_json() for key, t in r.tensors.items()
                       if key in graphs.tensors}
                row = {"image": label, "question": q, "reference_experts": r.experts, "runtime_experts": ans.experts,
                       "routing_agree": set(ans.experts) == set(r.experts),
                       "routing_ids_equal": ans.routing_ids == r.routing_ids,
                       "answer_exact": ans.token_ids == r.token_ids,
                       "first_divergence": first_divergence(r.token_ids, ans.token_ids),
                       "answer_tokens": [len(r.token_ids), len(ans.token_ids)],
                       "reference_answer": r.text, "runtime_answer": ans.text,
                       "tensors_on_reference_routing": forced is not None, "cosine": cos}
                rows.append(row)
                log(f"[{config.label}] {label}: routing {'agrees' if row['routing_agree'] else 'DIFFERS'}, answer "
                    f"{'equal' if row['answer_exact'] else 'diverges at ' + str(row['first_divergence'])}")
        result["configs"].append({"label": config.label, "backend": config.backend,
                                  "precision": config.precision or "bundle", "llm": described["llm"]["qtype"],
                                  "graphs": {n: f"{c['backend']}:{c['precision']}"
                                             for n, c in described["graphs"].items()},
                                  "fallbacks": described["fallbacks"], "summary": _summary(rows), "images": rows})
    result = rounded(result, 7)
    if out_dir is not None:
        result["files"] = write_parity_report(result, Path(out_dir))
    return result


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
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
    lines = [f"# Accuracy parity: {b['title']}", "",
             f"`{b['path']}`, manifest sha256 `{b['manifest_sha256']}`; LLM with an F32 KV cache; against the PyTorch "
             f"fp32 reference; max_new_tokens {s['max_new_tokens']}; questions: {'; '.join(s['images'])}", "",
             "| configuration | routing agreement | answers equal | first divergence (min) | min cosine per graph |",
             "|---|---:|---:|---:|---|"]
    for c in result["configs"]:
        sm = c["summary"]
        cos = ", ".join(f"{k} {v:.6f}" for k, v in sm["min_cosine"].items())
        div = sm["first_divergence_min"]
        lines.append(f"| {c['label']} | {100 * sm['routing_agreement']:.0f}% | {100 * sm['answer_exact_match']:.0f}% | "
                     f"{'-' if div is None else div} | {cos} |")
    for c in result["configs"]:
        lines += ["", f"## {c['label']}", "",
                  "| question | reference experts | bundle experts | answer equal | first divergence | image-token cosine |",
                  "|---|---|---|---|---:|---:|"]
        for r in c["images"]:
            it = r["cosine"].get("image_tokens", {}).get("cosine")
            lines.append(f"| {r['image']} | {','.join(r['reference_experts']) or 'none'} | "
                         f"{','.join(r['runtime_experts']) or 'none'} | {'yes' if r['answer_exact'] else 'no'} | "
                         f"{r['first_divergence'] if r['first_divergence'] is not None else '-'} | "
                         f"{'' if it is None else f'{it:.6f}'} |")
    return "\n".join(lines) + "\n"


def write_parity_report(result: dict[str, Any], out_dir: Path) -> dict[str, str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"json": str(out_dir / "parity.json"), "markdown": str(out_dir / "parity.md")}
    labels = [c["label"] for c in result["configs"]]
    keys = sorted({k for c in result["configs"] for k in c["summary"]["min_cosine"]}, key=_tensor_order)

    def draw(fig: Any) -> None:
        top, bottom = fig.subplots(2, 1, gridspec_kw={"height_ratios": [1, max(1, len(keys)) / 2]})
        barh(top, labels, {"routing agreement": [100 * c["summary"]["routing_agreement"] for c in result["configs"]],
                           "answers equal": [100 * c["summary"]["answer_exact_match"] for c in result["configs"]]},
             "% of questions")
        top.set_xlim(0, 100)
        top.set_title(f"MoVA parity vs the PyTorch reference: {result['bundle']['title']}", fontsize=9)
        # 1 - cosine on a log axis; an exact match (1 - cosine = 0) is drawn at the 1e-9 floor and labelled so
        gaps = {c["label"]: [max(1e-9, 1.0 - c["summary"]["min_cosine"].get(k, 1.0)) for k in keys]
                for c in result["configs"]}
        barh(bottom, keys, gaps, "1 - min cosine per graph (log; bars at 1e-9 are exact to fp32 rounding)", log=True)

    if write_figure(out_dir / "parity.png", draw, 0.5 * len(labels) + 0.35 * len(keys) * len(labels) ** 0.5 + 3):
        files["png"] = str(out_dir / "parity.png")
    Path(files["markdown"]).write_text(parity_markdown(result))
    Path(files["json"]).write_text(json.dumps({**result, "files": files}, indent=2) + "\n")
    return files

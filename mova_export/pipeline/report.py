"""The build report: per graph the shipped precision, parity of the fp32 graph vs PyTorch and of the shipped graph
vs fp32, the quantization decision; the stage units (computed or reused, seconds); the memory plan; the LLM."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from ..bundle import Manifest
    from .unit import StageRecord


def build_report(manifest: "Manifest", target: str, records: Sequence["StageRecord"]) -> dict[str, Any]:
    rows = []
    for name, graph in manifest.graphs.items():
        shipped = manifest.runtime.precision.get(name, "fp32")
        decision = manifest.quantize.get(name, {})
        variant = graph.variants.get(shipped)
        rows.append({
            "graph": name, "component": graph.component, "requested": decision.get("requested", shipped),
            "shipped": shipped, "decision": decision.get("final", shipped),
            "fp32_vs_torch_min_cosine": graph.proven.get("fp32"),
            "shipped_vs_reference_cosine": (decision.get("measured") or {}).get("cosine") if decision.get("measured")
            else (variant.min_cosine() if variant else None),
            "budget_min_cosine": (decision.get("budget") or {}).get("min_cosine"),
            "excluded_nodes": len(decision.get("excluded_nodes", [])),
            "parity_method": decision.get("parity_method", "ort"),
            "held_out": len(decision.get("held_out") or {}) or None,
            "worst_sample": decision.get("worst_sample"),
            "bytes": variant.bytes if variant else None,
        })
    shortfalls = sorted({(d.get("calibration") or {}).get("shortfall") for d in manifest.quantize.values()} - {None})
    calibration = {**(manifest.export.get("calibration") or {}), "shortfall": shortfalls}
    return {"target": target, "components": rows, "calibration": calibration,
            "llm": None if manifest.llm is None else manifest.llm.to_json(),
            "stages": [r.to_json() for r in records], "memory_plan": manifest.memory_plan,
            "source_checkpoint": manifest.source_checkpoint.get("digest")}


def render_report_markdown(report: dict[str, Any]) -> str:
    def num(x: Any, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    cal = report.get("calibration") or {}
    lines = [f"# mova-export build report: {report['target']}", "",
             "Parity: every graph variant against the PyTorch module on real images (fp32, fp16); the shipped "
             "quantized graph against the fp32 graph on held-out calibration images, judged on its worst held-out "
             "image (every held-out image must meet the budget).", ""]
    if cal.get("images"):
        lines += [f"Calibration: {len(cal['images'])} images ({cal.get('source', '?')}); parity images "
                  f"{', '.join(cal.get('parity_images') or [])}.", ""]
    lines += [f"**Calibration shortfall**: {s}" for s in cal.get("shortfall") or []]
    if cal.get("shortfall"):
        lines.append("")
    lines += ["| graph | requested | shipped | fp32 vs torch cosine | shipped cosine | worst held-out image | budget | "
              "excluded nodes | measured by | MiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["components"]:
        held = f"{r.get('worst_sample')} (of {r['held_out']})" if r.get("held_out") else "-"
        lines.append(f"| {r['graph']} | {r['requested']} | {r['decision']} | "
                     f"{num(r['fp32_vs_torch_min_cosine'], '.6f')} | {num(r['shipped_vs_reference_cosine'], '.5f')} | "
                     f"{held} | {num(r['budget_min_cosine'], '')} | {r['excluded_nodes']} | {r['parity_method']} | "
                     f"{num(r['bytes'] and r['bytes'] / 2**20, '.2f')} |")
    llm = report.get("llm") or {}
    if llm:
        s = llm["settings"]
        lines += ["", f"LLM: `{llm['gguf']}` ({llm['qtype']}), context {s['n_ctx']}, GPU layers {s['n_gpu_layers']}."]
    lines += ["", "| stage | unit | status | seconds | computed in (s) |", "|---|---|---|---:|---:|"]
    for st in report["stages"]:
        cost = st.get("computed_s", "")
        lines.append(f"| {st['stage']} | {st['name']} | {st['status']} | {st['seconds']} | {cost} |")
    known = [st.get("computed_s") for st in report["stages"] if st["status"] in ("computed", "reused")]
    if known:
        lines += ["", f"The units' own time, this build and the earlier ones that produced the reused units: "
                      f"{sum(k for k in known if k) / 60:.1f} min"
                      + ("" if all(k is not None for k in known) else
                         f" ({sum(k is None for k in known)} reused units predate this record)") + "."]
    plan = report.get("memory_plan") or {}
    if plan:
        lines += ["", f"Memory plan ({plan['policy']} experts, LLM {plan['llm_quant']}): peak {plan['peak_gib']} GiB "
                  f"of {plan['budget_gib']} GiB: **{plan['verdict']}**." + (f" {plan['fix']}" if plan["fix"] else "")]
    return "\n".join(lines) + "\n"


def dump(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2) + "\n"

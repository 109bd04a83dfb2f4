"""MoV-Adapter latency at MoVA-8B shapes: the dense graph against the routing form and the static top-K slot form.

    python benchmarks/adapter_slots.py --out bench-results/adapter_slots            # full size, 3 runs
    python benchmarks/adapter_slots.py --out /tmp/adapter_small --blocks 1 --grid 24 --runs 2
    (PYTHONPATH=. in a checkout whose mova_export is not the installed one, e.g. a git worktree)

The adapter alone with random weights (C 1024, a grid x grid token grid (48: N = 2304), 16 heads, --blocks blocks,
expert_channels (1536, 512, 256, 1536, 768, 768, 256), LLM hidden 4096). Each graph is exported the way a bundle
exports it (onnx_from_component: TorchScript exporter, opset 18, onnxslim) and run in ONNX Runtime CPU; the same
modules run in PyTorch eager. One run measures, for K = 0 (no expert) and K = 3 (--mask, default A, C, G):
  dense      MoVAdapter.forward, all 7 cross-attentions per block (zeros for unrouted experts)
  slots      the slot design: the routing form at K = 0, the 3-slot graph at K = 3
  reference  upstream's skipping path (forward_reference) traced with the mask as a constant: a graph with exactly
             the routed cross-attentions at their own widths, one graph per mask (the floor no static graph beats;
             at K = 0 it is the independent graph with no cross-attention at all)
plus the 3-slot graph fed the empty mask (what the routing form saves) and, with --k7, the 7-slot graph on a
four-expert mask. Parity: every output against eager forward_reference for the same mask. The timed runs go round
robin over all measurements of a backend (one run of each in turn), so load from other processes on a shared
machine falls on every form alike.
Writes adapter_slots.json (samples, p50/p95, ratios, parity, machine), adapter_slots.md and adapter_slots.png.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from dataclasses import replace
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from mova_export.components import TensorSpec, arch, expert_letters, get_spec
from mova_export.components.adapter import RoutingAdapter, SlotAdapter, routing_spec, slot_spec, text_width
from mova_export.core.slots import fill_slots
from mova_export.export import onnx_from_component
from mova_export.source.config import FULL_LLM, MoVAConfig

EXPERT_LETTERS = expert_letters()
EXPERT_INPUTS = tuple(f"expert_{letter}" for letter in EXPERT_LETTERS)

SPEC = get_spec("adapter")
EMPTY = (0,) * 7


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for adapter_slots.{json,md,png}")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per measurement (after --warmup)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs per measurement (at least one: its output "
                    "gives the parity figures)")
    ap.add_argument("--blocks", type=int, default=3, help="adapter blocks (MoVA-8B: 3)")
    ap.add_argument("--grid", type=int, default=48, help="token grid side, a multiple of 4 (MoVA-8B: 48)")
    ap.add_argument("--mask", default="ACG", help="the K = 3 mask as letters (default ACG)")
    ap.add_argument("--k7", action="store_true", help="also the 7-slot graph on --mask plus D (memory heavy)")
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op and torch threads")
    ap.add_argument("--no-eager", action="store_true", help="skip the PyTorch eager timings")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.grid % 4 or args.grid < 8:
        ap.error(f"--grid {args.grid}: the downsample halves the grid and the routing pool halves it again; "
                 "use a multiple of 4 such as 48")
    if len(set(args.mask)) != 3 or not set(args.mask) <= set(EXPERT_LETTERS):
        ap.error(f"--mask {args.mask!r}: name three distinct experts among {''.join(EXPERT_LETTERS)}, e.g. ACG")
    return args


def mask_of(letters: str) -> tuple[int, ...]:
    return tuple(int(letter in letters) for letter in EXPERT_LETTERS)


def mask_label(mask: Sequence[int]) -> str:
    return "".join(letter for letter, on in zip(EXPERT_LETTERS, mask) if on) or "none"


def stats(samples: Sequence[float]) -> dict[str, float]:
    v = np.asarray(samples, dtype=np.float64)
    return {"n": int(v.size), "p50": float(np.percentile(v, 50)), "p95": float(np.percentile(v, 95)),
            "min": float(v.min()), "max": float(v.max())}


def machine() -> dict[str, Any]:
    versions = {}
    for dist in ("torch", "onnx", "onnxruntime", "onnxslim", "numpy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "load_avg": os.getloadavg(), "tools": versions}


def random_adapter(cfg: MoVAConfig, seed: int) -> nn.Module:
    """Random weights with every branch live (upstream zero-initialises proj, w3 and the last gate layer): matrices
    ~ N(0, 1/fan-in), norm weights 1 + noise, the rest small noise; the RoPE tables stay as built."""
    module = SPEC.build(cfg)
    gen = torch.Generator().manual_seed(seed)
    norms = {f"{name}.weight" for name, sub in module.named_modules() if "norm" in type(sub).__name__.lower()}
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name in norms:
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(noise * (p[0].numel() ** -0.5 if p.dim() >= 2 and name != "pos_embed" else 0.1))
    return module.eval()


class MaskedReference(nn.Module):
    """forward_reference with the mask as a constant: traced, it keeps exactly the routed cross-attentions."""

    def __init__(self, adapter: nn.Module, mask: tuple[int, ...]):
        super().__init__()
        self.adapter, self.mask = adapter, mask
        self.routed = [j for j, on in enumerate(mask) if on]

    def forward(self, base: torch.Tensor, *routed_and_text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        experts: list[torch.Tensor | None] = [None] * len(self.mask)
        for j, value in zip(self.routed, routed_and_text[:-1]):
            experts[j] = value
        mask = torch.tensor([self.mask], dtype=torch.float32)
        return self.adapter.forward_reference(base, experts, routed_and_text[-1], mask)

    def inputs(self, cfg: MoVAConfig) -> tuple[TensorSpec, ...]:
        dense = {t.name: t for t in SPEC.inputs(cfg)}
        return (dense["base"], *(dense[EXPERT_INPUTS[j]] for j in self.routed), dense["text_features"])


def round_robin(runners: list[tuple[dict[str, Any], Callable[[], Any]]], runs: int, warmup: int,
                truth: dict[int, Any], masks: dict[int, tuple[int, ...]], log: Callable[[str], None]) -> list[dict]:
    """Time every runner `runs` times, one run of each in turn (after `warmup` runs each), so that load from other
    processes on a shared machine falls on every form alike; parity from each runner's warm-up output."""
    rows = []
    for info, run in runners:
        for _ in range(max(1, warmup)):
            out = run()
        rows.append(dict(info, mask=mask_label(masks[info["K"]]), samples=[], parity=parity(out, truth[info["K"]])))
        log(f"{info['backend']} {info['graph']} K={info['K']}: warm, max abs vs reference "
            f"{rows[-1]['parity']['max_abs']:.2g}")
    for r in range(runs):
        for row, (_, run) in zip(rows, runners):
            start = time.perf_counter()
            run()
            row["samples"].append((time.perf_counter() - start) * 1e3)
        log(f"round {r + 1}/{runs}: " + ", ".join(f"{row['graph']} K={row['K']} {row['samples'][-1]:.0f} ms"
                                                  for row in rows))
    for row in rows:
        row["ms"] = stats(row["samples"])
    return rows


def parity(got: Sequence[Any], want: Sequence[torch.Tensor]) -> dict[str, float]:
    """max abs and max abs relative to the output's max magnitude, worst over image_tokens and routing_tokens."""
    abs_err = rel_err = 0.0
    for g, w in zip(got, want):
        g, w = np.asarray(g, dtype=np.float64), w.double().numpy()
        d = float(np.abs(g - w).max())
        abs_err, rel_err = max(abs_err, d), max(rel_err, d / float(np.abs(w).max()))
    return {"max_abs": abs_err, "max_rel": rel_err}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import onnxruntime as ort

    cfg = MoVAConfig(llm=dict(FULL_LLM), num_projector_layers=args.blocks, image_feat_size=args.grid,
                     num_routing_tokens=(args.grid // 4) ** 2)
    three = mask_of(args.mask)
    four = tuple(max(a, b) for a, b in zip(three, mask_of("D" if "D" not in args.mask else "B")))
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f} s] {msg}", flush=True)

    adapter = random_adapter(cfg, args.seed)
    log(f"adapter: {args.blocks} blocks, {cfg.grid_tokens} tokens, "
        f"{sum(p.numel() for p in adapter.parameters()) / 1e6:.1f} M parameters")
    gen = torch.Generator().manual_seed(args.seed + 1)
    base = torch.randn(1, cfg.grid_tokens, cfg.mm_hidden_size, generator=gen)
    text = torch.randn(1, text_width(cfg), generator=gen)
    experts = [torch.randn(1, cfg.grid_tokens, c, generator=gen) for c in cfg.expert_channels]
    masks = {0: EMPTY, 3: three, **({7: four} if args.k7 else {})}

    def dense_feed(mask: tuple[int, ...]) -> dict[str, torch.Tensor]:
        feed = {"base": base, "text_features": text, "routing_mask": torch.tensor([mask], dtype=torch.float32)}
        for name, value, on in zip(EXPERT_INPUTS, experts, mask):
            feed[name] = value if on else torch.zeros_like(value)
        return feed

    def slot_feed(mask: tuple[int, ...], num_slots: int) -> dict[str, torch.Tensor]:
        filled = fill_slots(mask, {j: e.numpy() for j, e in enumerate(experts)}, num_slots, cfg.expert_channels,
                            cfg.grid_tokens)
        return {"base": base, "text_features": text, **{k: torch.from_numpy(v) for k, v in filled.items()}}

    def reference_feed(module: MaskedReference) -> dict[str, torch.Tensor]:
        return {"base": base, "text_features": text, **{EXPERT_INPUTS[j]: experts[j] for j in module.routed}}

    truth = {}
    with torch.inference_mode():
        for k, mask in masks.items():
            truth[k] = adapter.forward_reference(base, [e if on else None for e, on in zip(experts, mask)], text,
                                                 torch.tensor([mask], dtype=torch.float32))
    log("ground truth: eager forward_reference for " + ", ".join(mask_label(m) for m in masks.values()))

    references = {k: MaskedReference(adapter, masks[k]) for k in (0, 3)}
    # (kind, graph spec, module, [(K, feed)]): what is exported, and what each graph is fed
    graphs = [
        ("dense", SPEC, adapter, [(0, dense_feed(EMPTY)), (3, dense_feed(three))]),
        ("slots", routing_spec(), RoutingAdapter(adapter), [(0, {"base": base})]),
        ("slots", slot_spec(3), SlotAdapter(adapter, 3).eval(), [(3, slot_feed(three, 3)), (0, slot_feed(EMPTY, 3))]),
        *(("reference", replace(SPEC, name=f"adapter_reference_{mask_label(m.mask)}", inputs=m.inputs), m,
           [(k, reference_feed(m))]) for k, m in references.items()),
    ]
    if args.k7:
        graphs.append(("slots", slot_spec(7), SlotAdapter(adapter, 7).eval(), [(7, slot_feed(four, 7))]))

    rows: list[dict[str, Any]] = []
    if not args.no_eager:
        runners = []
        for kind, spec, module, runs in graphs:
            names = [t.name for t in spec.inputs(cfg)]
            for k, feed in runs:
                positional = tuple(feed[n] for n in names)
                runners.append((dict(backend="torch", kind=kind, graph=spec.name, K=k), partial(module, *positional)))
        with torch.inference_mode():
            rows += round_robin(runners, args.runs, args.warmup, truth, masks, log)

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    exports, runners, sessions = {}, [], []
    with tempfile.TemporaryDirectory(prefix="adapter_slots.") as tmp:
        for kind, spec, module, runs in graphs:
            path = Path(tmp) / f"{spec.name}.onnx"
            t0 = time.perf_counter()
            files = onnx_from_component(spec, module, cfg, path, feed=runs[0][1], log=log)
            exports[spec.name] = {"seconds": time.perf_counter() - t0,
                                  "mib": sum(f.stat().st_size for f in files) / 2**20}
            log(f"exported {spec.name}: {exports[spec.name]['mib']:.0f} MiB in {exports[spec.name]['seconds']:.0f} s")
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            sessions.append(session)
            for f in files:                                # the session holds the weights; the disk copy can go
                f.unlink()
            names = [i.name for i in session.get_inputs()]
            for k, feed in runs:
                np_feed = {n: feed[n].numpy() for n in names}
                runners.append((dict(backend="onnxruntime", kind=kind, graph=spec.name, K=k),
                                partial(session.run, None, np_feed)))
        rows += round_robin(runners, args.runs, args.warmup, truth, masks, log)
    del sessions

    result = {"config": {"blocks": args.blocks, "grid": args.grid, "tokens": cfg.grid_tokens,
                         "dim": cfg.mm_hidden_size, "heads": int(arch(cfg, "adapter")["num_heads"]),
                         "expert_channels": list(cfg.expert_channels), "llm_hidden": cfg.llm_hidden_size,
                         "mask_k3": mask_label(three), "mask_k7": mask_label(four) if args.k7 else None,
                         "runs": args.runs, "warmup": args.warmup, "threads": args.threads, "seed": args.seed,
                         "weights": "random (seeded)"},
              "machine": machine(), "exports": exports, "rows": rows, "summary": summary(rows),
              "wall_s": time.perf_counter() - start}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "adapter_slots.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "adapter_slots.md").write_text(markdown(result))
    chart(result, args.out / "adapter_slots.png")
    print(markdown(result))
    log(f"wrote {args.out}/adapter_slots.{{json,md,png}}")
    return result


def _p50(rows: list[dict[str, Any]], backend: str, kind: str, k: int, graph: str | None = None) -> float:
    for r in rows:
        if (r["backend"], r["kind"], r["K"]) == (backend, kind, k) and (graph is None or r["graph"] == graph):
            return r["ms"]["p50"]
    return math.nan


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for backend in sorted({r["backend"] for r in rows}):
        b = {}
        for k, slots in ((0, "adapter_routing"), (3, "adapter_slots3")):
            dense, slot = _p50(rows, backend, "dense", k), _p50(rows, backend, "slots", k, slots)
            ref = _p50(rows, backend, "reference", k)
            b[f"K{k}"] = {"dense_ms": dense, "slots_ms": slot, "reference_ms": ref, "dense_over_slots": dense / slot,
                          "slots_over_reference": slot / ref}
        b["slots_k0_over_no_cross_attention"] = b["K0"]["slots_over_reference"]
        b["slots3_graph_at_k0_ms"] = _p50(rows, backend, "slots", 0, "adapter_slots3")
        slots7 = _p50(rows, backend, "slots", 7, "adapter_slots7")
        b["slots7_graph_at_k4_ms"] = None if math.isnan(slots7) else slots7      # measured only with --k7
        out[backend] = b
    return out


def markdown(result: dict[str, Any]) -> str:
    c = result["config"]
    lines = [f"# MoV-Adapter: dense vs slots ({c['blocks']} blocks, N = {c['tokens']}, C = {c['dim']}, "
             f"{c['heads']} heads, LLM {c['llm_hidden']}, {c['threads']} threads, random weights)", "",
             f"p50 ms over {c['runs']} runs per measurement, round robin (after {c['warmup']} warm-up). "
             f"Load average at the end {result['machine']['load_avg'][0]:.1f}. K = 3 mask: {c['mask_k3']}. "
             "slots = routing form at K = 0, 3-slot graph at K = 3; reference = upstream's skipping path traced "
             "with the mask as a constant (one graph per mask: the floor; at K = 0 the graph with no "
             "cross-attention).", "",
             "| backend | K | dense | slots | reference | dense / slots | slots / reference |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for backend, b in result["summary"].items():
        for k in (0, 3):
            s = b[f"K{k}"]
            lines.append(f"| {backend} | {k} | {s['dense_ms']:.0f} | {s['slots_ms']:.0f} | {s['reference_ms']:.0f} "
                         f"| {s['dense_over_slots']:.2f}x | {s['slots_over_reference']:.2f}x |")
    lines.append("")
    for backend, b in result["summary"].items():
        ratio = b["slots_k0_over_no_cross_attention"]
        extra = f"; 3-slot graph fed K = 0: {b['slots3_graph_at_k0_ms']:.0f} ms"
        if b["slots7_graph_at_k4_ms"] is not None:
            extra += f"; 7-slot graph, {c['mask_k7']}: {b['slots7_graph_at_k4_ms']:.0f} ms"
        lines.append(f"- {backend}: slots K=0 / no cross-attention = {ratio:.2f}x "
                     f"({'within' if ratio <= 1.3 else 'OVER'} 1.3x){extra}")
    lines += ["", "| backend | graph | K | mask | p50 ms | p95 ms | max abs vs reference | max rel |",
              "|---|---|---:|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['backend']} | {r['graph']} | {r['K']} | {r['mask']} | {r['ms']['p50']:.0f} | "
                     f"{r['ms']['p95']:.0f} | {r['parity']['max_abs']:.2g} | {r['parity']['max_rel']:.2g} |")
    if result["exports"]:
        lines += ["", "| graph | export s | size MiB |", "|---|---:|---:|"]
        lines += [f"| {name} | {e['seconds']:.0f} | {e['mib']:.0f} |" for name, e in result["exports"].items()]
    return "\n".join(lines) + "\n"


def chart(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    backends = list(result["summary"])
    fig, axes = plt.subplots(1, len(backends), figsize=(5 * len(backends), 3.5), squeeze=False)
    for ax, backend in zip(axes[0], backends):
        b = result["summary"][backend]
        x = np.arange(2)
        for i, kind in enumerate(("dense", "slots", "reference")):
            ax.bar(x + (i - 1) * 0.27, [b[f"K{k}"][f"{kind}_ms"] for k in (0, 3)], 0.27, label=kind)
        ax.set_xticks(x, ["K = 0", f"K = 3 ({result['config']['mask_k3']})"])
        ax.set_ylabel("p50 ms")
        ax.set_title(backend, fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle(f"MoV-Adapter, {result['config']['blocks']} blocks, N = {result['config']['tokens']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()

"""Why does a graph's fp16 variant miss its tolerance: lossy nodes (an fp32 island fixes it) or an ill-conditioned
graph (nothing short of fp32 does)?

On one sample of an export unit's calibration inputs, against the fp32 graph's output:
  1. the fp32 graph fed its float inputs rounded to fp16: how far the graph itself moves for the smallest
     perturbation fp16 makes (its conditioning);
  2. the fp16 graph's error at each block boundary (`/layer.N/`, `/blocks.N/`, ...), in graph order: an error that
     jumps at one block is a lossy block, one that grows evenly is carried and amplified;
  3. fp16 graphs keeping in fp32: every node of the worst half of the blocks, every node of all blocks, the
     arithmetic outside the blocks. If none of them meets the tolerance, the component ships without fp16.

    python benchmarks/fp16_conditioning.py --unit W/export/expert_D/<key> [--sample 0] [--out R/fp16-expert_D.md]

A full-size Pix2Struct-large takes about 15 minutes on 2 cores (five fp16 conversions and runs).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--unit", type=Path, required=True, help="an export unit folder (holds unit.json)")
    parser.add_argument("--graph", help="which graph of the unit (default: the first)")
    parser.add_argument("--sample", type=int, default=0, help="index into the unit's calibration inputs")
    parser.add_argument("--out", type=Path, help="also write the table here (markdown)")
    args = parser.parse_args(argv)

    import onnx

    from mova_export.core.tolerance import TOLERANCES, parity
    from mova_export.export.blocks import block_boundaries, block_of
    from mova_export.export.fp16 import REPAIR_OPS, fp16_from_onnx
    from mova_export.export.graph_io import graph_io, tensor_errors
    from mova_export.runners.ort import OrtRunner

    unit_json = args.unit / "unit.json"
    if not unit_json.is_file():
        sys.exit(f"error: {args.unit} is no export unit (no unit.json); pass W/export/<component>/<key>")
    unit = json.loads(unit_json.read_text())
    graph = next((g for g in unit["graphs"] if args.graph in (None, g["name"])), None)
    if graph is None:
        sys.exit(f"error: no graph {args.graph!r} in {unit_json}; it has {[g['name'] for g in unit['graphs']]}")
    src = args.unit / graph["variants"]["fp32"]["graph"]
    inputs_npz = np.load(args.unit / unit["calibration"][graph["name"]])
    feed = {k: inputs_npz[k][args.sample] for k in inputs_npz.files}
    tolerance = TOLERANCES["fp16"]
    structure = onnx.load(str(src), load_external_data=False)
    ins, outs = graph_io(structure)
    nodes = list(structure.graph.node)
    blocks = sorted({block_of(n.name) for n in nodes} - {""}, key=lambda b: (len(b), b))
    rows: list[tuple[str, float, float]] = []

    def first_output(runner: OrtRunner, f: dict) -> np.ndarray:
        return np.asarray(runner.infer(f)[runner.output_names[0]], np.float32)

    def row(label: str, out: np.ndarray) -> None:
        fig = parity(reference, out)
        rows.append((label, fig.cosine, fig.rel_l2))
        print(f"{label}: cosine {fig.cosine:.7f}, rel L2 {fig.rel_l2:.5f}", flush=True)

    started = time.time()
    fp32 = OrtRunner(src)
    reference = first_output(fp32, feed)
    rounded = {k: v.astype(np.float16).astype(v.dtype) if v.dtype == np.float32 else v for k, v in feed.items()}
    row("fp32 graph, inputs rounded to fp16", first_output(fp32, rounded))
    del fp32

    def whole(members: set[str]) -> list[str]:
        return [n.name for n in nodes if n.op_type != "Constant" and block_of(n.name) in members]

    variants = {"fp16 (as exported)": []}
    trace: list[tuple[str, str, float]] = []
    with tempfile.TemporaryDirectory(dir=args.unit.parent) as tmp:
        half = Path(tmp) / "half.onnx"
        for label, kept in variants.items():
            fp16_from_onnx(src, half, ins, outs, graph["name"], keep_fp32=kept)
            row(label, first_output(OrtRunner(half), feed))
        if blocks:
            producer, exits, _ = block_boundaries(structure)
            leaving = set().union(*exits.values())
            crossing = [t for t in producer if t in leaving]          # in graph order, the output last
            errors = tensor_errors(src, half, [feed], crossing, budget_bytes=2 << 30, most=256, log=print)
            trace = [(producer[t] or "(outside blocks)", t, errors[t]) for t in crossing]
            later = set(blocks[len(blocks) // 2:])
            variants = {f"fp16, every node of {len(later)} of {len(blocks)} blocks in fp32": whole(later),
                        f"fp16, every node of all {len(blocks)} blocks in fp32": whole(set(blocks)),
                        "fp16, arithmetic outside the blocks in fp32": [
                            n.name for n in nodes if block_of(n.name) == "" and n.op_type in REPAIR_OPS]}
            for label, kept in variants.items():
                fp16_from_onnx(src, half, ins, outs, graph["name"], keep_fp32=kept)
                row(label, first_output(OrtRunner(half), feed))

    lines = [f"# fp16 conditioning of {graph['name']} (sample {args.sample}, {time.time() - started:.0f} s)", "",
             f"Tolerance: cosine >= {tolerance.min_cosine}, rel L2 <= {tolerance.max_rel_l2}.", "",
             "| graph | cosine | rel L2 | within |", "|---|---:|---:|---|"]
    def within(cos: float, rel: float) -> str:
        return "yes" if cos >= tolerance.min_cosine and rel <= tolerance.max_rel_l2 else "no"

    lines += [f"| {label} | {cos:.7f} | {rel:.5f} | {within(cos, rel)} |" for label, cos, rel in rows]
    if trace:
        lines += ["", "fp16 graph's rel L2 at each block boundary, in graph order:", "",
                  "| block | tensor | rel L2 |", "|---|---|---:|"]
        lines += [f"| {b} | `{t}` | {e:.5f} |" for b, t, e in trace]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

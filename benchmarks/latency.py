"""Latency benchmark of a bundle's runtime against the PyTorch reference (same as `mova-export bench latency`).

    python benchmarks/latency.py BUNDLE --runs 10 --out bench-results/latency
    python benchmarks/latency.py BUNDLE --device cuda --backend auto --max-new-tokens 64

Writes latency.json (per-stage p50/p95, decode tokens/s, every expert in isolation, peak host/GPU memory, the
bundle's manifest sha256), latency.md (the table) and latency.png (a bar chart per stage) into --out.
"""
from mova_export.cli.run import latency

if __name__ == "__main__":
    latency.main(prog_name="benchmarks/latency.py")

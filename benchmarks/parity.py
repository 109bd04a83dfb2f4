"""Accuracy-parity benchmark of a bundle against the PyTorch reference (same as `mova-export bench parity`).

    python benchmarks/parity.py BUNDLE --out bench-results/parity
    python benchmarks/parity.py BUNDLE --config onnxruntime:fp32 --config auto:bundle --config onnxruntime:int8

Per backend and precision over real images (six scikit-image samples by default): routing agreement, per-graph
cosine, image-token cosine, answer exact match and first divergence; the LLM runs with an F32 KV cache so an f32
GGUF reproduces the reference's answers exactly. Writes parity.json, parity.md and parity.png into --out.
"""
from mova_export.cli.run import parity

if __name__ == "__main__":
    parity.main(prog_name="benchmarks/parity.py")

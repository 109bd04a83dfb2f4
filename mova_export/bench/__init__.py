"""Benchmarks of a bundle against the PyTorch reference, in one run: latency per stage, accuracy parity.
JSON + markdown + PNG each, citing the bundle's manifest sha256. Public runtime and reference APIs only."""
from .latency import latency_benchmark, latency_markdown
from .parity import ParityConfig, default_configs, first_divergence, parity_benchmark, parity_markdown

__all__ = ["ParityConfig", "default_configs", "first_divergence", "latency_benchmark", "latency_markdown",
           "parity_benchmark", "parity_markdown"]

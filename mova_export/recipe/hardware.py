"""What mova-export knows about the hardware it targets: the `--target` shorthands, the GPUs whose compute capability
and DLA cores a recipe must agree with, and the FP8 threshold."""
from __future__ import annotations

from typing import Any

FP8_MIN_CC = (8, 9)                     # FP8 tensor cores: Ada, Hopper and newer

# `--target` shorthands -> shipped recipe names.
ALIASES: dict[str, str] = {
    "jetson-orin": "jetson-orin-agx-64gb",       # the Orin that holds MoVA-8B with every expert resident
    "jetson-orin-agx": "jetson-orin-agx-64gb",
    "jetson-orin-nx": "jetson-orin-nx-16gb",
    "jetson-orin-nano": "jetson-orin-nano-8gb",
    "jetson-thor": "jetson-thor-agx-128gb",       # the Jetson AGX Thor developer kit (T5000 module)
    "jetson-thor-agx": "jetson-thor-agx-128gb",
    "5090": "rtx-5090",
    "4090": "rtx-4090",
    "3090": "rtx-3090",
    "gb10": "dgx-spark",
    "spark": "dgx-spark",
}

# GPUs whose hardware we know: a recipe naming one must agree with it (compute capability, DLA cores). Compute
# capabilities from developer.nvidia.com/cuda-gpus ("11.0 | Jetson T5000 Jetson T4000", "12.0 | ... GeForce RTX 5090",
# "12.1 | NVIDIA GB10 (DGX Spark)"); Thor has no DLA ("Not supported: NVIDIA Jetson Thor, which has no DLA.",
# docs.nvidia.com/deeplearning/tensorrt/11.4.1/inference-library/work-with-dla.html).
KNOWN_GPUS: dict[str, dict[str, Any]] = {
    "Jetson AGX Orin 64GB": {"cc": (8, 7), "dla_cores": 2},
    "Jetson AGX Orin 32GB": {"cc": (8, 7), "dla_cores": 2},
    "Jetson Orin NX 16GB": {"cc": (8, 7), "dla_cores": 2},
    "Jetson Orin NX 8GB": {"cc": (8, 7), "dla_cores": 1},
    "Jetson Orin Nano 8GB": {"cc": (8, 7), "dla_cores": 0},
    "Jetson Orin Nano 4GB": {"cc": (8, 7), "dla_cores": 0},
    "Jetson AGX Thor 128GB": {"cc": (11, 0), "dla_cores": 0},    # CUDA 13 numbering (sm_101 under CUDA <= 12.9)
    "Jetson T4000": {"cc": (11, 0), "dla_cores": 0},
    "NVIDIA GeForce RTX 5090": {"cc": (12, 0), "dla_cores": 0},
    "NVIDIA GB10": {"cc": (12, 1), "dla_cores": 0},               # DGX Spark
    "NVIDIA GeForce RTX 4090": {"cc": (8, 9), "dla_cores": 0},
    "NVIDIA GeForce RTX 3090": {"cc": (8, 6), "dla_cores": 0},
    "NVIDIA H100 80GB HBM3": {"cc": (9, 0), "dla_cores": 0},
}

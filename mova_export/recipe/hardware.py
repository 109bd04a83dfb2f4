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
    "4090": "rtx-4090",
    "3090": "rtx-3090",
}

# GPUs whose hardware we know: a recipe naming one must agree with it (compute capability, DLA cores).
KNOWN_GPUS: dict[str, dict[str, Any]] = {
    "Jetson AGX Orin 64GB": {"cc": (8, 7), "dla_cores": 2},
    "Jetson AGX Orin 32GB": {"cc": (8, 7), "dla_cores": 2},
    "Jetson Orin NX 16GB": {"cc": (8, 7), "dla_cores": 2},
    "Jetson Orin NX 8GB": {"cc": (8, 7), "dla_cores": 1},
    "Jetson Orin Nano 8GB": {"cc": (8, 7), "dla_cores": 0},
    "Jetson Orin Nano 4GB": {"cc": (8, 7), "dla_cores": 0},
    "NVIDIA GeForce RTX 4090": {"cc": (8, 9), "dla_cores": 0},
    "NVIDIA GeForce RTX 3090": {"cc": (8, 6), "dla_cores": 0},
    "NVIDIA H100 80GB HBM3": {"cc": (9, 0), "dla_cores": 0},
}

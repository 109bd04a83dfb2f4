"""The GGUF types this project writes (pure Python: the recipes and the CLI read it without torch)."""
from __future__ import annotations

from typing import Any

# The GGUF types, largest first: how each is produced (written directly as a GGUF tensor type, or quantized by
# llama.cpp from a lossless file), its llama.cpp ftype name, and the bits per weight it reaches on Llama-3-8B (file
# size / parameters; Q4_K_M measured 4.58 GiB), which the memory planner and the disk check use. Q8_0 is written
# directly, as llama.cpp's convert_hf_to_gguf.py does (gguf-py's quantizer is bit-exact with ggml's): no 16 GB
# lossless file first, no llama.cpp needed to convert.
QTYPES: dict[str, dict[str, Any]] = {
    "f32": {"direct": "F32", "ftype": "LLAMA_FTYPE_ALL_F32", "bits": 32.0},
    "f16": {"direct": "F16", "ftype": "LLAMA_FTYPE_MOSTLY_F16", "bits": 16.0},
    "bf16": {"direct": "BF16", "ftype": "LLAMA_FTYPE_MOSTLY_BF16", "bits": 16.0},
    "q8_0": {"direct": "Q8_0", "ftype": "LLAMA_FTYPE_MOSTLY_Q8_0", "bits": 8.5},
    "q6_k": {"ftype": "LLAMA_FTYPE_MOSTLY_Q6_K", "bits": 6.56},
    "q5_k_m": {"ftype": "LLAMA_FTYPE_MOSTLY_Q5_K_M", "bits": 5.69},
    "q4_k_m": {"ftype": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "bits": 4.89},
}
BITS_PER_WEIGHT = {q: t["bits"] for q, t in QTYPES.items()}
LOSSLESS = ("f32", "f16", "bf16")   # what llama.cpp quantizes from

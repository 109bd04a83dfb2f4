"""The first NVIDIA GPU as nvidia-smi reports it (no torch, no CUDA bindings needed): name, compute capability,
memory. None where there is no nvidia-smi or no GPU."""
from __future__ import annotations

import shutil
import subprocess
from typing import Sequence


def nvidia_smi(fields: Sequence[str]) -> list[str] | None:
    """The values of `fields` (nvidia-smi --query-gpu names, e.g. "name", "compute_cap", "memory.used") for GPU 0."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=True).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return None
    values = [v.strip() for v in out[0].rsplit(",", len(fields) - 1)] if out else []
    return values if len(values) == len(fields) else None

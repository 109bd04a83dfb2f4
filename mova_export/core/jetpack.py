"""JetPack releases a Jetson recipe may name, and which one a Jetson runs (read from the device). Pure Python.

A row per JetPack release line (a point release such as 6.2.1 shares its line's TensorRT and CUDA): the Jetson
Linux (L4T) releases of the line, the CUDA and TensorRT it ships, the Jetson GPUs it supports and whether its
TensorRT builds DLA engines. Sources (stored copies of NVIDIA's pages; the notes say which facts are only partly
verified):
  * 6.2 = L4T 36.4.3, 6.2.1 = L4T 36.4.4; CUDA 12.6, TensorRT 10.3 (NVIDIA staff in NVIDIA/TensorRT-Edge-LLM issue
    #9: "Jetpack 6.2.1 (with TensorRT 10.3 and CUDA 12.6)"; L4T mapping from dusty-nv/jetson-containers
    l4t_version.py, `"36.4.3": "6.2"`: partly verified).
  * 7.0 = L4T 38.2 / 38.2.1, Thor only, CUDA 13.0 (developer.nvidia.com/embedded/jetpack/downloads/archive-7.0);
    TensorRT 10.13 (assumed: 10.13.2 added CUDA 13.0; unverified for 7.0 itself).
  * 7.1 = L4T 38.4, Thor (T5000, T4000), CUDA 13.0, TensorRT 10.13.3.9 (archive-7.1; nvidia.github.io/TensorRT-Edge-
    LLM .../limitations.html: "Use TensorRT 10.13.3.9 shipped with Jetpack 7.1"). "Version 38.4 of Jetson Linux does
    not support the Jetson Orin product family" (docs.nvidia.com/jetson/archives/r38.4).
  * 7.2 = L4T 39.2 (39.2.0; 7.2.1 = 39.2.1), Orin and Thor, CUDA 13.2 (TensorRT-Edge-LLM 0.11.1 support matrix:
    "Jetson Orin | Official | JetPack 7.2.x | 13.2 | ... FP16, INT8, and INT4 only"); TensorRT 10.16 (TensorRT
    10.16.1 release notes: "Support has been added ... for Orin iGPU while using the ARM SBSA build. This release
    will be bundled in an upcoming JetPack 7.x release"; 10.16 on the device from OE4T: partly verified).
  * DLA: "TensorRT 10.7 was the last 10.x release that supported DLA" and Thor "has no DLA"
    (docs.nvidia.com/deeplearning/tensorrt/11.4.1/inference-library/work-with-dla.html): JetPack 6.2's 10.3 has it,
    the 10.13 / 10.16 of JetPack 7.x do not (TensorRT 11.4.1 brings it back on AGX Orin from JetPack 7.2.2; not used).
  * Orin is compute capability 8.7; Thor 11.0 under CUDA 13 (developer.nvidia.com/cuda-gpus; CUDA 13.0 renamed
    Thor's sm_101 to sm_110: docs.nvidia.com/cuda/curanddx/release_notes.html).

Which release a Jetson runs: `/etc/nv_tegra_release` ("# R36 (release), REVISION: 4.3, ..." -> L4T 36.4.3; NVIDIA's
Orin Nano dev kit guide: "To check the installed Jetson Linux release: cat /etc/nv_tegra_release"), else the
version of the `nvidia-l4t-core` package ("36.4.3-20250107174145"). Reading them on a real Jetson could not be run
here (no Jetson): the parsers are tested on the formats quoted above.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

NV_TEGRA_RELEASE = Path("/etc/nv_tegra_release")


@dataclass(frozen=True)
class JetPack:
    version: str                         # the release line: "6.2" (6.2.1 is the same line)
    l4t: tuple[str, ...]                 # its Jetson Linux releases, oldest first; later patches of the last count
    cuda: str                            # CUDA major.minor it ships
    tensorrt: str                        # TensorRT major.minor it ships
    compute_capabilities: tuple[str, ...]   # the Jetson GPUs it supports: "8.7" Orin, "11.0" Thor
    dla: bool                            # its TensorRT builds DLA engines

    @property
    def cuda_major(self) -> int:
        return int(self.cuda.split(".")[0])

    def describe(self) -> str:
        """"JetPack 6.2 (L4T 36.4.3, CUDA 12.6, TensorRT 10.3)"."""
        return f"JetPack {self.version} (L4T {self.l4t[0]}, CUDA {self.cuda}, TensorRT {self.tensorrt})"


JETPACKS: dict[str, JetPack] = {j.version: j for j in (
    JetPack("6.2", ("36.4.3", "36.4.4"), "12.6", "10.3", ("8.7",), dla=True),
    JetPack("7.0", ("38.2.0", "38.2.1"), "13.0", "10.13", ("11.0",), dla=False),
    JetPack("7.1", ("38.4.0",), "13.0", "10.13", ("11.0",), dla=False),
    JetPack("7.2", ("39.2.0", "39.2.1"), "13.2", "10.16", ("8.7", "11.0"), dla=False),
)}


def _parts(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:3])


def jetpack_line(version: str) -> str:
    """"6.2.1" -> "6.2": the row of JETPACKS a point release belongs to."""
    return ".".join(str(p) for p in _parts(version)[:2])


def jetpack_of_l4t(l4t: str | None) -> JetPack | None:
    """The JetPack line of an L4T release: the row listing it, or a later patch of the same major.minor (36.4.7 is
    a 6.2 patch); None for a release mova-export does not target (e.g. 36.3 = JetPack 6.0)."""
    if not l4t:
        return None
    found = _parts(l4t)
    for jetpack in JETPACKS.values():
        for known in jetpack.l4t:
            k = _parts(known)
            if found[:2] == k[:2] and found[2:] >= k[2:]:
                return jetpack
    return None


def jetpacks_for(compute_capability: str) -> tuple[str, ...]:
    """The JetPack lines that support a Jetson GPU of this compute capability."""
    return tuple(v for v, j in JETPACKS.items() if compute_capability in j.compute_capabilities)


def parse_nv_tegra_release(text: str) -> str | None:
    """"# R36 (release), REVISION: 4.3, GCID: ..." -> "36.4.3"; None when the first line is not that format."""
    m = re.search(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*(\d+)\.(\d+)", text)
    return f"{m.group(1)}.{m.group(2)}.{m.group(3)}" if m else None


def parse_l4t_core_version(text: str) -> str | None:
    """The nvidia-l4t-core package version ("36.4.3-20250107174145", "39.2.0") -> "36.4.3"."""
    m = re.match(r"\s*(\d+)\.(\d+)(?:\.(\d+))?", text)
    return f"{m.group(1)}.{m.group(2)}.{m.group(3) or 0}" if m else None


def read_l4t(release_file: Path = NV_TEGRA_RELEASE, use_dpkg: bool = True) -> str | None:
    """The Jetson Linux release of this machine ("36.4.3"), or None off a Jetson. Reads `release_file`, else asks
    dpkg for nvidia-l4t-core. Not run on a Jetson here (no Jetson): written against the formats in the module doc."""
    try:
        found = parse_nv_tegra_release(release_file.read_text(errors="replace"))
    except OSError:
        found = None
    if found or not use_dpkg or shutil.which("dpkg-query") is None:
        return found
    try:
        out = subprocess.run(["dpkg-query", "--showformat=${Version}", "--show", "nvidia-l4t-core"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_l4t_core_version(out.stdout) if out.returncode == 0 else None


__all__ = ["JETPACKS", "JetPack", "NV_TEGRA_RELEASE", "jetpack_line", "jetpack_of_l4t", "jetpacks_for",
           "parse_l4t_core_version", "parse_nv_tegra_release", "read_l4t"]

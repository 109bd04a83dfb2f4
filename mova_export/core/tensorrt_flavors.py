"""The three TensorRT flavors one builder serves: what differs per flavor is a row of `FLAVORS`, not a branch.

| flavor       | Python module                | typing                         | target                | cache         |
|--------------|------------------------------|--------------------------------|-----------------------|---------------|
| tensorrt-10  | tensorrt 10.0 .. 10.11       | weak allowed (FP16/INT8 flags) | the GPU it builds on  | timing cache  |
| tensorrt     | tensorrt >= 10.12, 11.x      | strongly typed only            | the GPU it builds on  | timing cache  |
| tensorrt-rtx | tensorrt_rtx / _rtx_bindings | strongly typed only            | a compute capability  | runtime cache |

On a Jetson the JetPack decides the flavor (core/jetpack.py): JetPack 6.2 ships TensorRT 10.3 (tensorrt-10), JetPack
7.x ships 10.13 / 10.16 (tensorrt). `installed_cuda_majors` reads the CUDA major a wheel is built against.

API facts behind the rows (NVIDIA/TensorRT sources, python/src/infer/pyCore.cpp at tags v10.3.0 and v11.1, and
the installed tensorrt_rtx_bindings 1.7.1.116):
  * BuilderFlag.FP16 / INT8 exist in 10.3; release/10.12 include/NvInfer.h marks them "Deprecated in TensorRT 10.12.
    Superseded by strong typing."; 11.1 and TensorRT-RTX have neither (11.x removed every weak-typing flag).
  * NetworkDefinitionCreationFlag.STRONGLY_TYPED exists in 10.3, 11.1 ("Deprecated: always enabled") and RTX;
    RTX networks are strongly typed even with flags 0 (measured).
  * TF32, GPU_FALLBACK, MemoryPoolType.WORKSPACE, builder_optimization_level, DeviceType.DLA, IBuilderConfig.DLA_core,
    Builder.num_DLA_cores, Runtime.DLA_core and set_timing_cache(cache, ignore_mismatch) -> bool exist in all three.
  * RTX only: IBuilderConfig.num_compute_capabilities / set_compute_capability(ComputeCapability.SMxx, index)
    (SM75/80/86/89/120/121: no SM87 Orin, no SM90 Hopper) and ICudaEngine.create_runtime_config ->
    IRuntimeConfig.create_runtime_cache / set_runtime_cache; its timing-cache calls are deprecated no-ops
    ("Timing cache operations are no-ops in TensorRT-RTX", DeprecationWarning of 1.7.1).

Everything here is pure Python except `import_flavor`, which imports a flavor's module lazily.
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from types import ModuleType
from typing import Mapping

from .errors import CompileError

RTX = "tensorrt-rtx"
TRT10 = "tensorrt-10"
TRT = "tensorrt"
WEAK_TYPING_REMOVED = (10, 12)      # weak typing deprecated in 10.12, removed in 11.0


@dataclass(frozen=True)
class Flavor:
    name: str
    modules: tuple[str, ...]            # import names, first importable wins
    weak_typing: bool                   # FP16/INT8 builder flags and weakly typed networks exist
    strongly_typed_flag: bool           # set NetworkDefinitionCreationFlag.STRONGLY_TYPED (10.x needs it; 11.x ignores)
    ahead_of_time: bool                 # builds for a chosen compute capability, no GPU needed
    timing_cache: bool                  # the builder's timing cache does something
    runtime_cache: bool                 # IRuntimeCache: kernels specialised at first run, kept between runs
    install: str                        # how to get it, one clause


FLAVORS: dict[str, Flavor] = {f.name: f for f in (
    Flavor(TRT10, ("tensorrt",), weak_typing=True, strongly_typed_flag=True, ahead_of_time=False,
           timing_cache=True, runtime_cache=False,
           install="TensorRT ships with JetPack on the Jetson (JetPack 6: TensorRT 10.3; where its Python module is "
                   "missing: sudo apt install python3-libnvinfer)"),
    Flavor(TRT, ("tensorrt",), weak_typing=False, strongly_typed_flag=True, ahead_of_time=False,
           timing_cache=True, runtime_cache=False,
           install="pip install tensorrt (10.12+ or 11.x) on the GPU machine (on a Jetson, JetPack 7.x ships "
                   "TensorRT 10.13+: sudo apt install python3-libnvinfer)"),
    Flavor(RTX, ("tensorrt_rtx", "tensorrt_rtx_bindings"), weak_typing=False, strongly_typed_flag=False,
           ahead_of_time=True, timing_cache=False, runtime_cache=True,
           install="pip install 'mova-export[tensorrt-rtx]' to build here for the target's compute capability"),
)}

# Compute capabilities TensorRT-RTX builds for (its ComputeCapability enum, 1.7): "8.9" -> "SM89".
RTX_COMPUTE_CAPABILITIES = ("7.5", "8.0", "8.6", "8.9", "12.0", "12.1")
FP8_MIN_CC = (8, 9)


def parse_version(version: str) -> tuple[int, ...]:
    parts = []
    for p in str(version).split("."):
        if not p.isdigit():
            break
        parts.append(int(p))
    return tuple(parts)


def tensorrt_flavor(version: str) -> str:
    """The flavor of an installed `tensorrt` module by its version: weak typing below 10.12, strong only above."""
    v = parse_version(version)
    if v[:1] < (10,):
        raise CompileError(f"TensorRT {version} is installed; mova-export builds with TensorRT 10.x or 11.x: "
                           "install tensorrt>=10.12 (desktop) or use JetPack 6's TensorRT 10.3 (Jetson)")
    return TRT10 if v[:2] < WEAK_TYPING_REMOVED else TRT


def sm_name(compute_capability: str) -> str:
    """"8.9" -> "SM89": the ComputeCapability member TensorRT-RTX builds for."""
    return "SM" + compute_capability.replace(".", "")


def has_fp8(compute_capability: str) -> bool:
    return parse_version(compute_capability)[:2] >= FP8_MIN_CC


def import_flavor(name: str) -> ModuleType:
    """The Python module of flavor `name`; CompileError with the install hint when none imports."""
    flavor = FLAVORS[name]
    for module in flavor.modules:
        try:
            return importlib.import_module(module)
        except ImportError:
            continue
    raise CompileError(f"{name} is not importable here ({' or '.join(flavor.modules)}); {flavor.install}")


_MODULES = (("tensorrt", tensorrt_flavor), ("tensorrt_rtx", lambda _: RTX), ("tensorrt_rtx_bindings", lambda _: RTX))


def _installed() -> list[tuple[str, str, str]]:
    """(module, flavor, version) of every TensorRT module that imports here."""
    out = []
    for module, flavor_of in _MODULES:
        try:
            version = str(importlib.import_module(module).__version__)
            out.append((module, flavor_of(version), version))
        except (ImportError, AttributeError, CompileError):
            continue
    return out


def installed_flavors() -> Mapping[str, str]:
    """flavor -> version of what imports on this machine (lazy imports; empty where nothing TensorRT is installed)."""
    found: dict[str, str] = {}
    for _module, flavor, version in _installed():
        found.setdefault(flavor, version)
    return found


def cuda_major_of_distribution(name: str) -> int | None:
    """"tensorrt_rtx_cu12_bindings" / "tensorrt-cu13" -> 12 / 13: the CUDA major a TensorRT wheel is built against
    (its distribution name says it); None for a name without one (JetPack's apt package has no distribution)."""
    m = re.search(r"[_-]cu(\d+)(?:[_-]|$)", name.lower())
    return int(m.group(1)) if m else None


def installed_cuda_majors() -> Mapping[str, int]:
    """flavor -> the CUDA major its installed wheel is built against (from the wheel's distribution name; measured
    here: tensorrt_rtx_bindings comes from tensorrt_rtx_cu12_bindings). A flavor installed without pip metadata
    (JetPack's python3-libnvinfer) is absent: its CUDA is the JetPack's."""
    from importlib.metadata import packages_distributions

    dists = packages_distributions()
    found: dict[str, int] = {}
    for module, flavor, _version in _installed():
        majors = [m for m in (cuda_major_of_distribution(d) for d in dists.get(module, ())) if m is not None]
        if majors:
            found.setdefault(flavor, majors[0])
    return found


__all__ = ["FLAVORS", "FP8_MIN_CC", "Flavor", "RTX", "RTX_COMPUTE_CAPABILITIES", "TRT", "TRT10",
           "cuda_major_of_distribution", "has_fp8", "import_flavor", "installed_cuda_majors", "installed_flavors",
           "parse_version", "sm_name", "tensorrt_flavor"]

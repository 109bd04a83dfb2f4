"""This machine (GPU, installed TensorRT flavors) and which flavor builds a recipe's engines here, if any.

Choice (`select_flavor`), in order: full TensorRT when it is installed and this GPU is the target's (engines are
tuned on the GPU that will run them; the only way for Jetson and Hopper targets); else TensorRT-RTX ahead of time
when it is installed and covers the target's compute capability (any machine, CI included). Otherwise the reason
says what to install where.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from ..core.gpu import nvidia_smi
from ..core.tensorrt_flavors import FLAVORS, RTX, RTX_COMPUTE_CAPABILITIES, TRT, TRT10, installed_flavors
from ..recipe import Recipe


@dataclass(frozen=True)
class DeviceInfo:
    gpu_name: str | None = None                      # None: no CUDA GPU found
    compute_capability: str | None = None            # "8.7"
    flavors: tuple[tuple[str, str], ...] = ()        # (flavor, version) of what imports here

    @classmethod
    def of(cls, gpu_name: str | None, compute_capability: str | None, flavors: Mapping[str, str]) -> "DeviceInfo":
        return cls(gpu_name, compute_capability, tuple(sorted(flavors.items())))

    def version(self, flavor: str) -> str | None:
        return dict(self.flavors).get(flavor)


def _gpu_from_cuda() -> tuple[str, str] | None:
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6 (e.g. JetPack's)
        except ImportError:
            return None
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or count < 1:
        return None
    err, prop = cudart.cudaGetDeviceProperties(0)
    if int(err) != 0:
        return None
    name = prop.name.decode() if isinstance(prop.name, bytes) else str(prop.name)
    return name.rstrip("\x00"), f"{prop.major}.{prop.minor}"


def _gpu_from_nvidia_smi() -> tuple[str, str] | None:

    values = nvidia_smi(["name", "compute_cap"])
    return (values[0], values[1]) if values else None


def current_device() -> DeviceInfo:
    """The installed TensorRT flavors and the first CUDA GPU (cuda-python, else nvidia-smi); None where absent."""
    gpu = _gpu_from_cuda() or _gpu_from_nvidia_smi() or (None, None)
    return DeviceInfo.of(gpu[0], gpu[1], installed_flavors())


@dataclass(frozen=True)
class FlavorChoice:
    flavor: str
    version: str
    ahead_of_time: bool


def _install_advice(recipe: Recipe) -> str:
    if recipe.device.kind == "jetson":
        return FLAVORS[TRT10].install
    if recipe.device.cc_str in RTX_COMPUTE_CAPABILITIES:
        return f"{FLAVORS[RTX].install}, or {FLAVORS[TRT].install}"
    return FLAVORS[TRT].install


def select_flavor(recipe: Recipe, device: DeviceInfo, command: str = "mova-export compile BUNDLE"
                  ) -> tuple[FlavorChoice | None, str]:
    """(the flavor that builds `recipe`'s engines on `device`, why) or (None, why not + what to install and run)."""
    cc = recipe.device.cc_str
    gpu_here = device.gpu_name is not None and device.compute_capability == cc
    for flavor in (TRT10, TRT):
        version = device.version(flavor)
        if version is not None and gpu_here:
            return FlavorChoice(flavor, version, False), (f"TensorRT {version} and {device.gpu_name} ({cc}) match "
                                                          f"{recipe.name}")
    rtx = device.version(RTX)
    if rtx is not None and recipe.device.kind == "dgpu" and cc in RTX_COMPUTE_CAPABILITIES:
        return FlavorChoice(RTX, rtx, True), (f"TensorRT-RTX {rtx} builds for compute capability {cc} ahead of time "
                                              f"({recipe.device.name}); engines are specialised at their first run")
    where = f"on the {recipe.device.name} (copy the bundle there first)"
    if device.gpu_name is None:
        problem = f"no CUDA GPU here and no TensorRT flavor that builds {recipe.name} ahead of time"
    elif device.compute_capability != cc:
        problem = (f"this GPU ({device.gpu_name}, compute capability {device.compute_capability}) is not the "
                   f"target's ({recipe.device.name}, {cc})")
    else:
        problem = "no TensorRT Python package is importable here"
    return None, f"{problem}: {_install_advice(recipe)}, then run `{command}` {where}"


@dataclass(frozen=True)
class CompileCheck:
    ok: bool
    reason: str
    command: str                         # what to run (here when ok, else on the device)
    device: DeviceInfo = field(default_factory=DeviceInfo)
    flavor: FlavorChoice | None = None


def can_compile_here(recipe: Recipe, bundle: str | Path = "BUNDLE", device: DeviceInfo | None = None) -> CompileCheck:
    """Whether engines for `recipe` can be built on this machine (see `select_flavor`). Otherwise `reason` says why
    and what to install, and `command` is what to run on the device."""
    command = f"mova-export compile {bundle} --target {recipe.name}"
    device = device if device is not None else current_device()
    if recipe.tensorrt is None:
        return CompileCheck(False, f"recipe {recipe.name} runs {recipe.runtime}: there are no TensorRT engines to "
                            "build; the ONNX graphs run as they are", "", device)
    choice, reason = select_flavor(recipe, device, command)
    return CompileCheck(choice is not None, reason, command, device, choice)


__all__ = ["CompileCheck", "DeviceInfo", "FlavorChoice", "can_compile_here", "current_device", "select_flavor"]

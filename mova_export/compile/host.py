"""This machine (GPU, installed TensorRT flavors) and which flavor builds a recipe's engines here, if any.

Choice (`select_flavor`), in order: full TensorRT when it is installed and this GPU is the target's (engines are
tuned on the GPU that will run them; the only way for Jetson and Hopper targets); else TensorRT-RTX ahead of time
when it is installed and covers the target's compute capability (any machine, CI included). Otherwise the reason
says what to install where.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..core.platforms import DeviceInfo, current_device, jetpack_target
from ..core.tensorrt_flavors import FLAVORS, RTX, RTX_COMPUTE_CAPABILITIES, TRT, TRT10
from ..recipe import Recipe
from .settings import default_flavor


@dataclass(frozen=True)
class FlavorChoice:
    flavor: str
    version: str
    ahead_of_time: bool


def _install_advice(recipe: Recipe) -> str:
    if recipe.device.kind == "jetson":   # the JetPack's TensorRT: 10.3 on 6.2, 10.13+ on 7.x
        return FLAVORS[default_flavor(recipe)].install
    if recipe.device.cc_str in RTX_COMPUTE_CAPABILITIES:
        return f"{FLAVORS[RTX].install}, or {FLAVORS[TRT].install}"
    return FLAVORS[TRT].install


def select_flavor(recipe: Recipe, device: DeviceInfo, command: str = "mova-export compile BUNDLE",
                  bundle: str | Path = "BUNDLE") -> tuple[FlavorChoice | None, str]:
    """(the flavor that builds `recipe`'s engines on `device`, why) or (None, why not + what to install and run).
    A Jetson that reports its L4T release must run the JetPack the recipe names (`--target NAME@jetpackX.Y`)."""
    cc = recipe.device.cc_str
    refused = _other_jetpack(recipe, device, command, bundle)
    if refused:
        return None, refused
    gpu_here = device.gpu_name is not None and device.compute_capability == cc
    for flavor in (TRT10, TRT):
        version = device.version(flavor)
        if version is not None and gpu_here:
            return FlavorChoice(flavor, version, False), (f"TensorRT {version} and {device.gpu_name} ({cc}) match "
                                                          f"{recipe.name}")
    rtx = device.version(RTX)
    if rtx is not None and recipe.device.kind != "jetson" and cc in RTX_COMPUTE_CAPABILITIES:
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


def _other_jetpack(recipe: Recipe, device: DeviceInfo, command: str, bundle: str | Path) -> str:
    """Why a Jetson recipe cannot be compiled on this Jetson's JetPack ("" when it can, or the release is unknown)."""
    wanted = recipe.device.jetpack
    if recipe.device.kind != "jetson" or not wanted or device.l4t is None or device.compute_capability != \
            recipe.device.cc_str:
        return ""
    here = device.jetpack
    if here is not None and here.version == wanted:
        return ""
    if here is None:
        return (f"this Jetson runs L4T {device.l4t}, not a JetPack mova-export targets; {recipe.name} assumes JetPack "
                f"{wanted}: flash it and run `{command}`")
    return (f"this Jetson runs JetPack {here.version} (L4T {device.l4t}) but {recipe.name} assumes JetPack {wanted}; "
            f"compile for this JetPack: `mova-export compile {bundle} --target "
            f"{jetpack_target(recipe.name, here.version)}`")


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
    choice, reason = select_flavor(recipe, device, command, bundle)
    return CompileCheck(choice is not None, reason, command, device, choice)


__all__ = ["CompileCheck", "DeviceInfo", "FlavorChoice", "can_compile_here", "current_device", "select_flavor"]

"""The platform an engine was built for and the one it is asked to run on, and the refusal of a mismatch.

A TensorRT engine runs only where everything it was built with matches: the GPU's compute capability, the TensorRT
flavor and version, the CUDA major that TensorRT is built against, and on a Jetson the JetPack release (engines
built on JetPack 6.2 must be rebuilt on 7.2: "Serialized engines are not generally portable across platforms or
TensorRT versions", NVIDIA's TensorRT release properties). `EnginePlatform` is that record (kept in each engine's
metadata and in the manifest's engines table); `DeviceInfo` is this machine (`current_device`); `check_platform`
refuses a mismatch in one line that names both sides and the one command that rebuilds the engines. Compile
(compile/metadata.py) and the runtime (runners/tensorrt.py) both call it. Pure Python: cuda-python, nvidia-smi and
dpkg are asked lazily, and only by `current_device`.
"""
from __future__ import annotations

import platform
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from .errors import BundleError
from .gpu import nvidia_smi
from .jetpack import JETPACKS, JetPack, jetpack_line, jetpack_of_l4t, read_l4t
from .tensorrt_flavors import FLAVORS, installed_cuda_majors, installed_flavors

# The shipped recipe (or alias) for a GPU of each compute capability: what a refusal tells the user to compile for.
# tests/test_targets.py checks every row against the recipes.
TARGET_OF_CC = {"8.6": "rtx-3090", "8.7": "jetson-orin", "8.9": "rtx-4090", "9.0": "h100", "11.0": "jetson-thor",
                "12.0": "rtx-5090", "12.1": "dgx-spark"}


@dataclass(frozen=True)
class DeviceInfo:
    gpu_name: str | None = None                      # None: no CUDA GPU found
    compute_capability: str | None = None            # "8.7"
    flavors: tuple[tuple[str, str], ...] = ()        # (flavor, version) of what imports here
    l4t: str | None = None                           # the Jetson Linux release ("36.4.3"); None off a Jetson
    cuda: tuple[tuple[str, int], ...] = ()           # (flavor, CUDA major its installed wheel is built against)

    @classmethod
    def of(cls, gpu_name: str | None, compute_capability: str | None, flavors: Mapping[str, str],
           l4t: str | None = None, cuda: Mapping[str, int] | None = None) -> "DeviceInfo":
        return cls(gpu_name, compute_capability, tuple(sorted(flavors.items())), l4t,
                   tuple(sorted((cuda or {}).items())))

    def version(self, flavor: str) -> str | None:
        return dict(self.flavors).get(flavor)

    @property
    def jetpack(self) -> JetPack | None:
        """The JetPack line this Jetson runs (from its L4T release); None off a Jetson or for an untargeted L4T."""
        return jetpack_of_l4t(self.l4t)

    def cuda_major(self, flavor: str) -> int | None:
        """The CUDA major `flavor`'s TensorRT is built against here: its wheel's, else the JetPack's on a Jetson."""
        found = dict(self.cuda).get(flavor)
        if found is None and self.jetpack is not None and self.version(flavor) is not None:
            return self.jetpack.cuda_major
        return found

    def describe(self) -> str:
        gpu = f"{self.gpu_name} ({self.compute_capability})" if self.gpu_name else "no CUDA GPU"
        jetpack = self.jetpack
        where = f", JetPack {jetpack.version} (L4T {self.l4t})" if jetpack else (f", L4T {self.l4t}" if self.l4t
                                                                                  else "")
        return gpu + where


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
    """This machine: the first CUDA GPU (cuda-python, else nvidia-smi), the installed TensorRT flavors and the CUDA
    majors of their wheels, and on a Jetson its L4T release (core/jetpack.read_l4t); None where absent."""
    gpu = _gpu_from_cuda() or _gpu_from_nvidia_smi() or (None, None)
    return DeviceInfo.of(gpu[0], gpu[1], installed_flavors(), read_l4t(), installed_cuda_majors())


def host_platform() -> str:
    """"linux-x86_64": the OS and CPU an engine was built on (recorded, shown by inspect)."""
    return f"{platform.system().lower()}-{platform.machine()}"


@dataclass(frozen=True)
class EnginePlatform:
    """What an engine was built for: every field a device must match to run it (None: not recorded or not
    applicable, e.g. no JetPack for an engine built ahead of time for an RTX card)."""
    flavor: str
    tensorrt_version: str
    compute_capability: str
    gpu_name: str | None = None          # the GPU it was tuned on; None: built ahead of time for the capability
    cuda_major: int | None = None
    jetpack: str | None = None           # the JetPack line it was built on ("6.2"), Jetson engines only
    l4t: str | None = None
    built_on: str = ""                   # host_platform() of the machine that built it

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> "EnginePlatform":
        """From an engine's metadata or a manifest engines entry (older ones lack the newer fields)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})

    def describe(self) -> str:
        """"JetPack 6.2 (L4T 36.4.3), SM87, tensorrt-10 10.3.0, CUDA 12"."""
        parts = [f"JetPack {self.jetpack}" + (f" (L4T {self.l4t})" if self.l4t else "")] if self.jetpack else []
        parts += [f"SM{self.compute_capability.replace('.', '')}", f"{self.flavor} {self.tensorrt_version}"]
        if self.cuda_major is not None:
            parts.append(f"CUDA {self.cuda_major}")
        if self.gpu_name:
            parts.append(f"tuned on {self.gpu_name}")
        return ", ".join(parts)


def jetpack_target(recipe: str, jetpack: str) -> str:
    """The target naming `recipe` on another JetPack: "jetson-orin-agx-64gb@jetpack7.2"."""
    return f"{recipe.split('@')[0]}@jetpack{jetpack_line(jetpack)}"


def _recompile(bundle: str | Path, target: str | None = None) -> str:
    return f"`mova-export compile {bundle}" + (f" --target {target}`" if target else "`")


def _jetpack_problem(built: EnginePlatform, here: DeviceInfo, what: str, recipe: str, bundle: str | Path) -> str | None:
    if not built.jetpack or not here.l4t:
        return None
    jetpack = here.jetpack
    if jetpack is not None and jetpack.version == jetpack_line(built.jetpack):
        return None
    if jetpack is None:
        return (f"{what} was built on {built.describe()} but this Jetson runs L4T {here.l4t}, which is none of the "
                f"JetPack releases mova-export targets ({', '.join(JETPACKS)}): flash one, then run "
                f"{_recompile(bundle, jetpack_target(recipe, built.jetpack))} on it")
    return (f"{what} was built on {built.describe()} but this Jetson runs JetPack {jetpack.version} (L4T {here.l4t}); "
            "engines do not move between JetPack releases: run "
            f"{_recompile(bundle, jetpack_target(recipe, jetpack.version))} on it")


def _gpu_problem(built: EnginePlatform, here: DeviceInfo, what: str, bundle: str | Path) -> str | None:
    if str(built.compute_capability) == str(here.compute_capability):
        return None
    if here.compute_capability is None:
        return (f"{what} was built for compute capability {built.compute_capability} ({built.describe()}) but this "
                f"device has none (no CUDA GPU); run it on a GPU of compute capability {built.compute_capability}, "
                "or run the ONNX graphs with ONNX Runtime")
    target = TARGET_OF_CC.get(here.compute_capability)
    fix = (f"run {_recompile(bundle, target)} here" if target else
           f"run {_recompile(bundle, '<the recipe of this GPU>')} here (`mova-export recipes` lists them)")
    return (f"{what} was built for compute capability {built.compute_capability} ({built.describe()}) but this device "
            f"has {here.compute_capability} ({here.gpu_name}); engines do not move between GPUs: {fix}")


def _tensorrt_problem(built: EnginePlatform, here: DeviceInfo, what: str, bundle: str | Path) -> str | None:
    fix = f"run {_recompile(bundle)} with the TensorRT that runs it"
    if built.flavor not in FLAVORS:
        return f"{what} names flavor {built.flavor!r}, not one of {', '.join(FLAVORS)}; {fix}"
    found = here.version(built.flavor)
    if found is None:
        return (f"{what} was built with {built.flavor} {built.tensorrt_version}, which is not importable here; "
                f"{FLAVORS[built.flavor].install}, or run the ONNX graphs with ONNX Runtime")
    if str(built.tensorrt_version) != str(found):
        return (f"{what} was built with {built.flavor} version {built.tensorrt_version} but this device has {found}; "
                f"engines do not move between GPUs or TensorRT versions: {fix}")
    cuda = here.cuda_major(built.flavor)
    if built.cuda_major is not None and cuda is not None and int(built.cuda_major) != cuda:
        return (f"{what} was built with {built.flavor} {built.tensorrt_version} for CUDA {built.cuda_major} but this "
                f"device's {built.flavor} runs CUDA {cuda}; engines do not move between CUDA majors: {fix}")
    if built.gpu_name is not None and built.gpu_name != here.gpu_name:
        return (f"{what} was built with GPU {built.gpu_name} but this device has {here.gpu_name or 'no CUDA GPU'}; "
                f"engines tuned on one GPU do not move to another: {fix}")
    return None


def check_platform(built: EnginePlatform, here: DeviceInfo, what: str, recipe: str = "",
                   bundle: str | Path = "BUNDLE") -> None:
    """Refuse an engine whose platform differs from this device's: BundleError in one line naming both sides and
    the rebuild command. Checked in the order that names the cause: JetPack release, compute capability, TensorRT
    flavor and version, CUDA major, the GPU it was tuned on. `recipe`: the target the engine was compiled for."""
    problem = (_jetpack_problem(built, here, what, recipe, bundle) or _gpu_problem(built, here, what, bundle)
               or _tensorrt_problem(built, here, what, bundle))
    if problem:
        raise BundleError(problem)


__all__ = ["DeviceInfo", "EnginePlatform", "TARGET_OF_CC", "check_platform", "current_device", "host_platform",
           "jetpack_target"]

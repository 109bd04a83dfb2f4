"""A recipe as frozen dataclasses: the whole configuration of a build for one target (house habit: no hidden
knobs). Pure Python; load.py fills them from YAML and validates every field."""
from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass
from typing import Any, Mapping

from ..components import all_specs, expert_specs
from ..core.errors import RecipeError
from ..core.jetpack import JETPACKS, jetpacks_for
from ..core.qtypes import QTYPES
from ..core.tolerance import Tolerance

RUNTIMES = ("tensorrt", "onnxruntime-cpu")
# jetson: a Tegra module running JetPack (unified memory); dgpu: a discrete card with its own memory; igpu: a desktop
# SoC whose GPU shares the CPU's memory without JetPack (DGX Spark's GB10); cpu: no GPU at all.
DEVICE_KINDS = ("jetson", "dgpu", "igpu", "cpu")
EXPERT_POLICIES = ("resident", "lazy")
CALIBRATION_METHODS = ("entropy", "minmax", "percentile")
QUANT_BACKENDS = ("auto", "onnxruntime", "modelopt")
FALLBACKS = ("fp16", "fp32", "none")
# precision-section keys that stand for several components: every expert the recipe does not name, then any
# component it does not name. A new expert in the registry takes `experts:` without a recipe edit.
GROUP_KEYS = ("experts", "default")


def graph_components() -> tuple[str, ...]:
    """Every registered component with a graph (all but the LLM), in pipeline order."""

    return tuple(s.name for s in all_specs() if s.kind != "llm")


def expert_components() -> tuple[str, ...]:

    return tuple(s.name for s in expert_specs())


def llm_quants() -> tuple[str, ...]:
    """The GGUF types a recipe may ship, largest first."""
    return tuple(QTYPES)


@dataclass(frozen=True)
class Device:
    kind: str                           # jetson | dgpu | igpu | cpu
    name: str                           # GPU name as the driver reports it ("CPU" for the cpu recipe)
    compute_capability: tuple[int, int] | None
    memory_mib: int                     # physical memory the plan is measured against (unified on Jetson)
    unified_memory: bool
    jetpack: str | None = None          # Jetson only: the JetPack line assumed ("6.2"); its TensorRT decides the flavor

    @property
    def cc_str(self) -> str:
        return "" if self.compute_capability is None else "%d.%d" % self.compute_capability


@dataclass(frozen=True)
class BuilderOptions:
    optimization_level: int = 3         # builder_optimization_level 0..5
    workspace_mib: int = 4096           # MemoryPoolType.WORKSPACE limit
    timing_cache: bool = True           # load/save <bundle>/engines/timing.cache


@dataclass(frozen=True)
class DLAOptions:
    components: tuple[str, ...] = ()    # run on DLA, with GPU fallback for unsupported layers
    core: int = 0
    gpu_fallback: bool = True


@dataclass(frozen=True)
class TensorRTOptions:
    version: str                        # TensorRT major.minor the target ships (JetPack 6.x: 10.3)
    fp16: bool
    int8: bool
    fp8: bool
    dla_cores: int
    builder: BuilderOptions
    dla: DLAOptions


@dataclass(frozen=True)
class Calibration:
    method: str = "entropy"
    samples: int = 20                   # calibration samples (images) a quantized graph is calibrated on
    held_out: int = 8                   # samples held out of calibration: the accuracy gate judges every one of them
    fallback: str = "fp16"              # what a component that misses its budget falls back to
    backend: str = "auto"               # auto | onnxruntime | modelopt (auto: modelopt where it imports)


@dataclass(frozen=True)
class LLMOptions:
    quant: str
    gpu_layers: int                     # -1 = every layer on the GPU
    context: int
    threads: int


@dataclass(frozen=True)
class ExpertPolicy:
    policy: str = "resident"            # resident: all 7 loaded; lazy: load routed experts on demand
    max_loaded: int = 3                 # lazy: at most this many experts in memory (the router picks K <= 3)


@dataclass(frozen=True)
class MemoryOptions:
    budget_mib: int                     # what MoVA may use on the target (physical minus OS / desktop)
    runtime_overhead_mib: int = 600     # CUDA context, TensorRT / ORT runtime, llama.cpp process


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    runtime: str
    device: Device
    tensorrt: TensorRTOptions | None
    precision: Mapping[str, str]        # component -> int8 | fp8 | fp16 | fp32 (every graph component)
    accuracy: Mapping[str, Tolerance]   # precision -> budget (every held-out sample must meet it)
    calibration: Calibration
    llm: LLMOptions
    experts: ExpertPolicy
    memory: MemoryOptions
    source: str = ""                    # the file it was read from (not part of any cache key)

    def precision_of(self, component: str) -> str:
        if component not in self.precision:
            raise RecipeError(f"recipe {self.name}: no precision for component {component!r}; known: "
                              f"{', '.join(self.precision)}")
        return self.precision[component]

    def on_dla(self, component: str) -> bool:
        return self.tensorrt is not None and component in self.tensorrt.dla.components

    @property
    def base_name(self) -> str:
        """The recipe file's name without a `@jetpackX.Y` choice: "jetson-orin-agx-64gb"."""
        return self.name.split("@")[0]

    @property
    def platform_note(self) -> str:
        """What a Jetson target assumes, in one line ("" elsewhere): "JetPack 6.2 assumed (L4T 36.4.3, CUDA 12.6,
        TensorRT 10.3); other JetPacks: --target jetson-orin-agx-64gb@jetpack7.2"."""
        jetpack = JETPACKS.get(self.device.jetpack or "")
        if self.device.kind != "jetson" or jetpack is None:
            return ""
        others = [v for v in jetpacks_for(self.device.cc_str) if v != jetpack.version]
        tail = f"; other JetPacks: {', '.join(f'--target {self.base_name}@jetpack{v}' for v in others)}" if others \
            else ""
        return (f"JetPack {jetpack.version} assumed (L4T {jetpack.l4t[0]}, CUDA {jetpack.cuda}, TensorRT "
                f"{jetpack.tensorrt}){tail}")

    def to_dict(self) -> dict[str, Any]:
        return _plain(self)

    def to_json(self) -> dict[str, Any]:
        """to_dict in strict JSON (an unbounded rel L2 is null, not Infinity)."""
        out = self.to_dict()
        out["accuracy"] = {p: t.to_json() for p, t in self.accuracy.items()}
        return out


def _plain(value: Any) -> Any:
    if is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value

"""Recipe + component + graph facts + flavor -> one frozen `BuilderSettings` (pure Python, tested on CPU), and its
resolution against a real TensorRT module's enums (`resolve_settings`).

Network mode per graph (what the graph holds -> how it is built):
  * FP8 Q/DQ, INT8 Q/DQ on an fp16 base, fp16 graphs: strongly typed, no precision flags, in every flavor; TensorRT
    follows the ONNX types, so the fp32 islands (norms, softmax, the alignment Resize) stay fp32.
  * INT8 Q/DQ on an fp32 base: weakly typed with INT8 + FP16 on tensorrt-10 (the only flavor with those flags);
    strongly typed elsewhere, where everything outside the Q/DQ pairs then runs fp32 (quantize with base="fp16").
  * fp32 graphs: TF32 cleared (the fp32 budget is near-exact); weakly typed on tensorrt-10, strongly typed elsewhere.
  * DLA components: tensorrt-10 builds them weakly typed with FP16 (+INT8) and GPU_FALLBACK (DLA takes precision from
    flags there); tensorrt >= 10.12 strongly typed with GPU_FALLBACK, which needs an fp16-typed graph. TensorRT-RTX
    never gets there: it cannot target a Jetson's compute capability (8.7), the only GPUs with a DLA.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from types import ModuleType
from typing import Any, Mapping, Sequence

from ..core.errors import CompileError, RecipeError
from ..core.tensorrt_flavors import FLAVORS, RTX, RTX_COMPUTE_CAPABILITIES, TRT10, has_fp8, sm_name, tensorrt_flavor
from ..recipe import Recipe, graph_components
from .graph import GraphInfo


@dataclass(frozen=True)
class BuilderSettings:
    component: str
    precision: str                       # the graph variant built: int8 | fp8 | fp16 | fp32
    flavor: str                          # tensorrt-10 | tensorrt | tensorrt-rtx (flavors.FLAVORS)
    strongly_typed: bool
    network_flags: tuple[str, ...]       # NetworkDefinitionCreationFlag names
    flags: tuple[str, ...]               # BuilderFlag names to set: FP16, INT8, GPU_FALLBACK
    clear_flags: tuple[str, ...]         # BuilderFlag names to clear: TF32
    optimization_level: int
    workspace_bytes: int
    timing_cache: bool
    dla_core: int | None                 # None: GPU
    compute_capability: str | None       # ahead-of-time target ("8.9", TensorRT-RTX); None: the GPU it builds on
    # an optimization profile for the graph's symbolic dimensions (the text encoder's length buckets):
    # (input name, min shape, opt shape, max shape); empty for a graph of static shapes
    shape_profile: tuple[tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...]], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def shape_profile(inputs: Sequence[Any], axes: Mapping[str, Sequence[int]]
                  ) -> tuple[tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...]], ...]:
    """The profile of a graph whose inputs (TensorSpecs) have symbolic dimensions taking the sizes in `axes`: the
    smallest size is min and opt (most questions are short), the largest max."""
    out = []
    for t in inputs:
        if any(isinstance(d, str) for d in t.shape):
            shapes = [tuple(int(d) if not isinstance(d, str) else pick(axes[d]) for d in t.shape)
                      for pick in (min, min, max)]
            out.append((t.name, *shapes))
    return tuple(out)


def graph_kind(graph: GraphInfo | None, precision: str) -> str:
    """"fp8" | "int8" | "int8-fp32-base" | "fp16" | "fp32" from the graph's real types (else the variant's name)."""
    if graph is None:
        return {"int8": "int8", "fp8": "fp8", "fp16": "fp16"}.get(precision, "fp32")
    if "fp8" in graph.qdq:
        return "fp8"
    if "int8" in graph.qdq:
        return "int8" if graph.fp16_typed else "int8-fp32-base"
    return "fp16" if graph.fp16_typed else "fp32"


def default_flavor(recipe: Recipe) -> str:
    """The flavor a target is built with when nothing else decides: on a Jetson the one of its JetPack's TensorRT
    (JetPack 6.2: 10.3, tensorrt-10, weak typing allowed; JetPack 7.x: 10.13 / 10.16, tensorrt, strongly typed only),
    TensorRT-RTX ahead of time for a GPU it covers (RTX cards, DGX Spark), full TensorRT otherwise (e.g. Hopper)."""
    if recipe.device.kind == "jetson":
        return tensorrt_flavor(recipe.tensorrt.version) if recipe.tensorrt is not None else TRT10
    return RTX if recipe.device.cc_str in RTX_COMPUTE_CAPABILITIES else "tensorrt"


# (weakly typed?, builder flags, flags to clear) per graph kind on the GPU, for flavors with and without weak typing
_GPU_MODES = {
    True: {"fp8": (False, (), ()), "int8": (False, (), ()), "fp16": (False, (), ()),
           "int8-fp32-base": (True, ("INT8", "FP16"), ()), "fp32": (True, (), ("TF32",))},
    False: {"fp8": (False, (), ()), "int8": (False, (), ()), "fp16": (False, (), ()),
            "int8-fp32-base": (False, (), ()), "fp32": (False, (), ("TF32",))},
}


def builder_settings(recipe: Recipe, component: str, graph: GraphInfo | None = None, precision: str | None = None,
                     flavor: str | None = None) -> BuilderSettings:
    """How to build `component` for `recipe` with `flavor` (default: `default_flavor(recipe)`); the module doc has the
    rules. `precision` is the variant being built (default: the recipe's); `graph` refines the choice with the
    graph's real Q/DQ and float types. RecipeError for a target that cannot hold the graph."""
    if recipe.tensorrt is None:
        raise RecipeError(f"recipe {recipe.name} runs {recipe.runtime}, not TensorRT: there is nothing to compile; "
                          "use a TensorRT target (e.g. --target jetson-orin)")
    if component not in graph_components():
        raise RecipeError(f"component {component!r} is not compiled by TensorRT; use one of "
                          f"{', '.join(graph_components())}")
    flavor = flavor or default_flavor(recipe)
    if flavor not in FLAVORS:
        raise RecipeError(f"unknown TensorRT flavor {flavor!r}; use one of {', '.join(FLAVORS)}")
    info = FLAVORS[flavor]
    trt = recipe.tensorrt
    cc = recipe.device.cc_str
    precision = precision or recipe.precision_of(component)
    kind = graph_kind(graph, precision)
    if kind == "fp8" and not (trt.fp8 and has_fp8(cc)):
        raise RecipeError(f"{component}: the graph holds FP8 Q/DQ but {recipe.device.name} (compute capability {cc}) "
                          f"has no FP8 (needs 8.9+); rebuild the bundle with --target {recipe.name}")
    aot_cc = None
    if info.ahead_of_time:
        if cc not in RTX_COMPUTE_CAPABILITIES:
            raise RecipeError(f"{recipe.name}: TensorRT-RTX builds for compute capability "
                              f"{', '.join(RTX_COMPUTE_CAPABILITIES)}, not {cc} ({recipe.device.name}); build with "
                              "full TensorRT on the device (pip install tensorrt there)")
        aot_cc = cc
    dla_core = trt.dla.core if recipe.on_dla(component) else None
    if dla_core is None:
        weak, flags, clear = _GPU_MODES[info.weak_typing][kind]
    elif info.weak_typing:
        weak, clear = True, ()
        flags = ("FP16",) + (("INT8",) if kind.startswith("int8") else ()) + \
            (("GPU_FALLBACK",) if trt.dla.gpu_fallback else ())
    elif kind in ("fp32", "int8-fp32-base"):
        raise RecipeError(f"{component}: {flavor} takes DLA precision from the graph's types and this graph is fp32; "
                          "re-quantize it on an fp16 base or take it off tensorrt.dla.components")
    else:
        weak, flags, clear = False, (("GPU_FALLBACK",) if trt.dla.gpu_fallback else ()), ()
    return BuilderSettings(
        component=component, precision=precision, flavor=flavor, strongly_typed=not weak,
        network_flags=("STRONGLY_TYPED",) if not weak and info.strongly_typed_flag else (), flags=flags,
        clear_flags=clear, optimization_level=trt.builder.optimization_level,
        workspace_bytes=trt.builder.workspace_mib << 20, timing_cache=trt.builder.timing_cache and info.timing_cache,
        dla_core=dla_core, compute_capability=aot_cc)


@dataclass(frozen=True)
class ResolvedSettings:
    """BuilderSettings as the installed module's real enum members."""
    network_flags: int
    flags: tuple[Any, ...]
    clear_flags: tuple[Any, ...]
    workspace_pool: Any
    dla_device: Any | None
    compute_capability: Any | None


def _member(trt: ModuleType, enum: str, name: str, settings: BuilderSettings) -> Any:
    value = getattr(getattr(trt, enum, None), name, None)
    if value is None:
        version = getattr(trt, "__version__", "?")
        raise CompileError(f"{settings.component}: {trt.__name__} {version} has no {enum}.{name}, which "
                           f"{settings.flavor} settings use; this TensorRT is another flavor: compile with "
                           "`mova-export compile`, which picks the settings for what is installed")
    return value


def resolve_settings(settings: BuilderSettings, trt: ModuleType) -> ResolvedSettings:
    """Map every name in `settings` to the module's enum member; CompileError naming the first one it lacks (e.g.
    BuilderFlag.FP16 on TensorRT 11.x or RTX) instead of an AttributeError in the middle of a build."""
    network = 0
    for name in settings.network_flags:
        network |= 1 << int(_member(trt, "NetworkDefinitionCreationFlag", name, settings))
    return ResolvedSettings(
        network_flags=network,
        flags=tuple(_member(trt, "BuilderFlag", n, settings) for n in settings.flags),
        clear_flags=tuple(_member(trt, "BuilderFlag", n, settings) for n in settings.clear_flags),
        workspace_pool=_member(trt, "MemoryPoolType", "WORKSPACE", settings),
        dla_device=None if settings.dla_core is None else _member(trt, "DeviceType", "DLA", settings),
        compute_capability=None if settings.compute_capability is None else _member(
            trt, "ComputeCapability", sm_name(settings.compute_capability), settings))


__all__ = ["BuilderSettings", "ResolvedSettings", "builder_settings", "default_flavor", "graph_kind",
           "resolve_settings"]

"""TensorRT compile: a bundle's ONNX graphs -> serialized engines on the target device (TensorRT 10 Python API).

Everything that decides *how* an engine is built is pure Python and tested on CPU:
  recipe + component + graph facts -> `BuilderSettings` (a frozen dataclass), engine metadata, the compatibility
  check `check_engine_metadata`, and `can_compile_here`. The only code touching `tensorrt` is `engine_from_onnx`
  and `current_device`, which import it lazily (it is not installable on the CI machines).

Network mode, per graph (TensorRT 10):
  * DLA components: weakly typed with the FP16 (+INT8) flag, default_device_type=DLA, DLA_core, GPU_FALLBACK
    (TensorRT 10 DLA builds take precision from builder flags; strong typing for DLA only arrives in 11.x);
  * FP8 Q/DQ graphs and graphs already typed fp16 (our fp16 variant keeps norms in fp32; modelopt's outputs):
    STRONGLY_TYPED, no precision flags: TensorRT follows the ONNX types, so fp32 norms stay fp32;
  * INT8 Q/DQ graphs over fp32: weakly typed, INT8 + FP16 (fp16 fallback for the layers outside Q/DQ);
  * fp32 graphs: weakly typed, no flags, TF32 cleared (the fp32 budget is near-exact).
Engines are not portable across GPUs or TensorRT versions: each engine gets `<engine>.json` metadata and
`check_engine_metadata` refuses a mismatch with the command to rebuild on the device.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .errors import BundleError, CompileError, RecipeError
from .recipe import Recipe, cache_key, graph_components

ENGINE_DIR = "engines"
TIMING_CACHE = "engines/timing.cache"
METADATA_SUFFIX = ".json"


# ---- facts about one ONNX graph (CPU, via onnx) ---------------------------------------------------------------------
@dataclass(frozen=True)
class GraphInfo:
    sha256: str
    qdq: tuple[str, ...] = ()            # quantized types in Q/DQ nodes: "int8", "fp8"
    float_types: tuple[str, ...] = ("fp32",)   # float types of the graph's tensors: fp32, fp16

    @property
    def fp16_typed(self) -> bool:
        return "fp16" in self.float_types


def inspect_graph(path: str | Path, sha256: str | None = None) -> GraphInfo:
    """Q/DQ types and float types of an ONNX graph (initializers and value types; external data not loaded)."""
    import onnx

    from .bundle import sha256_file

    model = onnx.load(str(path), load_external_data=False)
    names = {onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "int8", onnx.TensorProto.FLOAT8E4M3FN: "fp8",
             onnx.TensorProto.FLOAT: "fp32", onnx.TensorProto.FLOAT16: "fp16"}
    g = model.graph
    types = {init.name: init.data_type for init in g.initializer}
    for vi in [*g.input, *g.output, *g.value_info]:
        types.setdefault(vi.name, vi.type.tensor_type.elem_type)
    qdq: set[str] = set()
    for node in g.node:
        if node.op_type == "QuantizeLinear":
            zp = node.input[2] if len(node.input) > 2 and node.input[2] else None
            attr = {a.name: a.i for a in node.attribute}
            dtype = types.get(zp) if zp else attr.get("output_dtype") or onnx.TensorProto.UINT8
            qdq.add(names.get(dtype, "int8"))
        elif node.op_type == "DequantizeLinear" and types.get(node.input[0]) in names:
            if names[types[node.input[0]]] in ("int8", "fp8"):
                qdq.add(names[types[node.input[0]]])
    floats = {names[t] for t in types.values() if t in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)}
    return GraphInfo(sha256 or sha256_file(Path(path)), tuple(sorted(qdq)), tuple(sorted(floats)) or ("fp32",))


# ---- recipe -> builder settings (pure) ------------------------------------------------------------------------------
@dataclass(frozen=True)
class BuilderSettings:
    component: str
    precision: str                       # the graph variant built: int8 | fp8 | fp16 | fp32
    strongly_typed: bool                 # NetworkDefinitionCreationFlag.STRONGLY_TYPED (else flags 0)
    flags: tuple[str, ...]               # BuilderFlag names to set: FP16, INT8, GPU_FALLBACK
    clear_flags: tuple[str, ...]         # BuilderFlag names to clear: TF32
    optimization_level: int
    workspace_bytes: int
    timing_cache: bool
    dla_core: int | None                 # None: GPU
    static_shapes: bool = True

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def builder_settings(recipe: Recipe, component: str, graph: GraphInfo | None = None,
                     precision: str | None = None) -> BuilderSettings:
    """How to build `component` for `recipe` (see the module doc for the rules). `precision` is the variant being
    built (default: the recipe's); `graph` refines the choice with the graph's real Q/DQ and float types."""
    if recipe.tensorrt is None:
        raise RecipeError(f"recipe {recipe.name} runs {recipe.runtime}, not TensorRT: there is nothing to compile; "
                          "use a TensorRT target (e.g. --target jetson-orin)")
    if component not in graph_components():
        raise RecipeError(f"component {component!r} is not compiled by TensorRT; use one of {', '.join(graph_components())}")
    trt = recipe.tensorrt
    precision = precision or recipe.precision_of(component)
    qdq = set(graph.qdq) if graph else ({"int8"} if precision == "int8" else {"fp8"} if precision == "fp8" else set())
    if "fp8" in qdq and not trt.fp8:
        raise RecipeError(f"{component}: the graph holds FP8 Q/DQ but {recipe.device.name} (compute capability "
                          f"{recipe.device.cc_str}) has no FP8; rebuild the bundle with --target {recipe.name}")
    dla = recipe.on_dla(component)
    common = dict(component=component, precision=precision, optimization_level=trt.builder.optimization_level,
                  workspace_bytes=trt.builder.workspace_mib << 20, timing_cache=trt.builder.timing_cache)
    if dla:
        flags = ["FP16"] + (["INT8"] if "int8" in qdq else [])
        if trt.dla.gpu_fallback:
            flags.append("GPU_FALLBACK")
        return BuilderSettings(strongly_typed=False, flags=tuple(flags), clear_flags=(), dla_core=trt.dla.core,
                               **common)
    if "fp8" in qdq or precision == "fp16" or (graph is not None and graph.fp16_typed):
        return BuilderSettings(strongly_typed=True, flags=(), clear_flags=(), dla_core=None, **common)
    if "int8" in qdq:
        flags = ("INT8", "FP16") if trt.fp16 else ("INT8",)
        return BuilderSettings(strongly_typed=False, flags=flags, clear_flags=(), dla_core=None, **common)
    return BuilderSettings(strongly_typed=False, flags=(), clear_flags=("TF32",), dla_core=None, **common)


# ---- the device and engine metadata ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceInfo:
    tensorrt_version: str | None         # None: tensorrt not importable
    gpu_name: str | None                 # None: no CUDA GPU found
    compute_capability: str | None       # "8.7"


def current_device() -> DeviceInfo:
    """TensorRT version (lazy import) and the first CUDA GPU (torch.cuda, else nvidia-smi); None where absent."""
    try:
        import tensorrt as trt

        version: str | None = trt.__version__
    except ImportError:
        version = None
    name = cc = None
    try:
        import torch

        if torch.cuda.is_available():
            name = torch.cuda.get_device_name(0)
            cc = "%d.%d" % torch.cuda.get_device_capability(0)
    except Exception:  # noqa: BLE001 - a broken CUDA install is "no GPU" here
        name = None
    if name is None and shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20, check=True).stdout.strip().splitlines()
            if out:
                name, cc = (s.strip() for s in out[0].rsplit(",", 1))
        except (OSError, subprocess.SubprocessError, ValueError):
            name = cc = None
    return DeviceInfo(version, name, cc)


@dataclass(frozen=True)
class EngineMetadata:
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    source_graph: str                    # bundle-relative path of the ONNX graph
    source_graph_sha256: str
    component: str
    precision: str
    dla_core: int | None
    builder: Mapping[str, Any]           # BuilderSettings.to_json()
    recipe: str
    compile_key: str                     # recipe.cache_key(recipe, "compile")
    engine_sha256: str = ""
    engine_bytes: int = 0
    build_s: float = 0.0
    created_utc: str = ""

    def to_json(self) -> dict[str, Any]:
        return {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any], source: str = "engine metadata") -> "EngineMetadata":
        names = {f for f in cls.__dataclass_fields__}
        missing = [f for f in ("tensorrt_version", "gpu_name", "compute_capability", "source_graph",
                               "source_graph_sha256", "component", "precision") if f not in raw]
        if missing:
            raise BundleError(f"{source} lacks {', '.join(missing)}; rebuild the engine with `mova-export compile`")
        return cls(**{k: v for k, v in raw.items() if k in names})


def read_engine_metadata(engine_path: str | Path) -> EngineMetadata:
    path = Path(str(engine_path) + METADATA_SUFFIX)
    if not path.is_file():
        raise BundleError(f"engine {engine_path} has no metadata file {path.name}; rebuild it with "
                          "`mova-export compile BUNDLE` on this device")
    try:
        return EngineMetadata.from_json(json.loads(path.read_text()), source=str(path))
    except json.JSONDecodeError:
        raise BundleError(f"{path} is not valid JSON; rebuild the engine with `mova-export compile`") from None


def check_engine_metadata(meta: EngineMetadata, current: DeviceInfo, graph_sha256: str | None = None,
                          bundle: str | Path = "BUNDLE") -> None:
    """Refuse an engine built for another TensorRT version, GPU, compute capability or source graph: one line
    naming both sides and the fix. `graph_sha256`: the bundle's current hash of the source graph, when known."""
    fix = f"run `mova-export compile {bundle}` on this device"
    what = f"engine for {meta.component} ({meta.precision})"
    if current.tensorrt_version is None:
        raise BundleError(f"{what} needs TensorRT {meta.tensorrt_version}, which is not importable here; install "
                          "it (pip install 'mova-export[tensorrt]') or use the ONNX graphs with ONNX Runtime")
    checks = (("TensorRT version", meta.tensorrt_version, current.tensorrt_version),
              ("GPU", meta.gpu_name, current.gpu_name or "no CUDA GPU"),
              ("compute capability", meta.compute_capability, current.compute_capability or "none"))
    for label, built, here in checks:
        if str(built) != str(here):
            raise BundleError(f"{what} was built with {label} {built} but this device has {here}; engines do not "
                              f"move between GPUs or TensorRT versions: {fix}")
    if graph_sha256 is not None and graph_sha256 != meta.source_graph_sha256:
        raise BundleError(f"{what} was built from {meta.source_graph} with sha256 {meta.source_graph_sha256[:12]} "
                          f"but the bundle's graph now has {graph_sha256[:12]}; the engine is stale: {fix}")


@dataclass(frozen=True)
class CompileCheck:
    ok: bool
    reason: str
    command: str                         # what to run (here when ok, else on the device)
    device: DeviceInfo = field(default_factory=lambda: DeviceInfo(None, None, None))


def can_compile_here(recipe: Recipe, bundle: str | Path = "BUNDLE",
                     device: DeviceInfo | None = None) -> CompileCheck:
    """Whether engines for `recipe` can be built on this machine: TensorRT importable and a CUDA GPU whose
    compute capability matches the recipe. Otherwise `reason` says why and `command` is what to run on the device."""
    command = f"mova-export compile {bundle} --target {recipe.name}"
    device = device if device is not None else current_device()
    if recipe.tensorrt is None:
        return CompileCheck(False, f"recipe {recipe.name} runs {recipe.runtime}: there are no TensorRT engines to "
                            "build; the ONNX graphs run as they are", "", device)
    where = f"on the {recipe.device.name} (copy the bundle there first)"
    if device.gpu_name is None:
        return CompileCheck(False, f"no CUDA GPU here; TensorRT engines for {recipe.name} must be built on the "
                            f"target: run `{command}` {where}", command, device)
    if device.compute_capability != recipe.device.cc_str:
        return CompileCheck(False, f"this GPU ({device.gpu_name}, compute capability {device.compute_capability}) "
                            f"is not the target's ({recipe.device.name}, {recipe.device.cc_str}); run `{command}` "
                            f"{where}", command, device)
    if device.tensorrt_version is None:
        return CompileCheck(False, "the TensorRT Python package is not importable here; install it (pip install "
                            f"'mova-export[tensorrt]', or JetPack's python3-libnvinfer) and run `{command}`",
                            command, device)
    if device.tensorrt_version.split(".")[0] != "10":
        return CompileCheck(False, f"TensorRT {device.tensorrt_version} is installed; mova-export builds with "
                            f"TensorRT 10.x: install tensorrt>=10,<11 and run `{command}`", command, device)
    return CompileCheck(True, f"TensorRT {device.tensorrt_version} and {device.gpu_name} "
                        f"({device.compute_capability}) match {recipe.name}", command, device)


# ---- the thin TensorRT part -----------------------------------------------------------------------------------------
def engine_from_onnx(onnx_path: str | Path, engine_path: str | Path, settings: BuilderSettings,
                     timing_cache_path: str | Path | None = None) -> float:
    """Parse the ONNX graph, configure the builder from `settings`, build and write the serialized engine.
    Loads/saves the timing cache when given. Returns the build time in seconds; raises CompileError listing every
    parser error."""
    try:
        import tensorrt as trt
    except ImportError:
        raise CompileError("the TensorRT Python package is not importable here; install it on the target device "
                           "(pip install 'mova-export[tensorrt]') and run `mova-export compile BUNDLE` there") from None
    start = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if settings.strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)).replace("\n", " ") for i in range(parser.num_errors)]
        raise CompileError(f"TensorRT cannot parse {onnx_path} ({len(errors)} error(s)): {' | '.join(errors)}; "
                           "re-export the graph or report the unsupported op")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    config.builder_optimization_level = settings.optimization_level
    for name in settings.flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    for name in settings.clear_flags:
        config.clear_flag(getattr(trt.BuilderFlag, name))
    if settings.dla_core is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = settings.dla_core
    cache = None
    if settings.timing_cache and timing_cache_path is not None:
        blob = Path(timing_cache_path).read_bytes() if Path(timing_cache_path).is_file() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise CompileError(f"TensorRT failed to build an engine from {onnx_path} ({settings.component}, "
                           f"{settings.precision}); see the TensorRT log above, or try precision fp16 in the recipe")
    engine_path = Path(engine_path)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(bytes(serialized))
    if cache is not None:
        Path(timing_cache_path).write_bytes(bytes(cache.serialize()))
    return time.perf_counter() - start


# ---- a bundle -> engines --------------------------------------------------------------------------------------------
def select_variant(graph_entry: Mapping[str, Any], wanted: str, component: str) -> str:
    """The graph variant to compile: the recipe's precision, else the fallback the quantizer left (fp16, fp32)."""
    variants = graph_entry.get("variants", {})
    for candidate in dict.fromkeys((wanted, "fp16", "fp32")):
        if candidate in variants:
            return candidate
    raise BundleError(f"bundle has no {wanted}, fp16 or fp32 graph for {component}; rebuild it with "
                      "`mova-export build`")


def engine_path_for(component: str, precision: str) -> str:
    return f"{ENGINE_DIR}/{component}.{precision}.engine"


def compile_bundle(bundle_path: str | Path, recipe: Recipe, components: Sequence[str] | None = None, *,
                   device: DeviceInfo | None = None, build: Callable[..., float] = engine_from_onnx,
                   log: Callable[[str], None] = lambda _: None) -> list[EngineMetadata]:
    """Build one engine per graph component of the bundle for `recipe` (must pass `can_compile_here`), write
    `<engine>.json` metadata next to each and the timing cache in the bundle, and record them in manifest.json
    (`engines` section and `files` table). Engines whose metadata already matches are kept (stage reuse)."""
    from .bundle import MANIFEST, load_bundle, sha256_file

    check = can_compile_here(recipe, bundle_path, device)
    if not check.ok:
        raise CompileError(check.reason)
    dev = check.device
    bundle = load_bundle(bundle_path)
    root = bundle.path
    manifest = dict(bundle.manifest)
    graphs = manifest.get("graphs", {})
    names = list(components) if components is not None else [c for c in graph_components() if c in graphs]
    key = cache_key(recipe, "compile")
    results: list[EngineMetadata] = []
    engines = dict(manifest.get("engines", {}))
    for comp in names:
        if comp not in graphs:
            raise BundleError(f"bundle {root} has no {comp} graph; it holds {', '.join(graphs)}")
        precision = select_variant(graphs[comp], recipe.precision_of(comp), comp)
        rel_graph = graphs[comp]["variants"][precision]["graph"]
        graph_sha = manifest["files"][rel_graph]["sha256"]
        rel_engine = engine_path_for(comp, precision)
        engine = root / rel_engine
        if engine.is_file() and Path(str(engine) + METADATA_SUFFIX).is_file():
            old = read_engine_metadata(engine)
            try:
                check_engine_metadata(old, dev, graph_sha, root)
                if old.compile_key == key:
                    log(f"{comp}: engine up to date ({rel_engine})")
                    results.append(old)
                    continue
            except BundleError:
                pass
        settings = builder_settings(recipe, comp, inspect_graph(root / rel_graph, graph_sha), precision)
        mode = "strongly typed" if settings.strongly_typed else "+".join(settings.flags) or "fp32"
        dla = f", DLA core {settings.dla_core}" if settings.dla_core is not None else ""
        log(f"{comp}: building {rel_engine} ({precision}, {mode}{dla})")
        build_s = build(root / rel_graph, engine, settings, root / TIMING_CACHE if settings.timing_cache else None)
        meta = EngineMetadata(
            tensorrt_version=str(dev.tensorrt_version), gpu_name=str(dev.gpu_name),
            compute_capability=str(dev.compute_capability), source_graph=rel_graph, source_graph_sha256=graph_sha,
            component=comp, precision=precision, dla_core=settings.dla_core, builder=settings.to_json(),
            recipe=recipe.name, compile_key=key, engine_sha256=sha256_file(engine),
            engine_bytes=engine.stat().st_size, build_s=round(float(build_s), 2),
            created_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        Path(str(engine) + METADATA_SUFFIX).write_text(json.dumps(meta.to_json(), indent=2) + "\n")
        engines[comp] = {"engine": rel_engine, "metadata": rel_engine + METADATA_SUFFIX, "precision": precision}
        results.append(meta)
    files = dict(manifest.get("files", {}))
    for p in sorted((root / ENGINE_DIR).rglob("*")) if (root / ENGINE_DIR).is_dir() else []:
        if p.is_file():
            files[p.relative_to(root).as_posix()] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    manifest["engines"] = engines
    manifest["files"] = files
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return results


__all__ = ["BuilderSettings", "CompileCheck", "CompileError", "DeviceInfo", "EngineMetadata", "GraphInfo",
           "builder_settings", "can_compile_here", "check_engine_metadata", "compile_bundle", "current_device",
           "engine_from_onnx", "inspect_graph", "read_engine_metadata", "select_variant"]

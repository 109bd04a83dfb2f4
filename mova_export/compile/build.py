"""The one builder: ONNX graph + BuilderSettings -> serialized engine, for every flavor, written against the Python
APIs of TensorRT 10.3 / 11.x and TensorRT-RTX 1.7 (flavors.py lists the calls and where they were checked).

What differs per flavor comes from the settings (network flags, builder flags, the ahead-of-time compute capability,
whether a timing cache applies); the parse, the layer profile, the config and the build are shared.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import CompileError
from ..core.progress import Log, quiet
from ..core.tensorrt_flavors import has_fp8, import_flavor
from .layers import LayerProfile, layer_profile, parse_onnx
from .settings import BuilderSettings, resolve_settings

TIMING_CACHE_DIR = "engines/timing"


@dataclass(frozen=True)
class BuildResult:
    seconds: float
    engine_bytes: int
    layers: LayerProfile
    timing_cache: str                    # "" (none) | "new" | "loaded" | "mismatch: <what>, started a new one"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()


def timing_cache_path(gpu_name: str, flavor: str, version: str) -> str:
    """Bundle-relative timing cache of one (GPU, flavor + version): a cache never crosses GPUs or TensorRT versions."""
    return f"{TIMING_CACHE_DIR}/{_slug(gpu_name)}.{flavor}-{_slug(version)}.cache"


def engine_from_onnx(onnx_path: str | Path, engine_path: str | Path, settings: BuilderSettings,
                     timing_cache: str | Path | None = None, log: Log = quiet) -> BuildResult:
    """Parse the ONNX graph with TensorRT's parser, configure the builder from `settings`, build and write the
    serialized engine (and the timing cache when given and the flavor has one). CompileError for parser errors
    (all listed), a DLA core the device lacks, a compute capability the flavor cannot target, a failed build."""
    cc = settings.compute_capability
    if settings.precision == "fp8" and cc is not None and not has_fp8(cc):
        raise CompileError(f"{settings.component}: FP8 needs compute capability 8.9+ and the target is {cc}; build "
                           "the int8 or fp16 graph for it (a bundle for that target: mova-export build --target ...)")
    trt = import_flavor(settings.flavor)
    resolved = resolve_settings(settings, trt)
    start = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder, network, _parser = parse_onnx(trt, onnx_path, resolved.network_flags, logger)
    if settings.dla_core is not None and settings.dla_core >= builder.num_DLA_cores:
        raise CompileError(f"{settings.component} is set for DLA core {settings.dla_core} but this device has "
                           f"{builder.num_DLA_cores} DLA core(s) (builder.num_DLA_cores); build on an Orin AGX/NX "
                           "or take it off tensorrt.dla.components")
    layers = layer_profile(network, trt)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(resolved.workspace_pool, settings.workspace_bytes)
    config.builder_optimization_level = settings.optimization_level
    for flag in resolved.flags:
        config.set_flag(flag)
    for flag in resolved.clear_flags:
        config.clear_flag(flag)
    if resolved.dla_device is not None:
        config.default_device_type = resolved.dla_device
        config.DLA_core = settings.dla_core
    if settings.shape_profile:   # symbolic dimensions: one profile over the sizes they take
        profile = builder.create_optimization_profile()
        for name, low, opt, high in settings.shape_profile:
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)
    if resolved.compute_capability is not None:
        config.num_compute_capabilities = 1
        if not config.set_compute_capability(resolved.compute_capability, 0):
            raise CompileError(f"{settings.flavor} refused compute capability {settings.compute_capability} for "
                               f"{settings.component}; pick a target it lists (flavors.RTX_COMPUTE_CAPABILITIES)")
    cache, cache_status = None, ""
    if settings.timing_cache and timing_cache is not None:
        cache_file = Path(timing_cache)
        blob = cache_file.read_bytes() if cache_file.is_file() else b""
        cache = config.create_timing_cache(blob)
        cache_status = "loaded" if blob else "new"
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            cache_status = f"mismatch: {cache_file.name} was written by another GPU or TensorRT, started a new one"
            log(f"{settings.component}: timing cache {cache_status}")
            cache = config.create_timing_cache(b"")
            if not config.set_timing_cache(cache, ignore_mismatch=False):
                raise CompileError(f"TensorRT refused a new timing cache for {settings.component}; set "
                                   "tensorrt.builder.timing_cache: false in the recipe")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise CompileError(f"TensorRT failed to build an engine from {onnx_path} ({settings.component}, "
                           f"{settings.precision}, {settings.flavor}); see the TensorRT log above, or try precision "
                           "fp16 in the recipe")
    engine_path = Path(engine_path)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(memoryview(serialized))
    if cache is not None:
        Path(timing_cache).parent.mkdir(parents=True, exist_ok=True)
        Path(timing_cache).write_bytes(memoryview(cache.serialize()))
    return BuildResult(time.perf_counter() - start, serialized.nbytes, layers, cache_status)


__all__ = ["BuildResult", "TIMING_CACHE_DIR", "engine_from_onnx", "timing_cache_path"]

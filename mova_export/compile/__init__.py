"""TensorRT compile: a bundle's ONNX graphs -> serialized engines, with one builder for three flavors.

Modules (imports go one way, top to bottom; the flavor table - tensorrt-10, tensorrt >= 10.12 / 11.x, tensorrt-rtx,
and the API facts behind it - is mova_export.core.tensorrt_flavors, which the device runtime reads too):
  graph     GraphInfo / inspect_graph: Q/DQ and float types of an ONNX graph (onnx only)
  settings  BuilderSettings (frozen) from recipe + component + graph + flavor; resolution against a module's enums
  host      select_flavor, can_compile_here (DeviceInfo / current_device live in core.platforms: the runtime
            reads them too); on a Jetson the JetPack it runs must be the recipe's (`--target NAME@jetpackX.Y`)
  metadata  EngineMetadata (<engine>.json, with the platform it was built for) and the refusal of an engine that
            does not belong on this device (core.platforms.check_platform)
  layers    LayerProfile: a parsed network's compute layers by output dtype (what strong typing will run in fp32)
  build     engine_from_onnx: the one TensorRT builder; timing cache per (GPU, flavor + version)
  parity    engine_parity: each engine against its ONNX graph on a GPU, "unverified" elsewhere
  engines   compile_engines / compile_bundle: the bundle's graphs -> engines, metadata, the manifest's engines

Everything but `build`, `layers.parse_onnx/profile_onnx` and `parity.engine_parity` is pure Python and runs without
TensorRT; those import the flavor's module lazily.
"""
from ..core.errors import CompileError
from ..core.tensorrt_flavors import FLAVORS, RTX_COMPUTE_CAPABILITIES, Flavor, import_flavor, installed_flavors
from .build import BuildResult, engine_from_onnx, timing_cache_path
from .engines import ENGINE_DIR, EngineTools, compile_bundle, compile_engines, engine_key, engine_path_for
from .graph import GraphInfo, inspect_graph
from .host import CompileCheck, DeviceInfo, FlavorChoice, can_compile_here, current_device, select_flavor
from .layers import LayerProfile, layer_profile, profile_onnx
from .metadata import METADATA_SUFFIX, EngineMetadata, check_engine_metadata, read_engine_metadata
from .parity import EngineParity, check_engine_parity, engine_parity
from .settings import BuilderSettings, builder_settings, default_flavor, resolve_settings

__all__ = ["BuildResult", "BuilderSettings", "CompileCheck", "CompileError", "DeviceInfo", "ENGINE_DIR",
           "EngineMetadata", "EngineParity", "EngineTools", "FLAVORS", "Flavor", "FlavorChoice", "GraphInfo",
           "LayerProfile", "METADATA_SUFFIX", "RTX_COMPUTE_CAPABILITIES", "builder_settings", "can_compile_here",
           "check_engine_metadata", "check_engine_parity", "compile_bundle", "compile_engines", "current_device",
           "default_flavor", "engine_from_onnx", "engine_key", "engine_parity", "engine_path_for", "import_flavor",
           "inspect_graph", "installed_flavors", "layer_profile", "profile_onnx", "read_engine_metadata",
           "resolve_settings", "select_flavor", "timing_cache_path"]

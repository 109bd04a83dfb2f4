"""`<engine>.json`: what an engine was built with, from what, and how it compared with its graph; the refusal of an
engine that does not belong on this device.

Engines do not move between TensorRT flavors or versions, CUDA majors or JetPack releases; full-TensorRT engines are
tuned for one GPU, TensorRT-RTX engines for one compute capability (any GPU of it: `gpu_name` is None) and
specialised at first run. The platform fields are core.platforms.EnginePlatform's (the runtime checks the same
record from the manifest).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..core.errors import BundleError
from ..core.platforms import DeviceInfo, EnginePlatform, check_platform

METADATA_SUFFIX = ".json"
REQUIRED = ("flavor", "tensorrt_version", "compute_capability", "source_graph", "source_graph_sha256", "component",
            "precision")


@dataclass(frozen=True)
class EngineMetadata:
    flavor: str                          # tensorrt-10 | tensorrt | tensorrt-rtx
    tensorrt_version: str
    compute_capability: str
    gpu_name: str | None                 # the GPU it was tuned on; None: built ahead of time for the capability
    source_graph: str                    # bundle-relative path of the ONNX graph
    source_graph_sha256: str
    component: str
    precision: str
    dla_core: int | None = None
    builder: Mapping[str, Any] = field(default_factory=dict)     # BuilderSettings.to_json()
    recipe: str = ""
    compile_key: str = ""                # engines.engine_key: settings, graph sha256, flavor and version
    engine_sha256: str = ""
    engine_bytes: int = 0
    build_s: float = 0.0
    created_utc: str = ""
    timing_cache: str = ""               # "" (none) | "loaded" | "new" | "mismatch: ..." (see build.py)
    layers: Mapping[str, Any] = field(default_factory=dict)      # layers.LayerProfile.to_json(), after parsing
    parity: Mapping[str, Any] = field(default_factory=dict)      # parity.EngineParity.to_json()
    cuda_major: int | None = None        # the CUDA major the building TensorRT is built against
    jetpack: str | None = None           # the JetPack line it was built on ("6.2"); None off a Jetson
    l4t: str | None = None               # the Jetson Linux release it was built on ("36.4.3")
    built_on: str = ""                   # OS and CPU of the machine that built it ("linux-x86_64")

    @property
    def platform(self) -> EnginePlatform:
        return EnginePlatform(self.flavor, self.tensorrt_version, self.compute_capability, self.gpu_name,
                              self.cuda_major, self.jetpack, self.l4t, self.built_on)

    def to_json(self) -> dict[str, Any]:
        return {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any], source: str = "engine metadata") -> "EngineMetadata":
        missing = [f for f in REQUIRED if f not in raw]
        if missing:
            raise BundleError(f"{source} lacks {', '.join(missing)}; rebuild the engine with `mova-export compile`")
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in raw.items() if k in names})


def metadata_path(engine_path: str | Path) -> Path:
    return Path(str(engine_path) + METADATA_SUFFIX)


def write_engine_metadata(engine_path: str | Path, meta: EngineMetadata) -> Path:
    path = metadata_path(engine_path)
    path.write_text(json.dumps(meta.to_json(), indent=2) + "\n")
    return path


def read_engine_metadata(engine_path: str | Path) -> EngineMetadata:
    path = metadata_path(engine_path)
    if not path.is_file():
        raise BundleError(f"engine {engine_path} has no metadata file {path.name}; rebuild it with "
                          "`mova-export compile BUNDLE`")
    try:
        return EngineMetadata.from_json(json.loads(path.read_text()), source=str(path))
    except json.JSONDecodeError:
        raise BundleError(f"{path} is not valid JSON; rebuild the engine with `mova-export compile`") from None


def check_engine_metadata(meta: EngineMetadata, current: DeviceInfo, graph_sha256: str | None = None,
                          bundle: str | Path = "BUNDLE") -> None:
    """Refuse an engine built for another platform (JetPack release, compute capability, flavor or version, CUDA
    major, tuned GPU: core.platforms.check_platform) or from another graph: one line naming both sides and the
    command that rebuilds it. `graph_sha256`: the bundle's current hash of the source graph."""
    what = f"engine for {meta.component} ({meta.precision})"
    check_platform(meta.platform, current, what, meta.recipe, bundle)
    if graph_sha256 is not None and graph_sha256 != meta.source_graph_sha256:
        raise BundleError(f"{what} was built from {meta.source_graph} with sha256 {meta.source_graph_sha256[:12]} "
                          f"but the bundle's graph now has {graph_sha256[:12]}; the engine is stale: run "
                          f"`mova-export compile {bundle}` with the TensorRT that runs it")


__all__ = ["EngineMetadata", "METADATA_SUFFIX", "check_engine_metadata", "metadata_path", "read_engine_metadata",
           "write_engine_metadata"]

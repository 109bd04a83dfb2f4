"""A bundle's ONNX graphs -> engines with metadata, parity against their graphs, and the manifest's `engines` table.

One key per engine, `engine_key`: a hash of the builder settings (which carry every recipe field a build reads), the
source graph's sha256 and the flavor and version that build it. `mova-export compile` (an engine in the bundle is
kept when its metadata carries the same key) and the build's work units (pipeline/stages/compile.py) both use it.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ..bundle import link_or_copy, load_bundle, staged_dir, terminate_as_interrupt
from ..bundle.files import FileTable, sha256_file
from ..core.errors import CompileError
from ..core.platforms import host_platform
from ..core.progress import Log, quiet
from ..export.calibration import read_feeds
from ..recipe import Recipe
from .build import BuildResult, engine_from_onnx, timing_cache_path
from .graph import inspect_graph
from .host import DeviceInfo, FlavorChoice, can_compile_here
from .metadata import EngineMetadata, metadata_path, read_engine_metadata, write_engine_metadata
from .parity import EngineParity, check_engine_parity, engine_parity
from .settings import BuilderSettings, builder_settings, shape_profile

if TYPE_CHECKING:  # pragma: no cover
    from ..bundle import Manifest

ENGINE_DIR = "engines"


def engine_path_for(graph: str, precision: str) -> str:
    return f"{ENGINE_DIR}/{graph}.{precision}.engine"


def engine_key(settings: BuilderSettings, graph_sha256: str, flavor: str, version: str) -> str:
    """16 hex digits over exactly what an engine's bytes depend on."""
    blob = json.dumps({"settings": settings.to_json(), "graph": graph_sha256, "flavor": flavor, "version": version},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class EnginePlan:
    """One graph's engine as the bundle and the flavor at hand decide it."""
    graph: str
    component: str
    precision: str
    source_graph: str                    # bundle-relative ONNX graph
    graph_sha256: str
    settings: BuilderSettings
    engine: str                          # bundle-relative engine path
    key: str


def plan_engine(root: Path, manifest: "Manifest", recipe: Recipe, name: str, files: FileTable,
                choice: FlavorChoice) -> EnginePlan:
    """What `name`'s engine is built from and with (the shipped variant of the graph, BuilderSettings for the flavor,
    the optimization profile of its symbolic dimensions) and its key."""
    graph = manifest.graph(name)
    precision = manifest.runtime.precision.get(name, recipe.precision_of(graph.component))
    rel_graph = graph.variant(precision, root).graph
    graph_sha = files.sha256(rel_graph)
    settings = replace(builder_settings(recipe, graph.component, inspect_graph(root / rel_graph, graph_sha),
                                        precision, flavor=choice.flavor),
                       shape_profile=shape_profile(graph.inputs, graph.axes))
    return EnginePlan(name, graph.component, precision, rel_graph, graph_sha, settings,
                      engine_path_for(name, precision), engine_key(settings, graph_sha, choice.flavor, choice.version))


def _reusable(old: EngineMetadata, plan: EnginePlan, choice: FlavorChoice, device: DeviceInfo) -> bool:
    """An engine from an earlier compile with the same key, built for this GPU (or ahead of time)."""
    return old.compile_key == plan.key and old.source_graph_sha256 == plan.graph_sha256 \
        and old.gpu_name in (None, device.gpu_name)


@dataclass(frozen=True)
class EngineTools:
    """How engines are built and checked: TensorRT's builder and the engine-vs-graph parity by default; the tests
    hand in stand-ins to run the bookkeeping without a GPU."""
    build: Callable[..., BuildResult] = engine_from_onnx
    verify: Callable[..., EngineParity] = engine_parity


@dataclass
class _Compiler:
    """One compile of one bundle folder: the flavor chosen, the device, the tools, and where the log goes."""
    root: Path
    manifest: "Manifest"
    recipe: Recipe
    choice: FlavorChoice
    device: DeviceInfo
    tools: EngineTools
    log: Log

    @property
    def cache_rel(self) -> str:
        gpu = None if self.choice.ahead_of_time else self.device.gpu_name
        return timing_cache_path(gpu or f"sm{self.recipe.device.cc_str}", self.choice.flavor, self.choice.version)

    def feeds(self, graph: str) -> list[dict]:
        """The bundle's check feed of a graph (stored fp16), back in the graph's input dtypes."""
        rel = self.manifest.checks.get(graph)
        if not rel:
            return []
        dtypes = {t.name: t.dtype for t in self.manifest.graphs[graph].inputs}
        return [{k: v.astype(dtypes.get(k, v.dtype)) for k, v in feed.items()} for feed in read_feeds(self.root / rel)]

    def checked_parity(self, engine: Path, graph: Path, name: str, component: str, precision: str,
                       dla_core: int | None) -> EngineParity:
        """The engine against its graph; an engine below the recipe's budget for `precision` is removed and
        refused."""
        parity = self.tools.verify(engine, graph, self.feeds(name), compute_capability=self.recipe.device.cc_str,
                                   device=self.device, flavor=self.choice.flavor, dla_core=dla_core)
        budget = self.recipe.accuracy.get(precision)
        if budget is not None:
            try:
                check_engine_parity(parity, component, precision, budget.min_cosine)
            except CompileError:
                engine.unlink()  # an engine below budget never ships
                raise
        return parity

    def verified(self, old: EngineMetadata, plan: EnginePlan) -> EngineMetadata:
        """An engine built ahead of time, checked once its GPU is here (its metadata rewritten when it ran)."""
        engine = self.root / plan.engine
        parity = self.checked_parity(engine, self.root / plan.source_graph, plan.graph, old.component, old.precision,
                                     old.dla_core)
        if parity.status != "verified":
            return old
        meta = replace(old, parity=parity.to_json())
        write_engine_metadata(engine, meta)
        return meta

    def build_one(self, plan: EnginePlan) -> EngineMetadata:
        settings, cc, choice = plan.settings, self.recipe.device.cc_str, self.choice
        mode = "strongly typed" if settings.strongly_typed else "+".join(settings.flags) or "fp32"
        target = f"for SM{cc.replace('.', '')} ahead of time" if choice.ahead_of_time else f"on {self.device.gpu_name}"
        dla = f", DLA core {settings.dla_core}" if settings.dla_core is not None else ""
        self.log(f"{plan.graph}: building {plan.engine} ({plan.precision}, {choice.flavor} {choice.version}, {mode}"
                 f"{dla}, {target})")
        engine, graph = self.root / plan.engine, self.root / plan.source_graph
        built = self.tools.build(graph, engine, settings,
                                 self.root / self.cache_rel if settings.timing_cache else None, log=self.log)
        parity = self.checked_parity(engine, graph, plan.graph, plan.component, plan.precision, settings.dla_core)
        self.log(f"{plan.graph}: {built.engine_bytes / 2**20:.1f} MiB in {built.seconds:.1f} s, "
                 f"{built.layers.fp32_share:.0%} of compute layers fp32, parity "
                 + (f"cosine {parity.cosine:.6f}" if parity.status == "verified" else f"unverified ({parity.reason})"))
        jetpack = None if choice.ahead_of_time else self.device.jetpack
        meta = EngineMetadata(
            flavor=choice.flavor, tensorrt_version=choice.version, compute_capability=cc,
            gpu_name=None if choice.ahead_of_time else self.device.gpu_name, source_graph=plan.source_graph,
            source_graph_sha256=plan.graph_sha256, component=plan.component, precision=plan.precision,
            dla_core=settings.dla_core, builder=settings.to_json(), recipe=self.recipe.name, compile_key=plan.key,
            engine_sha256=sha256_file(engine), engine_bytes=engine.stat().st_size, build_s=round(built.seconds, 2),
            created_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"), timing_cache=built.timing_cache,
            layers=built.layers.to_json(), parity=parity.to_json(), cuda_major=self.device.cuda_major(choice.flavor),
            jetpack=jetpack.version if jetpack else None, l4t=None if jetpack is None else self.device.l4t,
            built_on=host_platform())
        write_engine_metadata(engine, meta)
        return meta


def compile_engines(root: Path, manifest: "Manifest", recipe: Recipe, graphs: Sequence[str] | None = None, *,
                    device: DeviceInfo | None = None, files: FileTable | None = None,
                    tools: EngineTools = EngineTools(), log: Log = quiet) -> list[EngineMetadata]:
    """Build one engine per graph of the bundle folder `root` (the shipped variant of each) for `recipe` with the
    flavor `can_compile_here` picks; write `<engine>.json` next to each (flavor, version, compute capability, graph
    sha256, settings, key, layer profile, parity against the graph: verified where the target GPU is here, else
    "unverified"), keep the timing cache per (GPU, flavor + version), and record them in `manifest.engines` (the
    caller writes the manifest). An engine already in root whose metadata carries the same key is kept. `files`: the
    build's file table (graphs are not hashed again; each engine is added once). CompileError when an engine misses
    the recipe's budget."""
    check = can_compile_here(recipe, root, device)
    if not check.ok or check.flavor is None:
        raise CompileError(check.reason)
    files = files if files is not None else FileTable(root)
    compiler = _Compiler(root, manifest, recipe, check.flavor, check.device, tools, log)
    results: list[EngineMetadata] = []
    for name in (list(graphs) if graphs is not None else list(manifest.graphs)):
        plan = plan_engine(root, manifest, recipe, name, files, check.flavor)
        engine = root / plan.engine
        meta = read_engine_metadata(engine) if engine.is_file() and metadata_path(engine).is_file() else None
        if meta is not None and _reusable(meta, plan, check.flavor, check.device):
            if meta.parity.get("status") != "verified":  # built ahead of time: verify it once its GPU is here
                meta = compiler.verified(meta, plan)
            log(f"{name}: engine up to date ({plan.engine}, parity {meta.parity.get('status')})")
        else:
            meta = compiler.build_one(plan)
        files.add(plan.engine, meta.engine_sha256)
        manifest.engines[name] = _entry(plan.engine, meta)
        results.append(meta)
    return results


def _entry(rel_engine: str, meta: EngineMetadata) -> dict[str, Any]:
    """The manifest's engines[graph]: what the runtime and inspect need without opening the metadata file."""
    return {"engine": rel_engine, "metadata": metadata_path(rel_engine).as_posix(), "precision": meta.precision,
            "flavor": meta.flavor, "tensorrt_version": meta.tensorrt_version,
            "compute_capability": meta.compute_capability, "dla_core": meta.dla_core,
            "verified": meta.parity.get("status") == "verified", "parity": meta.parity, "recipe": meta.recipe,
            "platform": meta.platform.to_json()}


def compile_bundle(bundle_path: str | Path, recipe: Recipe, graphs: Sequence[str] | None = None, *,
                   device: DeviceInfo | None = None, tools: EngineTools = EngineTools(),
                   log: Log = quiet) -> list[EngineMetadata]:
    """`mova-export compile BUNDLE`: compile_engines on an existing bundle, rewritten atomically (a failure leaves it
    as it was): its files are linked into a staged copy, the engines built there, the manifest written, renamed."""
    bundle = load_bundle(bundle_path)      # verifies every file's sha256: the table below is not hashed again
    manifest = bundle.manifest
    with terminate_as_interrupt(), staged_dir(bundle.path, overwrite=True) as tmp:
        for rel in [*manifest.files, "build.log"]:
            if (bundle.path / rel).is_file():
                link_or_copy(bundle.path / rel, tmp / rel)
        for cache in (bundle.path / ENGINE_DIR / "timing").glob("*.cache"):   # the caches carry over
            link_or_copy(cache, tmp / cache.relative_to(bundle.path))
        files = FileTable(tmp, {rel: e for rel, e in manifest.files.items() if not rel.startswith(f"{ENGINE_DIR}/")})
        results = compile_engines(tmp, manifest, recipe, graphs, device=device, files=files, tools=tools, log=log)
        if manifest.target is not None and manifest.target.get("recipe") != recipe.name:
            log(f"the bundle now targets {recipe.name} (was {manifest.target.get('recipe')})")
            manifest.target = {**manifest.target, "recipe": recipe.name, "jetpack": recipe.device.jetpack}
        manifest.write(tmp, files)
    return results


__all__ = ["ENGINE_DIR", "EnginePlan", "EngineTools", "compile_bundle", "compile_engines", "engine_key", "engine_path_for",
           "plan_engine"]

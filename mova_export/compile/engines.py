"""A bundle's ONNX graphs -> engines with metadata, parity against their graphs, and the manifest's `engines` table."""
from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ..errors import BundleError, CompileError
from ..recipe import Recipe, cache_key
from .build import BuildResult, engine_from_onnx, timing_cache_path
from .graph import inspect_graph
from .host import DeviceInfo, FlavorChoice, can_compile_here
from .metadata import EngineMetadata, metadata_path, read_engine_metadata, write_engine_metadata
from .parity import EngineParity, check_engine_parity, engine_parity
from .settings import builder_settings, shape_profile

if TYPE_CHECKING:  # pragma: no cover
    from ..bundle import Manifest

ENGINE_DIR = "engines"
Log = Callable[[str], None]


def engine_path_for(graph: str, precision: str) -> str:
    return f"{ENGINE_DIR}/{graph}.{precision}.engine"


def _reusable(old: EngineMetadata, choice: FlavorChoice, cc: str, device: DeviceInfo, graph_sha: str, key: str) -> bool:
    """An engine from an earlier compile of the same graph, recipe fields, flavor, version and target."""
    return (old.flavor, old.tensorrt_version, old.compute_capability, old.source_graph_sha256, old.compile_key) == \
        (choice.flavor, choice.version, cc, graph_sha, key) and old.gpu_name in (None, device.gpu_name)


def _feeds(root: Path, manifest: "Manifest", graph: str) -> list[dict]:
    """The bundle's held-out feed of a graph (stored fp16), back in the graph's input dtypes."""
    rel = manifest.checks.get(graph)
    if not rel:
        return []
    from ..export import read_feeds

    dtypes = {t.name: t.dtype for t in manifest.graphs[graph].inputs}
    return [{k: v.astype(dtypes.get(k, v.dtype)) for k, v in feed.items()} for feed in read_feeds(root / rel)]


def _checked_parity(engine: Path, graph: Path, recipe: Recipe, precision: str, component: str, device: DeviceInfo,
                    verify: Callable[..., EngineParity], feeds: list[dict], flavor: str,
                    dla_core: int | None) -> EngineParity:
    """The engine against its graph; an engine below the recipe's budget for `precision` is removed and refused."""
    parity = verify(engine, graph, feeds, compute_capability=recipe.device.cc_str, device=device, flavor=flavor,
                    dla_core=dla_core)
    budget = recipe.accuracy.get(precision)
    if budget is not None:
        try:
            check_engine_parity(parity, component, precision, budget.min_cosine)
        except CompileError:
            engine.unlink()  # an engine below budget never ships
            raise
    return parity


def _verified(old: EngineMetadata, engine: Path, graph: Path, recipe: Recipe, device: DeviceInfo,
              verify: Callable[..., EngineParity], feeds: list[dict]) -> EngineMetadata:
    parity = _checked_parity(engine, graph, recipe, old.precision, old.component, device, verify, feeds, old.flavor,
                             old.dla_core)
    if parity.status != "verified":
        return old
    meta = replace(old, parity=parity.to_json())
    write_engine_metadata(engine, meta)
    return meta


def compile_engines(root: Path, manifest: "Manifest", recipe: Recipe, graphs: Sequence[str] | None = None, *,
                    device: DeviceInfo | None = None, build: Callable[..., BuildResult] = engine_from_onnx,
                    verify: Callable[..., EngineParity] = engine_parity,
                    log: Log = lambda _: None) -> list[EngineMetadata]:
    """Build one engine per graph of the bundle folder `root` (the shipped variant of each) for `recipe` with the
    flavor `can_compile_here` picks; write `<engine>.json` next to each (flavor, version, compute capability, graph
    sha256, settings, layer profile, parity against the graph: verified where the target GPU is here, else
    "unverified"), keep the timing cache per (GPU, flavor + version), and record them in `manifest.engines` (the
    caller writes the manifest). An engine already in root whose metadata matches is kept. CompileError when an
    engine misses the recipe's budget."""
    from ..bundle import sha256_file, file_table

    check = can_compile_here(recipe, root, device)
    if not check.ok or check.flavor is None:
        raise CompileError(check.reason)
    dev, choice = check.device, check.flavor
    cc = recipe.device.cc_str
    names = list(graphs) if graphs is not None else list(manifest.graphs)
    gpu = None if choice.ahead_of_time else dev.gpu_name
    cache_rel = timing_cache_path(gpu or f"sm{cc}", choice.flavor, choice.version)
    files = file_table(root, skip=("manifest.json", "build.log"))
    results: list[EngineMetadata] = []
    for name in names:
        graph = manifest.graph(name)
        precision = manifest.runtime.precision.get(name, recipe.precision_of(graph.component))
        rel_graph = graph.variant(precision, root).graph
        graph_sha = files[rel_graph]["sha256"]
        key = cache_key(recipe, "compile", graph.component)
        rel_engine = engine_path_for(name, precision)
        engine = root / rel_engine
        if engine.is_file() and metadata_path(engine).is_file():
            old = read_engine_metadata(engine)
            if _reusable(old, choice, cc, dev, graph_sha, key):
                if old.parity.get("status") != "verified":  # built ahead of time: verify it once its GPU is here
                    old = _verified(old, engine, root / rel_graph, recipe, dev, verify, _feeds(root, manifest, name))
                log(f"{name}: engine up to date ({rel_engine}, parity {old.parity.get('status')})")
                manifest.engines[name] = _entry(rel_engine, old)
                results.append(old)
                continue
        settings = replace(builder_settings(recipe, graph.component, inspect_graph(root / rel_graph, graph_sha),
                                            precision, flavor=choice.flavor),
                           shape_profile=shape_profile(graph.inputs, graph.axes))
        mode = "strongly typed" if settings.strongly_typed else "+".join(settings.flags) or "fp32"
        target = f"for SM{cc.replace('.', '')} ahead of time" if choice.ahead_of_time else f"on {dev.gpu_name}"
        dla = f", DLA core {settings.dla_core}" if settings.dla_core is not None else ""
        log(f"{name}: building {rel_engine} ({precision}, {choice.flavor} {choice.version}, {mode}{dla}, {target})")
        built = build(root / rel_graph, engine, settings, root / cache_rel if settings.timing_cache else None,
                      log=log)
        parity = _checked_parity(engine, root / rel_graph, recipe, precision, name, dev, verify,
                                 _feeds(root, manifest, name), choice.flavor, settings.dla_core)
        log(f"{name}: {built.engine_bytes / 2**20:.1f} MiB in {built.seconds:.1f} s, "
            f"{built.layers.fp32_share:.0%} of compute layers fp32, parity "
            + (f"cosine {parity.cosine:.6f}" if parity.status == "verified" else f"unverified ({parity.reason})"))
        meta = EngineMetadata(
            flavor=choice.flavor, tensorrt_version=choice.version, compute_capability=cc, gpu_name=gpu,
            source_graph=rel_graph, source_graph_sha256=graph_sha, component=graph.component, precision=precision,
            dla_core=settings.dla_core, builder=settings.to_json(), recipe=recipe.name, compile_key=key,
            engine_sha256=sha256_file(engine), engine_bytes=engine.stat().st_size, build_s=round(built.seconds, 2),
            created_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"), timing_cache=built.timing_cache,
            layers=built.layers.to_json(), parity=parity.to_json())
        write_engine_metadata(engine, meta)
        manifest.engines[name] = _entry(rel_engine, meta)
        results.append(meta)
    return results


def _entry(rel_engine: str, meta: EngineMetadata) -> dict[str, Any]:
    """The manifest's engines[graph]: what the runtime and inspect need without opening the metadata file."""
    return {"engine": rel_engine, "metadata": metadata_path(rel_engine).as_posix(), "precision": meta.precision,
            "flavor": meta.flavor, "tensorrt_version": meta.tensorrt_version,
            "compute_capability": meta.compute_capability, "dla_core": meta.dla_core,
            "verified": meta.parity.get("status") == "verified", "parity": meta.parity}


def compile_bundle(bundle_path: str | Path, recipe: Recipe, graphs: Sequence[str] | None = None, *,
                   device: DeviceInfo | None = None, build: Callable[..., BuildResult] = engine_from_onnx,
                   verify: Callable[..., EngineParity] = engine_parity,
                   log: Log = lambda _: None) -> list[EngineMetadata]:
    """`mova-export compile BUNDLE`: compile_engines on an existing bundle, rewritten atomically (a failure leaves it
    as it was): its files are linked into a staged copy, the engines built there, the manifest written, renamed."""
    from ..bundle import link_or_copy, load_bundle, staged_dir, terminate_as_interrupt

    bundle = load_bundle(bundle_path)
    manifest = bundle.manifest
    with terminate_as_interrupt(), staged_dir(bundle.path, overwrite=True) as tmp:
        for rel in [*manifest.files, "build.log"]:
            if (bundle.path / rel).is_file():
                link_or_copy(bundle.path / rel, tmp / rel)
        for cache in (bundle.path / ENGINE_DIR / "timing").glob("*.cache"):   # the caches carry over
            link_or_copy(cache, tmp / cache.relative_to(bundle.path))
        results = compile_engines(tmp, manifest, recipe, graphs, device=device, build=build, verify=verify, log=log)
        manifest.write(tmp)
    return results


__all__ = ["ENGINE_DIR", "compile_bundle", "compile_engines", "engine_path_for"]

"""A bundle's ONNX graphs -> engines with metadata, parity against their graphs, and the manifest's `engines` table."""
from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..errors import BundleError, CompileError
from ..recipe import COMPONENTS, Recipe, cache_key
from .build import BuildResult, engine_from_onnx, timing_cache_path
from .graph import inspect_graph
from .host import DeviceInfo, FlavorChoice, can_compile_here
from .metadata import EngineMetadata, metadata_path, read_engine_metadata, write_engine_metadata
from .parity import EngineParity, check_engine_parity, engine_parity
from .settings import builder_settings

ENGINE_DIR = "engines"
Log = Callable[[str], None]


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


def _reusable(old: EngineMetadata, choice: FlavorChoice, cc: str, device: DeviceInfo, graph_sha: str, key: str) -> bool:
    """An engine from an earlier compile of the same graph, recipe fields, flavor, version and target."""
    return (old.flavor, old.tensorrt_version, old.compute_capability, old.source_graph_sha256, old.compile_key) == \
        (choice.flavor, choice.version, cc, graph_sha, key) and old.gpu_name in (None, device.gpu_name)


def _feeds(root: Path, manifest: Mapping[str, Any], component: str) -> list[dict]:
    entry = (manifest.get("calibration") or {}).get(component)
    if not entry:
        return []
    from ..calibration import read_feeds

    return read_feeds(root / entry["file"])


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


def compile_bundle(bundle_path: str | Path, recipe: Recipe, components: Sequence[str] | None = None, *,
                   device: DeviceInfo | None = None, build: Callable[..., BuildResult] = engine_from_onnx,
                   verify: Callable[..., EngineParity] = engine_parity,
                   log: Log = lambda _: None) -> list[EngineMetadata]:
    """Build one engine per graph component of the bundle for `recipe` with the flavor `can_compile_here` picks,
    write `<engine>.json` next to each (flavor, version, compute capability, graph sha256, settings, layer profile,
    parity against the graph: verified where the target GPU is here, else "unverified"), keep the timing cache per
    (GPU, flavor + version), and record them in manifest.json (`engines` section and `files` table). Engines whose
    metadata already matches are kept (stage reuse). CompileError when an engine misses the recipe's budget."""
    import json

    from ..bundle import MANIFEST, load_bundle, sha256_file

    check = can_compile_here(recipe, bundle_path, device)
    if not check.ok or check.flavor is None:
        raise CompileError(check.reason)
    dev, choice = check.device, check.flavor
    cc = recipe.device.cc_str
    bundle = load_bundle(bundle_path)
    root = bundle.path
    manifest = dict(bundle.manifest)
    graphs = manifest.get("graphs", {})
    names = list(components) if components is not None else [c for c in COMPONENTS if c in graphs]
    key = cache_key(recipe, "compile")
    gpu = None if choice.ahead_of_time else dev.gpu_name
    cache_rel = timing_cache_path(gpu or f"sm{cc}", choice.flavor, choice.version)
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
        if engine.is_file() and metadata_path(engine).is_file():
            old = read_engine_metadata(engine)
            if _reusable(old, choice, cc, dev, graph_sha, key):
                if old.parity.get("status") != "verified":  # built ahead of time: verify it once its GPU is here
                    old = _verified(old, engine, root / rel_graph, recipe, dev, verify, _feeds(root, manifest, comp))
                log(f"{comp}: engine up to date ({rel_engine}, parity {old.parity.get('status')})")
                engines[comp] = {**engines.get(comp, {}), "parity": old.parity.get("status")}
                results.append(old)
                continue
        settings = builder_settings(recipe, comp, inspect_graph(root / rel_graph, graph_sha), precision,
                                    flavor=choice.flavor)
        mode = "strongly typed" if settings.strongly_typed else "+".join(settings.flags) or "fp32"
        target = f"for SM{cc.replace('.', '')} ahead of time" if choice.ahead_of_time else f"on {dev.gpu_name}"
        dla = f", DLA core {settings.dla_core}" if settings.dla_core is not None else ""
        log(f"{comp}: building {rel_engine} ({precision}, {choice.flavor} {choice.version}, {mode}{dla}, {target})")
        built = build(root / rel_graph, engine, settings, root / cache_rel if settings.timing_cache else None,
                      log=log)
        parity = _checked_parity(engine, root / rel_graph, recipe, precision, comp, dev, verify,
                                 _feeds(root, manifest, comp), choice.flavor, settings.dla_core)
        log(f"{comp}: {built.engine_bytes / 2**20:.1f} MiB in {built.seconds:.1f} s, "
            f"{built.layers.fp32_share:.0%} of compute layers fp32, parity "
            + (f"cosine {parity.cosine:.6f}" if parity.status == "verified" else f"unverified ({parity.reason})"))
        meta = EngineMetadata(
            flavor=choice.flavor, tensorrt_version=choice.version, compute_capability=cc, gpu_name=gpu,
            source_graph=rel_graph, source_graph_sha256=graph_sha, component=comp, precision=precision,
            dla_core=settings.dla_core, builder=settings.to_json(), recipe=recipe.name, compile_key=key,
            engine_sha256=sha256_file(engine), engine_bytes=engine.stat().st_size, build_s=round(built.seconds, 2),
            created_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"), timing_cache=built.timing_cache,
            layers=built.layers.to_json(), parity=parity.to_json())
        write_engine_metadata(engine, meta)
        engines[comp] = {"engine": rel_engine, "metadata": metadata_path(rel_engine).as_posix(),
                         "precision": precision, "flavor": choice.flavor, "parity": parity.status}
        results.append(meta)
    files = dict(manifest.get("files", {}))
    for p in sorted((root / ENGINE_DIR).rglob("*")) if (root / ENGINE_DIR).is_dir() else []:
        if p.is_file():
            files[p.relative_to(root).as_posix()] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    manifest["engines"] = engines
    manifest["files"] = files
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return results


__all__ = ["ENGINE_DIR", "compile_bundle", "engine_path_for", "select_variant"]

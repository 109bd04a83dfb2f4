"""`mova-export build`: checkpoint + target recipe -> a device-ready bundle, in one command; `export` and
`gguf --bundle` are the same machinery with fewer stages.

    features   every tower's and the text encoder's PyTorch output on the parity images (stages/features.py)
    export     static fp32 and fp16 ONNX graphs per component form, parity vs PyTorch, calibration feeds
    quantize   explicit Q/DQ per graph the recipe quantizes, judged on held-out images, fallback
    gguf       the LLM as GGUF of the recipe's quant type
    assemble   the shipped variant of every graph, tokenizers, GGUFs, check feeds (assemble.py)
    plan       peak-memory prediction for the target; a bundle that cannot fit is refused with a fix
    compile    TensorRT engines where a flavor here can build for the target; otherwise the command to run
    report     report.md / report.json, then the manifest (every file hashed once: bundle.FileTable)

The bundle is written into a temp folder beside the output and renamed at the end: an error, Ctrl-C or SIGTERM
leaves no bundle (the previous one untouched) and keeps every finished unit in the work folder for the next run.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from ..bundle import (
    FileTable,
    LLMEntry,
    LLMSettings,
    Manifest,
    RuntimeDefaults,
    checkpoint_fingerprint,
    link_or_copy,
    load_bundle,
    staged_dir,
    terminate_as_interrupt,
    tool_versions,
)
from ..bundle.manifest import BUILD_LOG, MANIFEST
from ..bundle.signing import check_signing_key, read_signature, sign_bundle
from ..components import all_specs, component_names, facts_from_config, get_spec
from ..core.errors import BuildError, BundleError, ComponentError
from ..core.memory import return_large_blocks_when_freed
from ..core.progress import Console
from ..core.qtypes import QTYPES
from ..export import load_calibration
from ..recipe import Recipe, graph_components, load_recipe
from ..source.checkpoint import Checkpoint
from .assemble import new_manifest, recipe_manifest, ship_variant
from .plan import plan_from_manifest
from .report import build_report, dump, render_report_markdown
from .request import BuildRequest
from .stages import compile_stage, gguf, run_exports
from .unit import BuildContext, StageRecord
from .work import WorkFolder


@dataclass
class BuildResult:
    bundle: Path
    records: list[StageRecord]
    report: dict[str, Any]
    manifest: Manifest
    compile: dict[str, Any] = field(default_factory=dict)
    signature: Any = None        # bundle.signing.Signature when the build signed the bundle (--sign-key)


def check_components(components: Sequence[str] | None) -> list[str]:
    """The graph components to build, in pipeline order (default: all of them)."""
    allowed = graph_components()
    if components is None:
        return list(allowed)
    names = list(dict.fromkeys(components))
    if not names:
        raise ComponentError(f"no component selected; choose from {', '.join(allowed)}")
    for name in names:
        if get_spec(name).kind == "llm":   # get_spec: ComponentError naming an unknown component
            raise ComponentError(f"component {name!r} is not exported to ONNX: the LLM goes to GGUF (its own stage); "
                                 f"choose from {', '.join(allowed)}")
    order = component_names()
    return sorted(names, key=order.index)


def _feeders() -> list[str]:
    return [s.name for s in all_specs() if s.kind in ("tower", "text")]


def _context(request: BuildRequest, checkpoint: Checkpoint, console: Console) -> BuildContext:
    """Everything the stages share, opened once: the checkpoint's fingerprint, the calibration set, the model facts,
    the work folder."""
    full_sweep = checkpoint.config.scale != "full" if request.full_sweep is None else request.full_sweep
    return BuildContext(checkpoint, checkpoint_fingerprint(checkpoint.path), load_calibration(request.calib),
                        facts_from_config(checkpoint.config), WorkFolder(request.work_dir), console,
                        reuse=request.reuse, full_sweep=full_sweep)


@contextmanager
def _session(ctx: BuildContext, out: Path, overwrite: bool, start: float,
             sign: Callable[[Path], Any] | None = None) -> Iterator[Path]:
    """The staged bundle folder with build.log in it, SIGTERM as an interrupt, and the closing line of a build;
    `sign` runs on the finished folder (build.log closed) before it is renamed into place."""
    with terminate_as_interrupt(), staged_dir(out, overwrite=overwrite) as tmp:
        ctx.console.log_to(tmp / BUILD_LOG)
        try:
            stale = ctx.work.partials()
            if stale:
                ctx.console.line(f"work folder: {len(stale)} unit(s) left by an interrupted run are redone "
                                 "(`mova-export clean --partials` removes them)")
            yield tmp
        finally:
            reused = sum(r.status == "reused" for r in ctx.records)
            ctx.console.line(f"{reused} unit(s) reused from the work folder, {len(ctx.records) - reused} computed, "
                             f"{time.perf_counter() - start:.1f} s")
            ctx.console.close()
        if sign is not None:
            sign(tmp)


def build(request: BuildRequest, console: Console | None = None) -> BuildResult:
    """Build the bundle for `request.target` (a recipe name, alias or YAML path) from `request.checkpoint` into
    `request.out`. Raises a MoVAExportError subclass (recipe, checkpoint, calibration, export, quantization, memory,
    disk) with no bundle written; a previous bundle at `out` stays untouched, finished units stay in the work
    folder."""
    start = time.perf_counter()
    return_large_blocks_when_freed()                      # an hour of 10-400 MB arrays: keep the heap from holding them
    if request.target is None:
        raise BuildError("a build needs a target recipe (--target); `mova-export export` writes graphs without one")
    recipe = load_recipe(request.target)                  # RecipeError names the field
    checkpoint = Checkpoint.open(request.checkpoint)      # CheckpointError names the file and key
    names = check_components(request.components)
    _check_replaceable(request.out)
    sign = _signer(request)
    ctx = _context(request, checkpoint, console or Console(quiet=request.quiet))
    with _session(ctx, request.out, True, start, sign) as tmp:
        ctx.console.line(f"building {recipe.name} ({recipe.description}) from {checkpoint.path}; work folder "
                         f"{ctx.work.root}; calibration: {len(ctx.calibration.labels)} images "
                         f"({ctx.calibration.source})")
        if recipe.platform_note:   # a Jetson target says which JetPack it assumed
            ctx.console.line(f"{recipe.name}: {recipe.platform_note}")
        exported = run_exports(ctx, names, _feeders())
        manifest = recipe_manifest(ctx, tmp, recipe, exported, request.also_precisions, request.also_llm)
        result = _finish(ctx, tmp, request, recipe, manifest)
    if sign is not None:
        result.signature = read_signature(request.out)
    return result


def _signer(request: BuildRequest) -> Callable[[Path], Any] | None:
    """--sign-key: the key is checked now (a bad key or password fails before the build, not after it); the step
    returned signs the finished folder, every file and the manifest included."""
    if request.sign_key is None:
        return None
    check_signing_key(request.sign_key, request.sign_password)
    return lambda root: sign_bundle(root, request.sign_key, password=request.sign_password, verify=False)


def _check_replaceable(out_dir: Path) -> None:
    """A build replaces a previous bundle at --out (rebuilding in place is the usual loop), never other files."""
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file():
        raise BuildError(f"output folder {out_dir} is not empty and holds no mova-export bundle; choose a new folder "
                         "(a build replaces only a previous bundle)")


def _finish(ctx: BuildContext, root: Path, request: BuildRequest, recipe: Recipe, manifest: Manifest
            ) -> BuildResult:
    """Plan, compile where possible, report, and write the manifest (the rename happens when the caller's block
    ends). Every file is hashed once: the table made here gets the engines and the report added."""
    files = FileTable(root).scan(skip=(MANIFEST, BUILD_LOG))
    absent = [c for c in graph_components() if manifest.graph_of_component(c) is None]
    plan = plan_from_manifest(recipe, manifest, files=files.entries,
                              params={c: ctx.component_bytes(c) // 4 for c in absent})
    ctx.console.line(f"memory plan: {plan.message}" + (f"; {plan.fix}" if plan.fix else ""))
    if plan.verdict == "refuse" and not request.allow_over_budget:
        raise BuildError(f"{plan.message}; {plan.fix} (or pass --allow-over-budget to write the bundle anyway)")
    manifest.memory_plan = plan.to_json()
    compile_info = compile_stage(ctx, root, recipe, manifest, files, request.compile, request.out)
    manifest.stages = {f"{r.stage}/{r.name}": r.to_json() for r in ctx.records}
    manifest.stages["compile"] = compile_info
    report = build_report(manifest, recipe.name, ctx.records)
    (root / "report.json").write_text(dump(report))
    (root / "report.md").write_text(render_report_markdown(report))
    manifest.report = {"json": "report.json", "markdown": "report.md"}
    manifest.write(root, files)
    ctx.console.line(f"bundle for {recipe.name} written to {request.out} (report: {request.out / 'report.md'})")
    return BuildResult(request.out, list(ctx.records), report, manifest, compile_info)


def export_bundle(request: BuildRequest, console: Console | None = None) -> Manifest:
    """`mova-export export`: the components' graphs at `request.export_precisions`, each proven against PyTorch, in
    a bundle with the tokenizers and no LLM (`mova-export gguf --bundle` adds one); the same units as `build`."""
    start = time.perf_counter()
    checkpoint = Checkpoint.open(request.checkpoint)
    names = check_components(request.components)
    ctx = _context(request, checkpoint, console or Console(quiet=request.quiet))
    with _session(ctx, request.out, request.overwrite, start) as tmp:
        exported = run_exports(ctx, names, _feeders())
        graphs = {}
        for unit in exported.values():
            for graph in unit.result.graphs:
                graphs[graph.name] = entry = type(graph).from_json({**graph.to_json(), "variants": {}})
                for p in request.export_precisions:
                    entry.variants[p] = ship_variant(tmp, graph.variants[p], unit.path)
        manifest = new_manifest(ctx, tmp, graphs,
                                runtime=RuntimeDefaults(precision={n: request.export_precisions[0] for n in graphs}))
        manifest.stages = {f"{r.stage}/{r.name}": r.to_json() for r in ctx.records}
        manifest.write(tmp)
    return manifest


def attach_llm(bundle_dir: str | Path, checkpoint: str | Path, qtype: str, *, work_dir: str | Path | None = None,
               default: bool = True, console: Console | None = None) -> LLMEntry:
    """Add the checkpoint's LLM as `llm/model.<qtype>.gguf` to an existing bundle (verified first, rewritten
    atomically: a failure leaves it as it was). default: make it the GGUF the runtime loads."""

    if qtype not in QTYPES:
        raise BundleError(f"unknown LLM quant type {qtype!r}; use one of {', '.join(QTYPES)}")
    bundle = load_bundle(bundle_dir)           # verifies every file: the table below is not hashed again
    request = BuildRequest(checkpoint, bundle.path, work_dir=work_dir)
    ckpt = Checkpoint.open(request.checkpoint)
    ctx = _context(request, ckpt, console or Console(quiet=True))
    if ctx.fingerprint != bundle.manifest.source_checkpoint.get("digest"):
        raise BundleError(f"{ckpt.path} is not the checkpoint bundle {bundle.path} was built from (fingerprints "
                          "differ); pass the bundle's own checkpoint")
    manifest = bundle.manifest
    with terminate_as_interrupt(), staged_dir(bundle.path, overwrite=True) as tmp:
        for rel in manifest.files:
            link_or_copy(bundle.path / rel, tmp / rel)
        path, info = gguf(ctx, qtype)
        settings = manifest.llm.settings if manifest.llm else LLMSettings()
        entry = LLMEntry(f"llm/{path.name}", qtype, info["n_embd"], info["n_vocab"], settings, info.get("convert_s"))
        link_or_copy(path, tmp / entry.gguf)
        manifest.llms[qtype] = entry
        if default or manifest.llm is None:
            manifest.llm = entry
        manifest.tools.update(tool_versions())
        manifest.write(tmp, FileTable(tmp, {r: e for r, e in manifest.files.items() if r != entry.gguf}))
    return entry

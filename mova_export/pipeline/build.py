"""`mova-export build`: checkpoint + target recipe -> a device-ready bundle, in one command.

Stages, each a unit per component in the work folder (pipeline/work.py) under a key of exactly its inputs:

  features  every tower's and the text encoder's output on the calibration images (parity references, the
            adapter's samples)
  export    static fp32 and fp16 ONNX graphs per component form, parity vs PyTorch, calibration feeds
  quantize  explicit Q/DQ per graph the recipe quantizes (INT8, FP8 where the target has it), accuracy budget,
            fallback
  gguf      the LLM as GGUF of the recipe's quant type
  plan      peak-memory prediction for the target; a bundle that cannot fit is refused with a fix
  assemble  the shipped variant of every graph (hard links into the work folder's files), tokenizers, the GGUF,
            held-out feeds for engine parity (TensorRT targets), manifest, report.md/json, build.log
  compile   TensorRT engines where a TensorRT flavor can build for the target; otherwise the command to run

The bundle is written into a temp folder beside the output for the whole build and renamed at the end: an error,
Ctrl-C or SIGTERM leaves no bundle (the previous one untouched) and keeps every finished unit for the next run.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..bundle import (GraphEntry, LLMEntry, LLMSettings, Manifest, RuntimeDefaults, Variant, checkpoint_fingerprint,
                      link_or_copy, staged_dir, terminate_as_interrupt, tool_versions)
from ..errors import BuildError, ComponentError
from ..progress import Console
from .stages import BuildContext, StageRecord, export_stage, features_key, features_stage, gguf_stage, quantize_stage
from .work import WorkFolder

LLM_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                       "chat_template.jinja", "generation_config.json")
_WEIGHT_SUFFIXES = (".bin", ".safetensors", ".pt", ".pth", ".ckpt", ".onnx", ".gguf", ".h5", ".msgpack")


@dataclass
class BuildResult:
    bundle: Path
    records: list[StageRecord]
    report: dict[str, Any]
    manifest: Manifest
    compile: dict[str, Any] = field(default_factory=dict)


def check_components(components: Sequence[str] | None) -> list[str]:
    """The graph components to build, in pipeline order (default: all of them)."""
    from ..components import component_names, get_spec
    from ..recipe import graph_components

    allowed = graph_components()
    if components is None:
        return list(allowed)
    names = list(dict.fromkeys(components))
    if not names:
        raise ComponentError(f"no component selected; choose from {', '.join(allowed)}")
    for name in names:
        spec = get_spec(name)  # ComponentError naming an unknown component
        if spec.kind == "llm":
            raise ComponentError(f"component {name!r} is not exported to ONNX: the LLM goes to GGUF (its own stage); "
                                 f"choose from {', '.join(allowed)}")
    order = component_names()
    return sorted(names, key=order.index)


def _run_exports(ctx: BuildContext, names: Sequence[str], simplify: bool = True
                 ) -> dict[str, tuple[Any, Path, str]]:
    """features + export units for `names`: {component: (ExportedComponent, unit folder, export key)}. The adapter's
    samples need every tower's and the text encoder's features, whether or not they are exported."""
    from ..components import all_specs, get_spec
    from .stages import export_key

    feeders = [s.name for s in all_specs() if s.kind in ("tower", "text")]
    needs = feeders if any(get_spec(n).kind == "adapter" for n in names) else [n for n in names if n in feeders]
    features = {name: features_stage(ctx, name) for name in needs}
    keys = {name: features_key(ctx, name) for name in needs}
    out = {}
    for name in names:
        kind = get_spec(name).kind
        upstream = features if kind == "adapter" else {name: features[name]}
        upstream_keys = keys if kind == "adapter" else {name: keys[name]}
        result, unit = export_stage(ctx, name, upstream, upstream_keys, simplify)
        out[name] = (result, unit, export_key(ctx, name, upstream_keys, simplify))
    return out


def _copy_tokenizers(ckpt: Any, root: Path) -> dict[str, Any]:
    from ..errors import CheckpointError

    out: dict[str, Any] = {}
    llm_files = [ckpt.path / n for n in LLM_TOKENIZER_FILES if (ckpt.path / n).is_file()]
    if not llm_files:
        raise CheckpointError(f"{ckpt.path} has no LLM tokenizer files ({', '.join(LLM_TOKENIZER_FILES[:2])})")
    llm_dir = root / "tokenizer" / "llm"
    llm_dir.mkdir(parents=True)
    for f in llm_files:
        shutil.copy2(f, llm_dir / f.name)
    out["llm"] = {"dir": "tokenizer/llm", "files": sorted(f.name for f in llm_files)}
    text_src = Path(ckpt.text_tokenizer_dir)
    text_files = [f for f in sorted(text_src.iterdir()) if f.is_file() and f.suffix not in _WEIGHT_SUFFIXES
                  and not f.name.endswith(".index.json") and f.name != "config.json"]
    if not any(f.name in ("vocab.txt", "tokenizer.json") for f in text_files):
        raise CheckpointError(f"{text_src} has no BERT vocab (vocab.txt or tokenizer.json); the text encoder "
                              "cannot tokenize questions without it")
    text_dir = root / "tokenizer" / "text"
    text_dir.mkdir(parents=True)
    for f in text_files:
        shutil.copy2(f, text_dir / f.name)
    out["text"] = {"dir": "tokenizer/text", "files": [f.name for f in text_files]}
    return out


def _ship_variant(root: Path, graph: GraphEntry, source: Variant, source_dir: Path, precision: str,
                  decision: dict[str, Any] | None = None) -> Variant:
    """Link a variant's files from a unit folder into the bundle's graphs/ and return its bundle-relative entry."""
    files = []
    for rel in source.files:
        dst = root / "graphs" / Path(rel).name
        link_or_copy(source_dir / rel, dst)
        files.append(dst.relative_to(root).as_posix())
    return Variant(graph=f"graphs/{Path(source.graph).name}", files=files, bytes=source.bytes, nodes=source.nodes,
                   parity=source.parity, decision=decision, build_s=source.build_s, validate_s=source.validate_s)


def _quantized_variant(unit_dir: Path, decision: dict[str, Any]) -> Variant:
    from ..export import graph_files

    path = unit_dir / decision["path"]
    files = graph_files(path)
    parity = {"reference": "fp32 graph", "tolerance": decision["budget"],
              "num_samples": decision["calibration"]["held_out"], "samples": ["held-out"],
              "worst": {"all outputs": {**decision["measured"], "finite": True}}}
    return Variant(graph=path.relative_to(unit_dir).as_posix(), files=[f.relative_to(unit_dir).as_posix() for f in files],
                   bytes=sum(f.stat().st_size for f in files), parity=parity, decision=decision)


def _write_checks(root: Path, graph: GraphEntry, export_dir: Path, calibration_file: str) -> str:
    """One held-out real-image feed of the graph, stored fp16 (engine parity on the device compares the engine with
    the ONNX graph on the same input, so the rounding of the input does not matter)."""
    from ..export import read_feeds
    from ..quantize import split_feeds

    feeds = read_feeds(export_dir / calibration_file)
    feed = split_feeds(feeds)[1][0] if len(feeds) > 1 else feeds[0]
    path = root / "checks" / f"{graph.name}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    # stacked on a leading sample axis of one, like every feeds file (read_feeds)
    np.savez_compressed(path, **{k: (v.astype(np.float16) if v.dtype == np.float32 else v)[None]
                                 for k, v in feed.items()})
    return path.relative_to(root).as_posix()


def _llm_settings(recipe: Any) -> LLMSettings:
    llm = recipe.llm
    return LLMSettings(n_ctx=llm.context, n_gpu_layers=llm.gpu_layers, n_threads=llm.threads)


def build(checkpoint: str | Path, target: str | Path, out_dir: str | Path, *, calib: str | Path | None = None,
          components: Sequence[str] | None = None, reuse: bool = True, compile_engines: bool = True,
          allow_over_budget: bool = False, work_dir: str | Path | None = None, quiet: bool = False,
          also_precisions: Sequence[str] = (), also_llm: Sequence[str] = (), full_sweep: bool | None = None,
          console: Console | None = None) -> BuildResult:
    """Build the bundle for `target` (a recipe name, alias or YAML path) from `checkpoint` into `out_dir`.

    reuse: take finished units from the work folder (False: recompute every unit and replace it there).
    also_precisions / also_llm: ship these graph precisions / GGUF types too (for parity benchmarks); the runtime's
    defaults stay the recipe's. full_sweep: the adapter's parity over every routing mask with K <= topk (default:
    at tiny scale; full scale keeps the stated subset of export.samples.REDUCED_SWEEP plus every single expert).
    Raises a MoVAExportError subclass (recipe, checkpoint, calibration, export, quantization, memory, disk) with no
    bundle written; a previous bundle at out_dir stays untouched, finished units stay in the work folder.
    """
    from ..checkpoint import Checkpoint
    from ..export import load_calibration
    from ..facts import facts_from_config
    from ..recipe import load_recipe

    recipe = load_recipe(target)                       # RecipeError names the field
    ckpt = Checkpoint.open(checkpoint)                 # CheckpointError names the file and key
    cal = load_calibration(calib)                      # CalibrationError names the folder
    names = check_components(components)
    unknown = sorted(set(also_precisions) - {"fp32", "fp16", "int8", "fp8"})
    if unknown:
        raise BuildError(f"unknown precision(s) {unknown} in --also-precision; use fp32, fp16, int8 or fp8")
    work = WorkFolder(work_dir)
    console = console or Console(quiet=quiet)
    out_dir = Path(out_dir)
    _check_replaceable(out_dir)
    start = time.perf_counter()
    ctx = BuildContext(ckpt, checkpoint_fingerprint(ckpt.path)["digest"], cal, facts_from_config(ckpt.config),
                       work, console, reuse=reuse,
                       full_sweep=ckpt.config.scale != "full" if full_sweep is None else full_sweep)
    with terminate_as_interrupt(), staged_dir(out_dir, overwrite=True) as tmp:
        console.log_to(tmp / "build.log")
        try:
            console.line(f"building {recipe.name} ({recipe.description}) from {ckpt.path}; work folder {work.root}")
            stale = work.partials()
            if stale:
                console.line(f"work folder: {len(stale)} unit(s) left by an interrupted run are redone "
                             "(`mova-export clean --partials` removes them)")
            exported = _run_exports(ctx, names)
            manifest = _assemble(ctx, tmp, recipe, exported, also_precisions, also_llm)
            result = _finish(ctx, tmp, out_dir, recipe, manifest, compile_engines, allow_over_budget)
        finally:
            reused = sum(r.status == "reused" for r in ctx.records)
            console.line(f"{reused} unit(s) reused from the work folder, {len(ctx.records) - reused} computed, "
                         f"{time.perf_counter() - start:.1f} s")
            console.close()
    return result


def _assemble(ctx: BuildContext, root: Path, recipe: Any, exported: dict[str, tuple[Any, Path, str]],
              also_precisions: Sequence[str], also_llm: Sequence[str]) -> Manifest:
    """Quantize what the recipe asks, then put every shipped file into the bundle folder and describe it."""
    graphs: dict[str, GraphEntry] = {}
    decisions: dict[str, dict[str, Any]] = {}
    shipped: dict[str, str] = {}
    checks: dict[str, str] = {}
    for component, (result, export_dir, export_key) in exported.items():
        for graph in result.graphs:
            entry = GraphEntry(graph.name, graph.component, graph.role, graph.inputs, graph.outputs, axes=graph.axes,
                               form=graph.form, proven=graph.proven)
            decision, quant_dir = quantize_stage(ctx, graph, export_dir, export_key,
                                                 result.calibration[graph.name], recipe)
            precision = decision["variant"]
            decisions[graph.name] = decision
            shipped[graph.name] = precision
            for p in dict.fromkeys([precision, *also_precisions]):
                if p in graph.variants:
                    entry.variants[p] = _ship_variant(root, graph, graph.variants[p], export_dir, p)
                    continue
                if p == precision:
                    source, source_dir = _quantized_variant(quant_dir, decision), quant_dir
                else:   # an extra quantized precision: quantized like the recipe's own, with that budget
                    extra = replace(recipe, precision={**recipe.precision, component: p})
                    d, qd = quantize_stage(ctx, graph, export_dir, export_key, result.calibration[graph.name], extra)
                    if d["variant"] != p:
                        ctx.console.line(f"{graph.name}: the extra {p} variant missed its budget; not shipped")
                        continue
                    source, source_dir = _quantized_variant(qd, d), qd
                entry.variants[p] = _ship_variant(root, graph, source, source_dir, p, source.decision)
            if recipe.runtime == "tensorrt":
                checks[graph.name] = _write_checks(root, graph, export_dir, result.calibration[graph.name])
            graphs[graph.name] = entry
    llms: dict[str, LLMEntry] = {}
    settings = _llm_settings(recipe)
    for qtype in dict.fromkeys([recipe.llm.quant, *also_llm]):
        path, info = gguf_stage(ctx, qtype)
        rel = f"llm/{path.name}"
        link_or_copy(path, root / rel)
        llms[qtype] = LLMEntry(rel, qtype, info["n_embd"], info["n_vocab"], settings, info.get("convert_s"))
    cfg = ctx.checkpoint.config
    manifest = Manifest(
        model=ctx.facts, config=cfg.to_dict(), graphs=graphs, tokenizers=_copy_tokenizers(ctx.checkpoint, root),
        source_checkpoint=checkpoint_fingerprint(ctx.checkpoint.path), tools=tool_versions(),
        created_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        export={"calibration": ctx.calibration.to_json(), "full_sweep": ctx.full_sweep},
        llm=llms[recipe.llm.quant], llms=llms, checks=checks,
        target={"recipe": recipe.name, "runtime": recipe.runtime, "device": recipe.device.name,
                "compute_capability": recipe.device.cc_str or None},
        recipe=recipe.to_dict(),
        runtime=RuntimeDefaults(precision=shipped, expert_policy=recipe.experts.policy,
                                max_loaded_experts=recipe.experts.max_loaded,
                                vision_backend="tensorrt" if recipe.runtime == "tensorrt" else "onnxruntime"),
        quantize=decisions)
    manifest.files = {}
    return manifest


def _check_replaceable(out_dir: Path) -> None:
    """A build replaces a previous bundle at --out (rebuilding in place is the usual loop), never other files."""
    from ..bundle.manifest import MANIFEST

    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file():
        raise BuildError(f"output folder {out_dir} is not empty and holds no mova-export bundle; choose a new folder "
                         "(a build replaces only a previous bundle)")


def _finish(ctx: BuildContext, root: Path, out_dir: Path, recipe: Any, manifest: Manifest, compile_engines: bool,
            allow_over_budget: bool) -> BuildResult:
    """Plan, compile where possible, report, and write the manifest (the rename happens when the caller's block
    ends)."""
    from ..bundle import file_table
    from ..bundle.manifest import BUILD_LOG, MANIFEST
    from ..recipe import graph_components
    from .memory import plan_from_manifest
    from .report import build_report, dump, render_report_markdown

    manifest.files = file_table(root, skip=(MANIFEST, BUILD_LOG))
    absent = [c for c in graph_components() if manifest.graph_of_component(c) is None]
    plan = plan_from_manifest(recipe, manifest, params={c: ctx.component_bytes(c) // 4 for c in absent})
    ctx.console.line(f"memory plan: {plan.message}" + (f"; {plan.fix}" if plan.fix else ""))
    if plan.verdict == "refuse" and not allow_over_budget:
        raise BuildError(f"{plan.message}; {plan.fix} (or pass --allow-over-budget to write the bundle anyway)")
    manifest.memory_plan = plan.to_json()
    compile_info = _compile(ctx, root, recipe, manifest, compile_engines, out_dir)
    manifest.stages = {f"{r.stage}/{r.name}": r.to_json() for r in ctx.records}
    manifest.stages["compile"] = compile_info
    report = build_report(manifest, recipe.name, ctx.records)
    (root / "report.json").write_text(dump(report))
    (root / "report.md").write_text(render_report_markdown(report))
    manifest.report = {"json": "report.json", "markdown": "report.md"}
    manifest.write(root)
    ctx.console.line(f"bundle for {recipe.name} written to {out_dir} (report: {out_dir / 'report.md'})")
    return BuildResult(out_dir, list(ctx.records), report, manifest, compile_info)


def _compile(ctx: BuildContext, root: Path, recipe: Any, manifest: Manifest, compile_engines: bool,
             out_dir: Path) -> dict[str, Any]:
    """TensorRT engines where a flavor here can build them for the target (TensorRT-RTX ahead of time for RTX cards,
    full TensorRT on the device itself); else the command to run on the device. Engines are units of the work folder
    too (by graph sha256, the component's recipe fields and the flavor), so a rebuild recompiles only what changed."""
    from ..bundle import file_table
    from ..compile import can_compile_here, compile_engines as build_engines, engine_path_for
    from ..compile.metadata import metadata_path
    from ..recipe import cache_key
    from .work import digest, write_unit

    if recipe.runtime != "tensorrt":
        return {"status": "skipped", "reason": f"the {recipe.name} target runs ONNX Runtime: no engines"}
    check = can_compile_here(recipe, out_dir)
    if not (check.ok and compile_engines) or check.flavor is None:
        reason = check.reason if not check.ok else "--no-compile"
        ctx.console.line(f"compile: skipped: {reason}")
        return {"status": "skipped", "reason": reason, "on_device": check.command}
    choice = check.flavor
    files = file_table(root, skip=("manifest.json", "build.log"))
    units = {}
    for name, graph in manifest.graphs.items():
        precision = manifest.runtime.precision[name]
        key = digest("compile", files[graph.variants[precision].graph]["sha256"],
                     cache_key(recipe, "compile", graph.component), choice.flavor, choice.version,
                     recipe.device.cc_str)
        unit, reused = ctx.find("compile", name, key)
        rel = engine_path_for(name, precision)
        if reused:       # the engine of an earlier build: compile_engines finds it up to date and keeps it
            for f in (rel, metadata_path(rel).as_posix()):
                link_or_copy(unit.path / Path(f).name, root / f)
        units[name] = (unit, reused, rel)
    start = time.perf_counter()
    with ctx.console.task(f"compile {len(units)} engines ({choice.flavor} {choice.version})", total=len(units)) as steps:
        def log(message: str) -> None:
            ctx.console.line(message)
            if " MiB in " in message or "engine up to date" in message:
                steps.advance(message.split(":")[0])

        metas = build_engines(root, manifest, recipe, device=check.device, log=log)
    for name, (unit, reused, rel) in units.items():
        if not reused:
            with unit.produce() as tmp:
                for f in (rel, metadata_path(rel).as_posix()):
                    link_or_copy(root / f, tmp / Path(f).name)
                write_unit(tmp, manifest.engines[name])
        ctx.record("compile", name, unit.key, reused, start)
    verified = sum(m.parity.get("status") == "verified" for m in metas)
    return {"status": "compiled", "flavor": choice.flavor, "version": choice.version, "engines": len(metas),
            "verified": verified}


def export_bundle(checkpoint: str | Path, out_dir: str | Path, *, components: Sequence[str] | None = None,
                  precisions: Sequence[str] = ("fp32",), calib: str | Path | None = None, overwrite: bool = False,
                  work_dir: str | Path | None = None, quiet: bool = False, full_sweep: bool | None = None,
                  console: Console | None = None) -> Manifest:
    """`mova-export export`: the components' graphs at fp32 (and fp16), each proven against PyTorch, in a bundle
    with the tokenizers and no LLM (`mova-export gguf --bundle` adds one); the same units as `build`."""
    from ..checkpoint import Checkpoint
    from ..export import load_calibration
    from ..facts import facts_from_config

    bad = sorted(set(precisions) - {"fp32", "fp16"})
    if bad or not precisions:
        raise BuildError(f"unknown export precision(s) {bad or list(precisions)}; use fp32 and/or fp16 (int8/fp8 "
                         "come from `mova-export build` with a recipe)")
    ckpt = Checkpoint.open(checkpoint)
    cal = load_calibration(calib)
    names = check_components(components)
    console = console or Console(quiet=quiet)
    ctx = BuildContext(ckpt, checkpoint_fingerprint(ckpt.path)["digest"], cal, facts_from_config(ckpt.config),
                       WorkFolder(work_dir), console,
                       full_sweep=ckpt.config.scale != "full" if full_sweep is None else full_sweep)
    with terminate_as_interrupt(), staged_dir(out_dir, overwrite=overwrite) as tmp:
        console.log_to(tmp / "build.log")
        try:
            exported = _run_exports(ctx, names)
            graphs = {}
            for result, export_dir, _ in exported.values():
                for graph in result.graphs:
                    entry = GraphEntry(graph.name, graph.component, graph.role, graph.inputs, graph.outputs,
                                       axes=graph.axes, form=graph.form, proven=graph.proven)
                    for p in precisions:
                        entry.variants[p] = _ship_variant(tmp, graph, graph.variants[p], export_dir, p)
                    graphs[graph.name] = entry
            manifest = Manifest(
                model=ctx.facts, config=ckpt.config.to_dict(), graphs=graphs,
                tokenizers=_copy_tokenizers(ckpt, tmp), source_checkpoint=checkpoint_fingerprint(ckpt.path),
                tools=tool_versions(), created_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                export={"calibration": cal.to_json(), "full_sweep": ctx.full_sweep},
                runtime=RuntimeDefaults(precision={name: precisions[0] for name in graphs}),
                stages={f"{r.stage}/{r.name}": r.to_json() for r in ctx.records})
            manifest.write(tmp)
        finally:
            console.close()
    return manifest


def attach_llm(bundle_dir: str | Path, checkpoint: str | Path, qtype: str, *, work_dir: str | Path | None = None,
               default: bool = True, console: Console | None = None) -> LLMEntry:
    """Add the checkpoint's LLM as `llm/model.<qtype>.gguf` to an existing bundle (verified first, rewritten
    atomically: a failure leaves it as it was). default: make it the GGUF the runtime loads."""
    from ..bundle import load_bundle
    from ..checkpoint import Checkpoint
    from ..errors import BundleError
    from ..export import load_calibration
    from ..facts import facts_from_config
    from ..gguf import QTYPES

    if qtype not in QTYPES:
        raise BundleError(f"unknown LLM quant type {qtype!r}; use one of {', '.join(QTYPES)}")
    bundle = load_bundle(bundle_dir)
    ckpt = Checkpoint.open(checkpoint)
    fingerprint = checkpoint_fingerprint(ckpt.path)
    if fingerprint["digest"] != bundle.manifest.source_checkpoint.get("digest"):
        raise BundleError(f"{ckpt.path} is not the checkpoint bundle {bundle.path} was built from (fingerprints "
                          "differ); pass the bundle's own checkpoint")
    console = console or Console(quiet=True)
    ctx = BuildContext(ckpt, fingerprint["digest"], load_calibration(None), facts_from_config(ckpt.config),
                       WorkFolder(work_dir), console)
    manifest = bundle.manifest
    with terminate_as_interrupt(), staged_dir(bundle.path, overwrite=True) as tmp:
        for rel in manifest.files:
            link_or_copy(bundle.path / rel, tmp / rel)
        path, info = gguf_stage(ctx, qtype)
        entry = LLMEntry(f"llm/{path.name}", qtype, info["n_embd"], info["n_vocab"],
                         manifest.llm.settings if manifest.llm else LLMSettings(), info.get("convert_s"))
        link_or_copy(path, tmp / entry.gguf)
        manifest.llms[qtype] = entry
        if default or manifest.llm is None:
            manifest.llm = entry
        manifest.tools.update(tool_versions())
        manifest.write(tmp)
    return entry

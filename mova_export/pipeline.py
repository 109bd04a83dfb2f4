"""`mova-export build`: checkpoint + target recipe -> a device-ready bundle, in one command.

Stages, each a function from its inputs to artifacts in the bundle folder, each with a cache key computed from
exactly what affects it (recipe.cache_key + the checkpoint fingerprint + the calibration set):

  export    static fp32 and fp16 ONNX graphs (one export serves every target), parity vs PyTorch, calibration feeds
  quantize  explicit Q/DQ per component (INT8, FP8 where the target has it), accuracy budget with fallback
  gguf      the LLM as GGUF of the recipe's quant type
  compile   TensorRT engines, only where TensorRT and the recipe's GPU are present; otherwise the bundle says
            what to run on the device (`mova-export compile BUNDLE`)
  plan      peak-memory prediction for the target; a bundle that cannot fit is refused with a fix
  report    per-component parity and decisions (report.md + report.json) and the manifest

Everything is written into a temp folder beside the output and renamed at the end; a failure leaves no bundle and
the previous one untouched. With reuse on, a stage whose key equals the one recorded in the previous bundle at the
same path takes its files from there instead of recomputing them.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import BuildError

Log = Callable[[str], None]
QUANTIZED = ("int8", "fp8")
# Every build exports both: fp16 is any recipe's fallback, and one export then serves every target (stage reuse).
EXPORT_PRECISIONS = ("fp32", "fp16")


@dataclass
class StageRecord:
    name: str
    key: str
    seconds: float = 0.0
    reused: bool = False
    detail: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "seconds": round(self.seconds, 2), "reused": self.reused, **self.detail}


@dataclass
class BuildResult:
    bundle: Path
    stages: list[StageRecord]
    report: dict[str, Any]


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _previous_manifest(out_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out_dir / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _stage_key(manifest: dict[str, Any] | None, stage: str) -> str | None:
    return ((manifest or {}).get("stages", {}).get(stage) or {}).get("key")


# ---------------------------------------------------------------------------------------------------------------
# the stages

def stage_export(checkpoint: Path, tmp: Path, cal: Any, components: list[str], key: str,
                 previous: dict[str, Any] | None, out_dir: Path, reuse: bool, log: Log) -> StageRecord:
    from .bundle import export_bundle

    record = StageRecord("export", key)
    start = time.perf_counter()
    if reuse and _stage_key(previous, "export") == key:
        shutil.rmtree(tmp)
        shutil.copytree(out_dir, tmp)  # later stages drop or keep what they own by their own keys
        record.reused = True
        log("export: inputs unchanged, graphs reused from the previous bundle")
    else:
        shutil.rmtree(tmp)
        export_bundle(checkpoint, tmp, components=components, precisions=EXPORT_PRECISIONS, samples=cal.samples,
                      questions=cal.questions, progress=False)
    record.seconds = time.perf_counter() - start
    record.detail = {"calibration": cal.to_json()}
    return record


def stage_quantize(tmp: Path, manifest: dict[str, Any], recipe: Any, components: list[str], export_key: str,
                   previous: dict[str, Any] | None, reuse: bool, log: Log) -> StageRecord:
    """Q/DQ graphs for the components the recipe quantizes, each against its accuracy budget."""
    from .calibration import read_feeds
    from .export import graph_files
    from .quantize import quantize_with_budget, split_feeds

    record = StageRecord("quantize", _digest(export_key, _quantize_key(recipe)))
    start = time.perf_counter()
    decisions: dict[str, Any] = {}
    reused = computed = 0
    precisions = _precisions(recipe, components)
    for name in components:
        wanted = precisions[name]
        variants = manifest["graphs"][name]["variants"]
        old = (previous or {}).get("quantize", {}).get(name)
        fresh = reuse and old is not None and old.get("key") == record.key
        if not fresh:  # the key covers every precision: a changed recipe leaves no quantized graph to keep
            _drop_quantized(tmp, variants)
        if wanted not in QUANTIZED:
            decisions[name] = {"component": name, "requested": wanted, "final": wanted}
            continue
        if fresh and _variant_of(old) in variants:
            decisions[name] = old
            reused += 1
            log(f"{name}: {wanted} graph reused ({old.get('final')})")
            continue
        computed += 1
        feeds = read_feeds(tmp / manifest["calibration"][name]["file"])
        calib, held_out = split_feeds(feeds)
        t0 = time.perf_counter()
        decision = quantize_with_budget(tmp / variants["fp32"]["graph"], tmp / "graphs", name, wanted, calib, held_out,
                                        _budget(recipe, wanted), method=recipe.calibration.method, log=log)
        decision = decision.to_json()
        decision["path"] = Path(decision["path"]).relative_to(tmp).as_posix()
        decision["key"] = record.key
        decision["seconds"] = round(time.perf_counter() - t0, 2)
        decisions[name] = decision
        final = decision["final"]
        variant = _variant_of(decision)
        files = graph_files(tmp / decision["path"])
        variants[variant] = {**variants.get(variant, {}), "graph": decision["path"],
                             "files": [f.relative_to(tmp).as_posix() for f in files],
                             "bytes": sum(f.stat().st_size for f in files), "decision": decision}
        variants[variant].setdefault("parity", _quant_parity(decision))
        log(f"{name}: {wanted} -> {final} (held-out cosine vs fp32 {decision['measured']['cosine']:.5f}, "
            f"budget {decision['budget']['min_cosine']})")
    manifest["quantize"] = decisions
    record.reused = reused > 0 and computed == 0
    record.seconds = time.perf_counter() - start
    record.detail = {"components": {n: d.get("final") for n, d in decisions.items()}}
    return record


def stage_gguf(checkpoint: Path, tmp: Path, recipe: Any, fingerprint: str, previous: dict[str, Any] | None,
               reuse: bool, log: Log) -> StageRecord:
    from .bundle import attach_llm

    llm = _llm_settings(recipe)
    record = StageRecord("gguf", _digest(fingerprint, llm["qtype"]))
    start = time.perf_counter()
    old = (previous or {}).get("llm")
    if reuse and _stage_key(previous, "gguf") == record.key and old and (tmp / old["gguf"]).is_file():
        record.reused = True
        log(f"llm: {old['gguf']} reused")
    else:
        attach_llm(tmp, checkpoint, llm["qtype"], n_ctx=llm["n_ctx"], n_gpu_layers=llm["n_gpu_layers"],
                   n_threads=llm["n_threads"])
    record.seconds = time.perf_counter() - start
    record.detail = {"qtype": llm["qtype"]}
    return record


# ---------------------------------------------------------------------------------------------------------------
# recipe access: the few fields the build reads (mova_export.recipe owns the schema)

def _precisions(recipe: Any, components: Sequence[str]) -> dict[str, str]:
    return {name: recipe.precision_of(name) for name in components}


def _budget(recipe: Any, precision: str) -> Any:
    from .validate import Tolerance

    budget = recipe.accuracy.get(precision)
    if budget is None:
        from .errors import RecipeError

        raise RecipeError(f"recipe {recipe.name}: accuracy.{precision} is missing; give it a min_cosine")
    return Tolerance(min_cosine=budget.min_cosine,
                     max_rel_l2=float("inf") if budget.max_rel_l2 is None else budget.max_rel_l2)


def _quantize_key(recipe: Any) -> str:
    from .recipe import cache_key

    return cache_key(recipe, "quantize")


def _llm_settings(recipe: Any) -> dict[str, Any]:
    llm = recipe.llm
    return {"qtype": llm.quant, "n_ctx": llm.context, "n_gpu_layers": llm.gpu_layers, "n_threads": llm.threads}


def _variant_of(decision: dict[str, Any]) -> str:
    """The graph variant a decision shipped: the fp16 fallback, or the requested one (int8-partial is still the int8
    variant, with fewer Q/DQ nodes)."""
    return "fp16" if decision["final"] == "fp16" else decision["requested"]


def _quant_parity(decision: dict[str, Any]) -> dict[str, Any]:
    """The parity block of a quantized variant (same shape as the export's), against the fp32 graph."""
    return {"reference": "fp32 graph", "tolerance": decision["budget"], "num_samples": decision["calibration"]["held_out"],
            "samples": ["held-out"], "worst": {"all outputs": {**decision["measured"], "finite": True}}}


def _drop_quantized(tmp: Path, variants: dict[str, Any]) -> None:
    for precision in [p for p in variants if p in QUANTIZED]:
        for rel in variants.pop(precision)["files"]:
            (tmp / rel).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------------
# build

def build(checkpoint: str | Path, target: str | Path, out_dir: str | Path, *, calib: str | Path | None = None,
          components: Sequence[str] | None = None, reuse: bool = True, compile_engines: bool = True,
          allow_over_budget: bool = False, progress: bool = True) -> BuildResult:
    """Build the bundle for `target` (a recipe name, alias or YAML path) from `checkpoint` into `out_dir`.

    reuse: take a stage's files from the bundle already at out_dir when that stage's key is unchanged.
    compile_engines: compile TensorRT engines when TensorRT and the recipe's GPU are present (else the bundle records
    the command to run on the device). allow_over_budget: write the bundle even when the memory plan refuses it.
    Raises a MoVAExportError subclass (recipe, checkpoint, calibration, export, quantization, memory) with nothing
    written; a previous bundle at out_dir stays untouched.
    """
    from .bundle import _check_components, _console_log, checkpoint_fingerprint, staged_bundle, write_manifest
    from .calibration import load_calibration
    from .checkpoint import Checkpoint
    from .compile import can_compile_here, compile_bundle
    from .memory import plan_from_manifest
    from .recipe import cache_key, load_recipe

    log = _console_log(progress)
    recipe = load_recipe(target)                       # RecipeError names the field
    checkpoint = Path(checkpoint)
    Checkpoint.open(checkpoint)                        # CheckpointError names the file and key
    cal = load_calibration(calib)                      # CalibrationError names the folder
    names = _check_components(components)
    out_dir = Path(out_dir)
    previous = _previous_manifest(out_dir) if reuse else None
    fingerprint = checkpoint_fingerprint(checkpoint)["digest"]
    stages: list[StageRecord] = []
    with staged_bundle(out_dir, overwrite=True) as tmp:
        log(f"building {recipe.name} ({recipe.description}) from {checkpoint}")

        def run(stage: str, fn: Callable[[], StageRecord]) -> StageRecord:
            log(f"stage {stage}")
            record = fn()
            stages.append(record)
            log(f"stage {stage}: {'reused' if record.reused else 'done'} in {record.seconds:.1f} s")
            return record

        export_key = _digest(fingerprint, names, cal.digest(), cache_key(recipe, "export"), EXPORT_PRECISIONS)
        run("export", lambda: stage_export(checkpoint, tmp, cal, names, export_key, previous, out_dir, reuse, log))
        manifest = json.loads((tmp / "manifest.json").read_text())
        run("quantize", lambda: stage_quantize(tmp, manifest, recipe, names, export_key, previous, reuse, log))
        write_manifest(tmp, manifest)
        run("gguf", lambda: stage_gguf(checkpoint, tmp, recipe, fingerprint, previous, reuse, log))
        manifest = json.loads((tmp / "manifest.json").read_text())

        final = {n: _variant_of(manifest["quantize"][n]) for n in names}  # fp16 where the budget forced it
        manifest["target"] = {"recipe": recipe.name, "runtime": recipe.runtime, "device": recipe.device.name,
                              "compute_capability": recipe.device.cc_str or None}
        manifest["recipe"] = recipe.to_dict()
        manifest["runtime"] = {"precision": final, "expert_policy": recipe.experts.policy,
                               "max_loaded_experts": recipe.experts.max_loaded,
                               "vision_backend": "tensorrt" if recipe.runtime == "tensorrt" else "onnxruntime"}

        start = time.perf_counter()
        plan = plan_from_manifest(recipe, manifest)
        stages.append(StageRecord("plan", cache_key(recipe, "runtime"), time.perf_counter() - start,
                                  detail={"verdict": plan.verdict}))
        log(f"memory plan on {recipe.name}: {plan.verdict}: {plan.message}")
        if plan.verdict == "refuse" and not allow_over_budget:
            raise BuildError(f"{plan.message}; {plan.fix} (or pass --allow-over-budget to write the bundle anyway)")

        check = can_compile_here(recipe, out_dir) if recipe.runtime == "tensorrt" else None
        compile_record = StageRecord("compile", _digest(cache_key(recipe, "compile"), export_key))
        if check is not None and check.ok and compile_engines:
            start = time.perf_counter()
            write_manifest(tmp, manifest)
            compile_bundle(tmp, recipe, names, log=log)
            manifest = json.loads((tmp / "manifest.json").read_text())
            compile_record.seconds = time.perf_counter() - start
            compile_record.detail = {"status": "compiled"}
        else:
            reason = ("the cpu target runs ONNX Runtime: no engines" if check is None else check.reason)
            compile_record.detail = {"status": "skipped", "reason": reason,
                                     "on_device": None if check is None else check.command}
            log(f"compile: skipped: {reason}" + ("" if check is None else f"; on the device run: {check.command}"))
        stages.append(compile_record)

        manifest["stages"] = {r.name: r.to_json() for r in stages}
        manifest["memory_plan"] = plan.to_json()
        report = build_report(manifest, recipe.name)
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (tmp / "report.md").write_text(render_report_markdown(report))
        manifest["report"] = {"json": "report.json", "markdown": "report.md"}
        write_manifest(tmp, manifest)
    log(f"bundle for {recipe.name} written to {out_dir} (report: {out_dir / 'report.md'})")
    return BuildResult(out_dir, stages, report)


# ---------------------------------------------------------------------------------------------------------------
# report

def build_report(manifest: dict[str, Any], target: str) -> dict[str, Any]:
    """Per component: shipped precision, parity of the fp32 graph vs PyTorch, of the shipped graph vs fp32, and the
    quantization decision; plus stage timings, the memory plan and the compile status."""
    rows = []
    for name in manifest["components"]:
        graph = manifest["graphs"][name]
        shipped = manifest["runtime"]["precision"][name]
        fp32 = graph["variants"]["fp32"]["parity"]["worst"]
        decision = manifest.get("quantize", {}).get(name, {})
        variant = graph["variants"].get(shipped, {})
        rows.append({
            "component": name, "requested": decision.get("requested", shipped), "shipped": shipped,
            "decision": decision.get("final", shipped),
            "fp32_vs_torch_min_cosine": min(f["cosine"] for f in fp32.values()),
            "fp32_vs_torch_max_rel_l2": max(f["rel_l2"] for f in fp32.values()),
            "shipped_vs_fp32_cosine": decision.get("measured", {}).get("cosine") if decision.get("measured") else
            (min(f["cosine"] for f in variant["parity"]["worst"].values()) if variant.get("parity") else None),
            "budget_min_cosine": decision.get("budget", {}).get("min_cosine"),
            "excluded_nodes": len(decision.get("excluded_nodes", [])),
            "parity_method": decision.get("parity_method", "ort"),
            "bytes": variant.get("bytes"),
        })
    return {"target": target, "bundle_format": manifest["format_version"], "components": rows,
            "llm": manifest.get("llm"), "stages": manifest["stages"], "memory_plan": manifest.get("memory_plan"),
            "source_checkpoint": manifest["source_checkpoint"]["digest"]}


def render_report_markdown(report: dict[str, Any]) -> str:
    def num(x: Any, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    lines = [f"# mova-export build report: {report['target']}", "",
             "Parity: fp32 graph vs the PyTorch module on real images; shipped graph vs the fp32 graph on held-out "
             "calibration inputs.", "",
             "| component | requested | shipped | fp32 vs torch cosine | shipped vs fp32 cosine | budget | excluded "
             "nodes | measured by | MiB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in report["components"]:
        lines.append(f"| {r['component']} | {r['requested']} | {r['decision']} | "
                     f"{num(r['fp32_vs_torch_min_cosine'], '.6f')} | {num(r['shipped_vs_fp32_cosine'], '.5f')} | "
                     f"{num(r['budget_min_cosine'], '')} | {r['excluded_nodes']} | {r['parity_method']} | "
                     f"{num(r['bytes'] and r['bytes'] / 2**20, '.2f')} |")
    llm = report.get("llm") or {}
    if llm:
        lines += ["", f"LLM: `{llm['gguf']}` ({llm['qtype']}), context {llm['n_ctx']}, GPU layers {llm['n_gpu_layers']}."]
    lines += ["", "| stage | seconds | reused | notes |", "|---|---|---|---|"]
    for name, st in report["stages"].items():
        notes = {k: v for k, v in st.items() if k not in ("key", "seconds", "reused", "calibration")}
        lines.append(f"| {name} | {st['seconds']} | {st['reused']} | {json.dumps(notes) if notes else ''} |")
    plan = report.get("memory_plan") or {}
    if plan:
        lines += ["", f"Memory plan ({plan['policy']} experts, LLM {plan['llm_quant']}): peak {plan['peak_gib']} GiB "
                  f"of {plan['budget_gib']} GiB: **{plan['verdict']}**. {plan['message']}"]
    return "\n".join(lines) + "\n"

"""`mova-export` command line: options -> library calls. No logic lives here.

Every MoVAExportError becomes one line on stderr (`error: ...`) and exit code 2; heavy libraries are imported
inside the commands so `mova-export --help` stays fast and works without GPU packages.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from . import __version__
from .cli_common import _console, _one_line_errors, _parse_letters, _resolve_image

DEFAULT_DEMO_DIR = Path("demo")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mova-export")
def main() -> None:
    """Compile a MoVA checkpoint into a deployable bundle and run it.

    \b
    Typical flow:
      mova-export synth --scale tiny --out ckpt       # a random MoVA in the official layout
      mova-export inspect ckpt                        # components, parameters, shapes
      mova-export reference --checkpoint ckpt --image photo.jpg --question "What is this?"
      mova-export demo                                # all of the above on the embedded default
    """


@main.command()
@click.option("--scale", type=click.Choice(["tiny", "full"]), default="tiny", show_default=True,
              help="tiny: real structure at toy widths (~tens of MB); full: real MoVA-8B shapes (~23 GB bf16).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="Checkpoint folder to write.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed (same seed, same bytes).")
@click.option("--format", "fmt", type=click.Choice(["bin", "safetensors"]), default="bin", show_default=True,
              help="Shard format: sharded .bin (as the released MoVA-8B) or safetensors.")
@click.option("--overwrite", is_flag=True, help="Replace an existing non-empty output folder.")
@_one_line_errors
def synth(scale: str, out_dir: Path, seed: int, fmt: str, overwrite: bool) -> None:
    """Write a random MoVA checkpoint in the official layout (config, shards, index, tokenizers)."""
    from .synth import write_synthetic_checkpoint

    path = write_synthetic_checkpoint(out_dir, scale=scale, seed=seed, fmt=fmt, overwrite=overwrite)
    click.echo(f"wrote {scale} synthetic MoVA checkpoint to {path}")


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@_one_line_errors
def inspect(path: Path, as_json: bool) -> None:
    """Describe a checkpoint or a bundle: components, parameter counts, dtypes, shapes, disk size."""
    from .inspect import describe_path, render_description

    info = describe_path(path)
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
    else:
        render_description(info, _console())


@main.command()
@click.option("--checkpoint", type=click.Path(path_type=Path), required=True, help="MoVA checkpoint folder.")
@click.option("--image", required=True, help="Image file, or a scikit-image sample name (astronaut, coffee, chelsea).")
@click.option("--question", required=True, help="The question about the image.")
@click.option("--max-new-tokens", type=int, default=64, show_default=True, help="Answer length cap.")
@click.option("--experts", default=None, help="Override the routing with letters, e.g. 'A,D' (debugging).")
@click.option("--json", "as_json", is_flag=True, help='Print {"experts": [...], "answer": ..., ...} as JSON.')
@_one_line_errors
def reference(checkpoint: Path, image: str, question: str, max_new_tokens: int, experts: str | None,
              as_json: bool) -> None:
    """Run MoVA's two passes (route, then answer) in PyTorch: the ground truth for parity."""
    from .reference import ReferencePipeline

    pipeline = ReferencePipeline(checkpoint)
    forced = _parse_letters(experts) if experts is not None else None
    result = pipeline.run(_resolve_image(image), question, max_new_tokens=max_new_tokens, force_experts=forced)
    if as_json:
        click.echo(json.dumps(result.to_json()))
        return
    click.echo(f"routing output: {result.routing_text!r}")
    click.echo(f"experts: {', '.join(result.experts) or 'none'}")
    click.echo(f"answer: {result.answer}")


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="Bundle folder to write.")
@click.option("--components", default=None,
              help="Comma-separated components (default: all ONNX ones: base, expert_A..G, text_encoder, adapter).")
@click.option("--precision", "precisions", multiple=True, type=click.Choice(["fp32", "fp16"]), default=("fp32",),
              show_default=True, help="Graph precisions (repeat for several); fp32 is always built.")
@click.option("--image", "images", multiple=True,
              help="Parity image: a file or a scikit-image sample name (repeat; default astronaut, coffee, chelsea).")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle folder.")
@click.option("--no-mask-sweep", is_flag=True, help="Check the adapter on a few masks instead of all 64 (K <= 3).")
@_one_line_errors
def export(checkpoint: Path, out_dir: Path, components: str | None, precisions: tuple[str, ...],
           images: tuple[str, ...], overwrite: bool, no_mask_sweep: bool) -> None:
    """Export each component to a static ONNX graph, prove parity with PyTorch, and write a bundle."""
    from .bundle import SAMPLE_IMAGES, export_bundle

    names = [c.strip() for c in components.split(",") if c.strip()] if components is not None else None
    path = export_bundle(checkpoint, out_dir, components=names, precisions=precisions,
                         samples=images or SAMPLE_IMAGES, overwrite=overwrite, mask_sweep=not no_mask_sweep)
    click.echo(f"bundle written to {path} (inspect it with `mova-export inspect {path}`)")


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--out", "out_file", type=click.Path(path_type=Path), default=None, help="GGUF file to write.")
@click.option("--bundle", "bundle_dir", type=click.Path(path_type=Path), default=None,
              help="Put the GGUF into this bundle (llm/model.<type>.gguf) and record it in its manifest instead.")
@click.option("--type", "qtype", type=click.Choice(["f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m"]),
              default="f16", show_default=True, help="GGUF tensor type; quantized types use llama.cpp's quantizer.")
@click.option("--threads", type=int, default=None, help="Quantization threads (default: all cores).")
@_one_line_errors
def gguf(checkpoint: Path, out_file: Path | None, bundle_dir: Path | None, qtype: str, threads: int | None) -> None:
    """Convert the checkpoint's Llama LLM (weights + Llama-3 tokenizer) to a GGUF that stock llama.cpp loads."""
    if (out_file is None) == (bundle_dir is None):
        raise click.UsageError("pass exactly one of --out FILE or --bundle BUNDLE")
    if bundle_dir is not None:
        from .bundle import attach_llm, load_bundle

        load_bundle(bundle_dir)  # refuse a missing or tampered bundle before converting gigabytes
        entry = attach_llm(bundle_dir, checkpoint, qtype, progress=True)
        click.echo(f"wrote {bundle_dir / entry['gguf']} and updated {bundle_dir / 'manifest.json'}")
        return
    from .gguf_convert import convert_checkpoint_to_gguf

    path = convert_checkpoint_to_gguf(checkpoint, out_file, qtype, threads=threads, progress=_gguf_progress())
    click.echo(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {qtype})")


def _gguf_progress():
    """A (done, total, what) callback printing whole-percent steps to stderr (the conversion streams tensors)."""
    shown = {"pct": -1}

    def report(done: int, total: int, what: str) -> None:
        pct = int(100 * done / total) if total else 100
        if pct // 10 != shown["pct"] // 10 or not total:
            shown["pct"] = pct
            click.echo(f"  {what}: {pct}%" if total else f"  {what}", err=True)
    return report


@main.command()
@click.option("--target", required=True,
              help="Recipe name (see `mova-export recipes`), alias (jetson-orin) or a recipe YAML path.")
@click.option("--checkpoint", type=click.Path(path_type=Path), required=True, help="MoVA checkpoint folder.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="Bundle folder to write.")
@click.option("--calib", type=click.Path(path_type=Path), default=None,
              help="Calibration folder: images + optional questions.txt (default: built-in real photos).")
@click.option("--components", default=None, help="Comma-separated subset of the vision components (default: all).")
@click.option("--no-reuse", is_flag=True, help="Recompute every stage even when its inputs did not change.")
@click.option("--no-compile", is_flag=True, help="Never compile TensorRT engines, even where possible.")
@click.option("--allow-over-budget", is_flag=True, help="Write the bundle even if the memory plan refuses it.")
@_one_line_errors
def build(target: str, checkpoint: Path, out_dir: Path, calib: Path | None, components: str | None, no_reuse: bool,
          no_compile: bool, allow_over_budget: bool) -> None:
    """Checkpoint -> device bundle: export, calibrate/quantize, GGUF, compile (where possible), parity report."""
    from .pipeline import build as build_bundle

    names = [c.strip() for c in components.split(",") if c.strip()] if components is not None else None
    result = build_bundle(checkpoint, target, out_dir, calib=calib, components=names, reuse=not no_reuse,
                          compile_engines=not no_compile, allow_over_budget=allow_over_budget)
    _print_build(result)


def _print_build(result) -> None:
    from rich.table import Table

    console = _console()
    table = Table(title=f"{result.report['target']}: per-component parity", title_justify="left")
    for col in ("component", "requested", "shipped", "fp32 vs torch cos", "shipped vs fp32 cos", "MiB"):
        table.add_column(col, justify="right" if "cos" in col or col == "MiB" else "left")
    for r in result.report["components"]:
        shipped = r["shipped_vs_fp32_cosine"]
        table.add_row(r["component"], r["requested"], r["decision"], f"{r['fp32_vs_torch_min_cosine']:.6f}",
                      "-" if shipped is None else f"{shipped:.5f}", f"{(r['bytes'] or 0) / 2**20:.2f}")
    console.print(table)
    stages = ", ".join(f"{s.name} {s.seconds:.1f}s{' (reused)' if s.reused else ''}" for s in result.stages)
    console.print(f"stages: {stages}")
    compile_stage = next(s for s in result.stages if s.name == "compile")
    if compile_stage.detail.get("on_device"):
        console.print(f"TensorRT engines: on the device run [bold]{compile_stage.detail['on_device']}[/bold]")
    console.print(f"bundle: {result.bundle}  report: {result.bundle / 'report.md'}")


@main.command(name="compile")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--target", default=None, help="Recipe (default: the one the bundle was built for).")
@click.option("--components", default=None, help="Comma-separated subset (default: every graph).")
@_one_line_errors
def compile_cmd(bundle: Path, target: str | None, components: str | None) -> None:
    """Compile a bundle's graphs to TensorRT engines on this device (TensorRT 10 and the target GPU needed)."""
    from .bundle import load_bundle
    from .compile import can_compile_here, compile_bundle
    from .errors import CompileError
    from .recipe import load_recipe

    loaded = load_bundle(bundle)
    name = target or loaded.manifest.get("target", {}).get("recipe")
    if not name:
        raise CompileError(f"bundle {bundle} records no target; pass --target (see `mova-export recipes`)")
    recipe = load_recipe(name)
    check = can_compile_here(recipe, bundle)
    if not check.ok:
        raise CompileError(check.reason)
    names = [c.strip() for c in components.split(",") if c.strip()] if components else None
    engines = compile_bundle(bundle, recipe, names, log=lambda m: click.echo(m, err=True))
    click.echo(f"compiled {len(engines)} engine(s) into {bundle / 'engines'}")


@main.command()
@click.option("--target", required=True, help="Recipe name, alias or YAML path.")
@click.option("--bundle", "bundle_dir", type=click.Path(path_type=Path), default=None,
              help="Plan from this bundle's real file sizes (default: the full-size MoVA-8B parameter counts).")
@click.option("--policy", type=click.Choice(["resident", "lazy"]), default=None, help="Override the expert policy.")
@click.option("--llm-quant", default=None, help="Override the LLM quant type (f16, q8_0, q6_k, q5_k_m, q4_k_m).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@_one_line_errors
def plan(target: str, bundle_dir: Path | None, policy: str | None, llm_quant: str | None, as_json: bool) -> None:
    """Predict peak memory on a target; exit 1 when MoVA would not fit (the message says what to change)."""
    from .memory import plan_bundle, plan_from_config, render_plan
    from .recipe import load_recipe

    recipe = load_recipe(target)
    if bundle_dir is not None:
        result = plan_bundle(recipe, bundle_dir, policy=policy, llm_quant=llm_quant)
    else:
        from .synth import synthetic_config

        result = plan_from_config(recipe, synthetic_config("full"), policy=policy, llm_quant=llm_quant)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        console = _console()
        console.print(render_plan(result))
        console.print(f"{result.verdict}: {result.message}" + (f"\n{result.fix}" if result.fix else ""))
    if result.verdict == "refuse":
        sys.exit(1)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print every recipe as JSON.")
@_one_line_errors
def recipes(as_json: bool) -> None:
    """List the target recipes (recipes/*.yaml): GPU, precisions, LLM quant, memory budget."""
    from .recipe import ALIASES, list_recipes, load_recipe

    loaded = [load_recipe(n) for n in list_recipes()]
    if as_json:
        click.echo(json.dumps({r.name: r.to_dict() for r in loaded}, indent=2))
        return
    from rich.table import Table

    table = Table(title_justify="left")
    for col in ("target", "device", "cc", "runtime", "precisions", "LLM", "experts", "budget GiB"):
        table.add_column(col)
    for r in loaded:
        counts: dict[str, int] = {}
        for p in r.precision.values():
            counts[p] = counts.get(p, 0) + 1
        table.add_row(r.name, r.device.name, r.device.cc_str or "-", r.runtime,
                      ", ".join(f"{n} {p}" for p, n in sorted(counts.items())), r.llm.quant, r.experts.policy,
                      f"{r.memory.budget_mib / 1024:.1f}")
    _console().print(table)
    click.echo("aliases: " + ", ".join(f"{a} -> {t}" for a, t in sorted(ALIASES.items())))


@main.command()
@click.option("--dir", "work_dir", type=click.Path(path_type=Path), default=DEFAULT_DEMO_DIR, show_default=True,
              help="Where the demo writes its tiny checkpoint, bundle and outputs.")
@click.option("--target", default="cpu", show_default=True, help="Recipe to build the bundle for.")
@_one_line_errors
def demo(work_dir: Path, target: str) -> None:
    """The whole flow on the embedded default: a tiny synthetic MoVA, `build --target cpu`, then the bundle's
    runtime against the PyTorch reference on real sample photos (routing and answers side by side)."""
    from rich.table import Table

    from .pipeline import build as build_bundle
    from .reference import ReferencePipeline, iter_sample_questions, sample_images
    from .runtime import MoVARuntime
    from .synth import write_synthetic_checkpoint

    console = _console()
    checkpoint, bundle = work_dir / "checkpoint", work_dir / f"bundle-{target}"
    if not (checkpoint / "config.json").exists():
        write_synthetic_checkpoint(checkpoint, scale="tiny", seed=0, overwrite=True)
    console.print(f"[bold]checkpoint[/bold] {checkpoint} (tiny synthetic MoVA, random weights)")
    result = build_bundle(checkpoint, target, bundle)  # stages reuse the previous demo's bundle when unchanged
    _print_build(result)
    reference = ReferencePipeline(checkpoint)
    images = sample_images()
    table = Table(title=f"reference (PyTorch fp32) vs bundle ({target})", title_justify="left")
    for col in ("image", "question", "experts ref / bundle", "answer ref", "answer bundle", "ms bundle"):
        table.add_column(col)
    with MoVARuntime.from_bundle(bundle) as runtime:
        runtime.warmup()
        for name, question in iter_sample_questions():
            ref = reference.run(images[name], question, max_new_tokens=16)
            got = runtime.ask(images[name], question, max_new_tokens=16)
            table.add_row(name, question, f"{','.join(ref.experts) or 'none'} / {','.join(got.experts) or 'none'}",
                          repr(ref.answer), repr(got.text), f"{got.timings_ms.get('total', 0):.0f}")
    console.print(table)
    console.print("Random weights answer gibberish; what counts is that the bundle routes and answers like the "
                  "reference. Exact equality needs fp32 graphs and an f32 GGUF: `mova-export bench parity "
                  f"{bundle}` measures it per precision.")


def _register_runtime_commands() -> None:
    """`run` and `bench` live in cli_run (they import the runtime); added here so `mova-export --help` lists them."""
    from .cli_run import bench, run

    main.add_command(run)
    main.add_command(bench)


_register_runtime_commands()


if __name__ == "__main__":  # pragma: no cover
    main()

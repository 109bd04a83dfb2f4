"""`mova-export` command line: options -> library calls. No logic lives here.

Every MoVAExportError becomes one line on stderr (`error: ...`) and exit code 2; heavy libraries are imported
inside the commands so `mova-export --help` stays fast and works without torch or GPU packages.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .. import __version__
from ..core.qtypes import QTYPES
from .common import console, one_line_errors, parse_components, parse_letters, resolve_image
from .robot import replay
from .run import bench, run
from .serve import serve
from .trust import KEY_PASSWORD_HELP, key_password, sign, verify

DEFAULT_DEMO_DIR = Path("demo")
WORK_DIR_HELP = "Work folder of finished build units (default ~/.cache/mova-export/work); shared by every build."


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mova-export")
def main() -> None:
    """Compile a MoVA checkpoint into a deployable bundle and run it.

    \b
    Typical flow:
      mova-export synth --scale tiny-trained --out ckpt   # a small MoVA in the official layout
      mova-export build --target jetson-orin --checkpoint ckpt --out bundle
      mova-export inspect bundle                          # graphs, precisions, parity, engines
      mova-export run bundle --image photo.jpg --question "What is on the table?" --stream
      mova-export bench parity bundle                     # routing / answers / per-graph cosine vs PyTorch
      mova-export bench latency bundle                    # p50/p95 per stage, TTFT, tokens/s, memory
      mova-export compile bundle                          # on the device: TensorRT engines
      mova-export serve bundle --port 8000                # OpenAI-compatible endpoint (/v1/chat/completions)
      mova-export replay BAG --bundle bundle --question Q # a ROS 2 bag through the robot loop
      mova-export demo                                    # synth + build + runtime vs reference
    """


main.add_command(run)
main.add_command(bench)
main.add_command(replay)
main.add_command(sign)
main.add_command(verify)
main.add_command(serve)


@main.command()
@click.option("--scale", type=click.Choice(["tiny", "tiny-trained", "full"]), default="tiny", show_default=True,
              help="tiny: real structure at toy widths, random weights; tiny-trained: the same with an LLM trained to "
                   "route and answer by question kind; full: real MoVA-8B shapes (~23 GB bf16).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="Checkpoint folder to write.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed (same seed, same bytes).")
@click.option("--format", "fmt", type=click.Choice(["bin", "safetensors"]), default="bin", show_default=True,
              help="Shard format: sharded .bin (as the released MoVA-8B) or safetensors.")
@click.option("--overwrite", is_flag=True, help="Replace an existing non-empty output folder.")
@one_line_errors
def synth(scale: str, out_dir: Path, seed: int, fmt: str, overwrite: bool) -> None:
    """Write a MoVA checkpoint in the official layout (config, shards, index, tokenizers)."""
    from ..synth import write_synthetic_checkpoint

    path = write_synthetic_checkpoint(out_dir, scale=scale, seed=seed, fmt=fmt, overwrite=overwrite)
    click.echo(f"wrote {scale} synthetic MoVA checkpoint to {path}")


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of a bundle's files.")
@click.option("--trusted-key", type=click.Path(path_type=Path), default=None,
              help="Also check the bundle's signature with this PEM public key (or root CA certificate).")
@one_line_errors
def inspect(path: Path, as_json: bool, no_verify: bool, trusted_key: Path | None) -> None:
    """Describe a checkpoint or a bundle: components, parameter counts, dtypes, shapes, parity, engines, size, and
    who signed it (and whether the signature verifies, given --trusted-key)."""
    from .inspect import describe_path, render_description

    info = describe_path(path, verify=not no_verify, trusted_key=trusted_key)
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
    else:
        render_description(info, console())


@main.command()
@click.option("--checkpoint", type=click.Path(path_type=Path), required=True, help="MoVA checkpoint folder.")
@click.option("--image", required=True, help="Image file, or a scikit-image sample name (astronaut, coffee, chelsea).")
@click.option("--question", required=True, help="The question about the image.")
@click.option("--max-new-tokens", type=int, default=64, show_default=True, help="Answer length cap.")
@click.option("--experts", default=None, help="Override the routing with letters, e.g. 'A,D' (debugging).")
@click.option("--json", "as_json", is_flag=True, help='Print {"experts": [...], "answer": ..., ...} as JSON.')
@one_line_errors
def reference(checkpoint: Path, image: str, question: str, max_new_tokens: int, experts: str | None,
              as_json: bool) -> None:
    """Run MoVA's two passes (route, then answer) in PyTorch: the ground truth for parity."""
    from ..reference import ReferencePipeline

    pipeline = ReferencePipeline(checkpoint)
    forced = parse_letters(experts, pipeline.facts.letters) if experts is not None else None
    result = pipeline.run(resolve_image(image), question, max_new_tokens=max_new_tokens, force_experts=forced)
    if as_json:
        click.echo(json.dumps(result.to_json()))
        return
    click.echo(f"routing output: {result.routing_text!r}")
    click.echo(f"experts: {', '.join(result.experts) or 'none'}")
    click.echo(f"answer: {result.text}")


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="Bundle folder to write.")
@click.option("--components", default=None,
              help="Comma-separated components (default: all ONNX ones: base, expert_A..G, text_encoder, adapter).")
@click.option("--precision", "precisions", multiple=True, type=click.Choice(["fp32", "fp16"]), default=("fp32",),
              show_default=True, help="Graph precisions to ship (repeat for several; both are always exported).")
@click.option("--calib", type=click.Path(path_type=Path), default=None,
              help="Parity/calibration images: a folder of images + optional questions.txt (default: built-in photos).")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle folder.")
@click.option("--work-dir", type=click.Path(path_type=Path), default=None, help=WORK_DIR_HELP)
@click.option("--quiet", is_flag=True, help="No progress output (errors only).")
@one_line_errors
def export(checkpoint: Path, out_dir: Path, components: str | None, precisions: tuple[str, ...], calib: Path | None,
           overwrite: bool, work_dir: Path | None, quiet: bool) -> None:
    """Export each component to a static ONNX graph, prove parity with PyTorch, and write a bundle (no LLM)."""
    from ..pipeline import BuildRequest, export_bundle

    export_bundle(BuildRequest(checkpoint=checkpoint, out=out_dir, components=parse_components(components),
                               export_precisions=precisions, calib=calib, overwrite=overwrite, work_dir=work_dir,
                               quiet=quiet))
    click.echo(f"bundle written to {out_dir} (inspect it with `mova-export inspect {out_dir}`)")


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--out", "out_file", type=click.Path(path_type=Path), default=None, help="GGUF file to write.")
@click.option("--bundle", "bundle_dir", type=click.Path(path_type=Path), default=None,
              help="Put the GGUF into this bundle (llm/model.<type>.gguf) and record it in its manifest instead.")
@click.option("--type", "qtype", type=click.Choice(list(QTYPES)),
              default="f16", show_default=True, help="GGUF tensor type; quantized types use llama.cpp's quantizer.")
@click.option("--threads", type=int, default=None, help="Quantization threads (default: all cores).")
@click.option("--work-dir", type=click.Path(path_type=Path), default=None, help=WORK_DIR_HELP)
@one_line_errors
def gguf(checkpoint: Path, out_file: Path | None, bundle_dir: Path | None, qtype: str, threads: int | None,
         work_dir: Path | None) -> None:
    """Convert the checkpoint's Llama LLM (weights + Llama-3 tokenizer) to a GGUF that stock llama.cpp loads."""
    from ..core.progress import Console

    if (out_file is None) == (bundle_dir is None):
        raise click.UsageError("pass exactly one of --out FILE or --bundle BUNDLE")
    if bundle_dir is not None:
        from ..pipeline import attach_llm

        entry = attach_llm(bundle_dir, checkpoint, qtype, work_dir=work_dir, console=Console())
        click.echo(f"wrote {bundle_dir / entry.gguf} and updated {bundle_dir / 'manifest.json'}")
        return
    from ..gguf.convert import convert_checkpoint_to_gguf

    path = convert_checkpoint_to_gguf(checkpoint, out_file, qtype, threads=threads, console=Console())
    click.echo(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {qtype})")


@main.command()
@click.option("--target", required=True,
              help="Recipe name (see `mova-export recipes`), alias (jetson-orin) or a recipe YAML path.")
@click.option("--checkpoint", type=click.Path(path_type=Path), required=True, help="MoVA checkpoint folder.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="Bundle folder to write.")
@click.option("--calib", type=click.Path(path_type=Path), default=None,
              help="Calibration folder: images + optional questions.txt (default: built-in real photos).")
@click.option("--components", default=None, help="Comma-separated subset of the graph components (default: all).")
@click.option("--work-dir", type=click.Path(path_type=Path), default=None, help=WORK_DIR_HELP)
@click.option("--no-reuse", is_flag=True, help="Recompute every unit even when the work folder has it.")
@click.option("--no-compile", is_flag=True, help="Never compile TensorRT engines, even where possible.")
@click.option("--allow-over-budget", is_flag=True, help="Write the bundle even if the memory plan refuses it.")
@click.option("--also-precision", "also_precisions", multiple=True,
              type=click.Choice(["fp32", "fp16", "int8", "fp8"]),
              help="Also ship this graph precision (repeat; for `bench parity` across precisions).")
@click.option("--also-llm", "also_llm", multiple=True,
              type=click.Choice(list(QTYPES)), help="Also ship the LLM as this GGUF type (repeat).")
@click.option("--quiet", is_flag=True, help="No progress output (errors only); the bundle's build.log has it all.")
@click.option("--sign-key", type=click.Path(path_type=Path), default=None,
              help="Sign the bundle with this EC private key (PEM) as the last step (see `mova-export sign`).")
@click.option("--sign-key-password-file", type=click.Path(path_type=Path), default=None, help=KEY_PASSWORD_HELP)
@one_line_errors
def build(target: str, checkpoint: Path, out_dir: Path, calib: Path | None, components: str | None,
          work_dir: Path | None, no_reuse: bool, no_compile: bool, allow_over_budget: bool,
          also_precisions: tuple[str, ...], also_llm: tuple[str, ...], quiet: bool, sign_key: Path | None,
          sign_key_password_file: Path | None) -> None:
    """Checkpoint -> device bundle: export, calibrate/quantize, GGUF, plan, compile (where possible), report, and
    with --sign-key a signature over every file."""
    from ..pipeline import BuildRequest
    from ..pipeline import build as build_bundle
    from .render import print_build

    password = key_password(sign_key, sign_key_password_file) if sign_key is not None else None
    result = build_bundle(BuildRequest(checkpoint=checkpoint, target=target, out=out_dir, calib=calib,
                                       components=parse_components(components), reuse=not no_reuse,
                                       compile=not no_compile, allow_over_budget=allow_over_budget, work_dir=work_dir,
                                       quiet=quiet, also_precisions=also_precisions, also_llm=also_llm,
                                       sign_key=sign_key, sign_password=password))
    if not quiet:
        print_build(result, console())
    if result.signature is not None:
        click.echo(f"signed {out_dir} ({len(result.signature.files)} files) by {result.signature.signer}")


@main.command()
@click.option("--work-dir", type=click.Path(path_type=Path), default=None, help=WORK_DIR_HELP)
@click.option("--partials", is_flag=True, help="Only remove what interrupted builds left behind.")
@one_line_errors
def clean(work_dir: Path | None, partials: bool) -> None:
    """Remove the build's work folder (finished units are recomputed by the next build)."""
    from ..pipeline import clean as clean_work
    from ..pipeline import default_work_dir

    count, freed = clean_work(work_dir, partials_only=partials)
    where = work_dir or default_work_dir()
    click.echo(f"removed {count} folder(s) from {where}, {freed / 2**20:.1f} MiB freed")


@main.command(name="compile")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--target", default=None, help="Recipe (default: the one the bundle was built for); a Jetson on another "
              "JetPack: NAME@jetpackX.Y, e.g. jetson-orin@jetpack7.2.")
@click.option("--components", default=None, help="Comma-separated subset (default: every graph).")
@one_line_errors
def compile_cmd(bundle: Path, target: str | None, components: str | None) -> None:
    """Compile a bundle's graphs to TensorRT engines (on the device, or ahead of time with TensorRT for RTX)."""
    from ..bundle import load_bundle
    from ..compile import can_compile_here, compile_bundle
    from ..core.errors import CompileError
    from ..recipe import load_recipe

    loaded = load_bundle(bundle)
    name = target or (loaded.manifest.target or {}).get("recipe")
    if not name:
        raise CompileError(f"bundle {bundle} records no target; pass --target (see `mova-export recipes`)")
    recipe = load_recipe(name)
    if recipe.platform_note:            # `--target jetson-orin` says which JetPack it assumed
        click.echo(f"{recipe.name}: {recipe.platform_note}", err=True)
    check = can_compile_here(recipe, bundle)
    if not check.ok:
        raise CompileError(check.reason)
    click.echo(f"on {check.device.describe()}: {check.reason}", err=True)
    engines = compile_bundle(bundle, recipe, parse_components(components), device=check.device,
                             log=lambda m: click.echo(m, err=True))
    click.echo(f"compiled {len(engines)} engine(s) into {bundle / 'engines'}")


@main.command()
@click.option("--target", required=True, help="Recipe name, alias or YAML path (a Jetson on another JetPack: "
              "NAME@jetpackX.Y).")
@click.option("--bundle", "bundle_dir", type=click.Path(path_type=Path), default=None,
              help="Plan from this bundle's real file sizes (default: the full-size MoVA-8B parameter counts).")
@click.option("--policy", type=click.Choice(["resident", "lazy"]), default=None, help="Override the expert policy.")
@click.option("--llm-quant", type=click.Choice(list(QTYPES)), default=None, help="Override the LLM quant type.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@one_line_errors
def plan(target: str, bundle_dir: Path | None, policy: str | None, llm_quant: str | None, as_json: bool) -> None:
    """Predict peak memory on a target; exit 1 when MoVA would not fit (the message says what to change)."""
    from ..pipeline.plan import plan_bundle, plan_from_config, render_plan
    from ..recipe import load_recipe

    recipe = load_recipe(target)
    if bundle_dir is not None:
        result = plan_bundle(recipe, bundle_dir, policy=policy, llm_quant=llm_quant)
    else:
        from ..synth import synthetic_config

        result = plan_from_config(recipe, synthetic_config("full"), policy=policy, llm_quant=llm_quant)
    if as_json:
        click.echo(json.dumps({**result.to_json(), "platform": recipe.platform_note or None}, indent=2))
    else:
        console().print(render_plan(result))
        if recipe.platform_note:        # a Jetson target says which JetPack it assumed
            console().print(f"{recipe.name}: {recipe.platform_note}")
    if result.verdict == "refuse":
        sys.exit(1)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print every recipe as JSON.")
@one_line_errors
def recipes(as_json: bool) -> None:
    """List the target recipes (recipes/*.yaml): GPU, precisions, LLM quant, memory budget."""
    from ..recipe import ALIASES, list_recipes, load_recipe
    from .render import recipes_table

    loaded = [load_recipe(n) for n in list_recipes()]
    if as_json:
        click.echo(json.dumps({r.name: r.to_dict() for r in loaded}, indent=2))
        return
    out = console()
    out.print(recipes_table(loaded))
    out.print("aliases: " + ", ".join(f"{a} -> {t}" for a, t in sorted(ALIASES.items())), soft_wrap=False)
    out.print("a Jetson on another JetPack: --target NAME@jetpackX.Y (e.g. jetson-orin@jetpack7.2)")


@main.command()
@click.option("--dir", "demo_dir", type=click.Path(path_type=Path), default=DEFAULT_DEMO_DIR, show_default=True,
              help="Where the demo writes its checkpoint, bundle, table and picture.")
@click.option("--target", default="cpu", show_default=True, help="Recipe to build the bundle for.")
@click.option("--work-dir", type=click.Path(path_type=Path), default=None, help=WORK_DIR_HELP)
@one_line_errors
def demo(demo_dir: Path, target: str, work_dir: Path | None) -> None:
    """The whole flow on the embedded default: the tiny trained MoVA, `build --target cpu`, then the bundle's runtime
    next to the PyTorch reference on sample photos and questions that route to different experts."""
    from .demo import run_demo

    if not run_demo(demo_dir, target, work_dir, console()):
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()

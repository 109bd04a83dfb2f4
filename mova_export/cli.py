"""`mova-export` command line: options -> library calls. No logic lives here.

Every MoVAExportError becomes one line on stderr (`error: ...`) and exit code 2; heavy libraries are imported
inside the commands so `mova-export --help` stays fast and works without GPU packages.
"""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable

import click

from . import __version__
from .errors import MoVAExportError

DEFAULT_DEMO_DIR = Path("demo")


def _one_line_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MoVAExportError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
    return wrapper


def _console():
    from rich.console import Console

    return Console(stderr=False, highlight=False)


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


def _parse_letters(text: str) -> list[str]:
    from .config import EXPERT_LETTERS

    letters = [p.strip().upper() for p in text.split(",") if p.strip()]
    bad = [p for p in letters if p not in EXPERT_LETTERS]
    if bad:
        raise click.BadParameter(f"unknown expert letter(s) {bad}; use A..G", param_hint="--experts")
    return letters


def _resolve_image(image: str) -> Any:
    """A path, or the name of a scikit-image sample photo (lets the demo run with no files)."""
    if Path(image).exists():
        return Path(image)
    from .reference import sample_images

    samples = sample_images()
    if image in samples:
        return samples[image]
    from .errors import RuntimeInputError

    raise RuntimeInputError(f"image {image!r} not found; pass an image file or one of {sorted(samples)}")


@main.command()
@click.option("--dir", "work_dir", type=click.Path(path_type=Path), default=DEFAULT_DEMO_DIR, show_default=True,
              help="Where the demo writes its tiny checkpoint and outputs.")
@_one_line_errors
def demo(work_dir: Path) -> None:
    """Everything on the embedded default: a tiny synthetic MoVA on the CPU, two passes on sample photos."""
    from .reference import ReferencePipeline, iter_sample_questions, sample_images
    from .synth import write_synthetic_checkpoint

    console = _console()
    checkpoint = work_dir / "checkpoint"
    if not (checkpoint / "config.json").exists():
        write_synthetic_checkpoint(checkpoint, scale="tiny", seed=0, overwrite=True)
    console.print(f"[bold]checkpoint[/bold] {checkpoint} (tiny synthetic MoVA, random weights)")
    pipeline = ReferencePipeline(checkpoint)
    images = sample_images()
    for name, question in iter_sample_questions():
        result = pipeline.run(images[name], question, max_new_tokens=16)
        console.print(f"[bold]{name}[/bold] Q: {question}\n  experts: {', '.join(result.experts) or 'none'}"
                      f"  answer: {result.answer!r}")


if __name__ == "__main__":  # pragma: no cover
    main()

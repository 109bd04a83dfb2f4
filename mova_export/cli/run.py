"""`mova-export run` and `mova-export bench latency|parity`: thin click commands over the runtime and bench/.

Importing this module imports neither torch nor the build side: `run` works in a device-only install."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from .common import one_line_errors, parse_letters, resolve_image

BACKEND_CHOICE = click.Choice(["auto", "onnxruntime", "tensorrt"])
DEVICE_CHOICE = click.Choice(["cpu", "cuda"])
DEVICE_HELP = "cpu, or cuda: ONNX Runtime's CUDA provider / TensorRT engines and llama.cpp GPU layers."
BACKEND_HELP = "Vision graphs: onnxruntime, tensorrt (the bundle's engines) or auto (engines when usable here)."


def _precision(text: str | None) -> Any:
    """"int8" for every component, or "base=fp16,adapter=fp32" per component; None keeps the bundle's plan."""
    if text is None:
        return None
    if "=" not in text:
        return text
    out = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, sep, value = part.partition("=")
        if not sep or not name or not value:
            raise click.BadParameter(f"{part!r}; use PRECISION or COMPONENT=PRECISION,...", param_hint="--precision")
        out[name.strip()] = value.strip()
    return out


def _log(enabled: bool):
    return (lambda msg: click.echo(msg, err=True)) if enabled else (lambda msg: None)


@click.command("run")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--image", required=True, help="Image file, or a scikit-image sample name (astronaut, coffee, chelsea).")
@click.option("--question", required=True, help="The question about the image.")
@click.option("--stream", is_flag=True, help="Print the answer's tokens as they are generated.")
@click.option("--json", "as_json", is_flag=True, help="Print the reference --json fields plus tokens_per_s.")
@click.option("--max-new-tokens", type=int, default=64, show_default=True, help="Answer length cap.")
@click.option("--backend", type=BACKEND_CHOICE, default="auto", show_default=True, help="Vision graphs' backend.")
@click.option("--device", type=DEVICE_CHOICE, default="cpu", show_default=True)
@click.option("--precision", default=None, help="Override the bundle's plan: fp32 | fp16 | int8 | fp8, or "
              "COMPONENT=PRECISION,...")
@click.option("--experts", default=None, help="Override the routing with letters, e.g. 'A,D' (debugging).")
@click.option("--llm-threads", type=int, default=None, help="llama.cpp threads (default: the bundle's).")
@click.option("--f32-kv", is_flag=True, help="F32 KV cache in llama.cpp (exact parity with an f32 GGUF).")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the bundle's files at load.")
@one_line_errors
def run(bundle: Path, image: str, question: str, stream: bool, as_json: bool, max_new_tokens: int, backend: str,
        device: str, precision: str | None, experts: str | None, llm_threads: int | None, f32_kv: bool,
        no_verify: bool) -> None:
    """Answer a question about an image with a bundle (ONNX Runtime / TensorRT vision, llama.cpp LLM)."""
    from .runtime import MoVARuntime

    forced = _parse_letters(experts) if experts is not None else None
    frame = _resolve_image(image)
    with MoVARuntime.from_bundle(bundle, device=device, backend=backend, precision=_precision(precision),
                                 llm_threads=llm_threads, verify=not no_verify, llm_f32_kv=f32_kv) as rt:
        answer_stream = rt.ask_stream(frame, question, max_new_tokens, experts=forced)
        for piece in answer_stream:
            if stream:  # with --json the pieces go to stderr so stdout stays one JSON document
                click.echo(piece, nl=False, err=as_json)
                (sys.stderr if as_json else sys.stdout).flush()
        answer = answer_stream.answer
    if stream:
        click.echo("", err=as_json)
    if as_json:
        click.echo(json.dumps(answer.to_json()))
        return
    click.echo(f"routing output: {answer.routing_text!r}")
    click.echo(f"experts: {', '.join(answer.experts) or 'none'}")
    if not stream:
        click.echo(f"answer: {answer.text}")
    t = answer.timings_ms
    click.echo(f"latency: total {t['total']:.1f} ms, first token {t['time_to_first_token']:.1f} ms, "
               f"decode {answer.tokens_per_s:.1f} tokens/s")


@click.group("bench")
def bench() -> None:
    """Benchmarks of a bundle against the PyTorch reference: latency per stage, accuracy parity."""


@bench.command("latency")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--runs", type=int, default=5, show_default=True, help="Measured requests (after warm-up).")
@click.option("--warmup", type=int, default=1, show_default=True, help="Extra warm-up requests.")
@click.option("--image", "images", multiple=True, help="Image file or sample name (repeat; default astronaut, "
              "coffee, chelsea, each with its sample question).")
@click.option("--question", default=None, help="One question for every image (default: the samples' own).")
@click.option("--max-new-tokens", type=int, default=16, show_default=True)
@click.option("--backend", type=BACKEND_CHOICE, default="auto", show_default=True)
@click.option("--device", type=DEVICE_CHOICE, default="cpu", show_default=True)
@click.option("--precision", default=None, help="Override the bundle's plan (see `run --precision`).")
@click.option("--experts", default=None, help="Force the routing, e.g. 'A,D', in every request.")
@click.option("--no-reference", is_flag=True, help="Skip the PyTorch reference side (and the ratio column).")
@click.option("--llm-threads", type=int, default=None)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("bench-results"), show_default=True,
              help="Folder for latency.json, latency.md and latency.png.")
@one_line_errors
def latency(bundle: Path, runs: int, warmup: int, images: tuple[str, ...], question: str | None,
            max_new_tokens: int, backend: str, device: str, precision: str | None, experts: str | None,
            no_reference: bool, llm_threads: int | None, out_dir: Path) -> None:
    """Per-stage p50/p95 latency, decode tokens/s and peak memory, side by side with the PyTorch reference."""
    from .bench import latency_benchmark

    result = latency_benchmark(bundle, runs=runs, warmup=warmup, images=list(images) or None, question=question,
                               max_new_tokens=max_new_tokens, device=device, backend=backend,
                               precision=_precision(precision),
                               experts=_parse_letters(experts) if experts is not None else None,
                               reference=not no_reference, llm_threads=llm_threads, out_dir=out_dir, log=_log(True))
    click.echo(Path(result["files"]["markdown"]).read_text())
    click.echo(f"wrote {', '.join(result['files'].values())}")


@bench.command("parity")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--image", "images", multiple=True, help="Image file or sample name (repeat; default: six "
              "scikit-image samples with their questions).")
@click.option("--question", default=None, help="One question for every image (default: the samples' own).")
@click.option("--config", "configs", multiple=True, help="BACKEND[:PRECISION] to compare (repeat; default "
              "onnxruntime:fp32 plus the bundle's own plan when it is not all fp32).")
@click.option("--max-new-tokens", type=int, default=16, show_default=True)
@click.option("--device", type=DEVICE_CHOICE, default="cpu", show_default=True)
@click.option("--experts", default=None, help="Force this routing on both sides, e.g. 'A,D,F' (exercises the "
              "expert graphs when the LLM routes none).")
@click.option("--llm-threads", type=int, default=None)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("bench-results"), show_default=True,
              help="Folder for parity.json, parity.md and parity.png.")
@one_line_errors
def parity(bundle: Path, images: tuple[str, ...], question: str | None, configs: tuple[str, ...],
           max_new_tokens: int, device: str, experts: str | None, llm_threads: int | None, out_dir: Path) -> None:
    """Routing agreement, per-graph cosine, answer exact match vs the PyTorch reference, per backend and precision."""
    from .bench import parity_benchmark, parse_config

    result = parity_benchmark(bundle, images=list(images) or None, question=question,
                              configs=[parse_config(c) for c in configs] or None, max_new_tokens=max_new_tokens,
                              device=device, llm_threads=llm_threads,
                              experts=_parse_letters(experts) if experts is not None else None, out_dir=out_dir,
                              log=_log(True))
    click.echo(Path(result["files"]["markdown"]).read_text())
    click.echo(f"wrote {', '.join(result['files'].values())}")


__all__ = ["bench", "run"]

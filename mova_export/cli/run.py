"""`mova-export run` and `mova-export bench latency|parity`: thin click commands over the runtime and bench/.

Importing this module imports neither torch nor the build side: `run` works in a device-only install."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from .common import one_line_errors, parse_letters, resolve_image

BACKEND_CHOICE = click.Choice(["auto", "onnxruntime", "tensorrt"])
DEVICE_CHOICE = click.Choice(["cpu", "cuda"])
DEVICE_HELP = "cpu, or cuda: ONNX Runtime's CUDA provider / TensorRT engines and llama.cpp GPU layers."
BACKEND_HELP = "Vision graphs: onnxruntime, tensorrt (the bundle's engines) or auto (engines where usable here)."
PRECISION_HELP = "Graph precision instead of the bundle's plan: fp32 | fp16 | int8 | fp8, or GRAPH=PRECISION,..."
THREADS_HELP = "llama.cpp threads (default: the recipe's, capped at this host's cores)."
LLM_HELP = "Which of the bundle's GGUF types to load (default: the recipe's; see `mova-export inspect`)."
TRUSTED_KEY_HELP = ("Refuse the bundle unless it is signed (`mova-export sign`) by this PEM public key (or a chain to "
                    "this root CA certificate) and unchanged since: checked before anything is loaded.")


def runtime_choices(command: Any) -> Any:
    """The options that pick how a bundle runs (backend, device, graph precision, GGUF) and which signer it must
    have, shared by every command that loads a bundle's runtime (run, serve, replay, bench latency)."""
    for option in reversed((
            click.option("--backend", type=BACKEND_CHOICE, default="auto", show_default=True, help=BACKEND_HELP),
            click.option("--device", type=DEVICE_CHOICE, default="cpu", show_default=True, help=DEVICE_HELP),
            click.option("--precision", default=None, help=PRECISION_HELP),
            click.option("--llm", "llm_quant", default=None, help=LLM_HELP),
            click.option("--trusted-key", type=click.Path(path_type=Path), default=None, help=TRUSTED_KEY_HELP))):
        command = option(command)
    return command


def _precision(text: str | None) -> Any:
    """"int8" for every graph, or "base=fp16,adapter=fp32" per graph; None keeps the bundle's plan."""
    if text is None or "=" not in text:
        return text
    out = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, sep, value = part.partition("=")
        if not sep or not name or not value:
            raise click.BadParameter(f"{part!r}; use PRECISION or GRAPH=PRECISION,...", param_hint="--precision")
        out[name.strip()] = value.strip()
    return out


def _options(device: str, backend: str, precision: str | None, llm_threads: int | None, llm_quant: str | None,  # noqa: PLR0913 (the shared runtime options)
             f32_kv: bool = False, verify: bool = True, trusted_key: Path | None = None) -> Any:
    from ..runtime import RuntimeOptions

    llm: dict[str, Any] = {"f32_kv": True} if f32_kv else {}
    if llm_threads:
        llm["n_threads"] = llm_threads
    return RuntimeOptions(device=device, backend=backend, precision=_precision(precision), llm=llm,
                          llm_quant=llm_quant, verify=verify, trusted_key=trusted_key)


def _log(msg: str) -> None:
    click.echo(msg, err=True)


@click.command("run")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--image", required=True, help="Image file, or a scikit-image sample name (astronaut, coffee, chelsea).")
@click.option("--question", required=True, help="The question about the image.")
@click.option("--stream", is_flag=True, help="Print the answer's tokens as they are generated.")
@click.option("--json", "as_json", is_flag=True, help="Print the reference --json fields plus tokens_per_s.")
@click.option("--max-new-tokens", type=int, default=64, show_default=True, help="Answer length cap.")
@runtime_choices
@click.option("--experts", default=None, help="Override the routing with letters, e.g. 'A,D' (debugging).")
@click.option("--llm-threads", type=int, default=None, help=THREADS_HELP)
@click.option("--f32-kv", is_flag=True, help="F32 KV cache in llama.cpp (exact parity with an f32 GGUF).")
@click.option("--warmup", is_flag=True, help="Run one warm-up request first, so the timings are a warm request's.")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the bundle's files at load.")
@one_line_errors
def run(bundle: Path, image: str, question: str, stream: bool, as_json: bool, max_new_tokens: int, backend: str,
        device: str, precision: str | None, llm_quant: str | None, trusted_key: Path | None, experts: str | None,
        llm_threads: int | None, f32_kv: bool, warmup: bool, no_verify: bool) -> None:
    """Answer a question about an image with a bundle (ONNX Runtime / TensorRT vision, llama.cpp LLM).

    Without --warmup the timings are those of the process's first request: they include one-time initialisation
    (ONNX Runtime's first-run allocations, llama.cpp's graph), reported as `cold_start` in --json."""
    from ..runtime import MoVARuntime

    frame = resolve_image(image)
    start = time.perf_counter()
    with MoVARuntime.from_bundle(bundle, _options(device, backend, precision, llm_threads, llm_quant, f32_kv,
                                                  not no_verify, trusted_key)) as rt:
        load_ms = (time.perf_counter() - start) * 1e3
        forced = parse_letters(experts, rt.facts.letters) if experts is not None else None
        if warmup:
            rt.warmup(question)
        answer_stream = rt.ask_stream(frame, question, max_new_tokens, experts=forced)
        for piece in answer_stream:
            if stream:  # with --json the pieces go to stderr so stdout stays one JSON document
                click.echo(piece, nl=False, err=as_json)
                (sys.stderr if as_json else sys.stdout).flush()
        answer = answer_stream.answer
    if stream:
        click.echo("", err=as_json)
    if as_json:
        click.echo(json.dumps({**answer.to_json(), "load_ms": round(load_ms, 1), "cold_start": not warmup}))
        return
    click.echo(f"routing output: {answer.routing_text!r}")
    click.echo(f"experts: {', '.join(answer.experts) or 'none'}")
    if not stream:
        click.echo(f"answer: {answer.text}")
    t = answer.timings_ms
    when = "warm request" if warmup else "first request of this process, includes one-time initialisation"
    click.echo(f"latency ({when}): total {t['total']:.1f} ms, first token {t['time_to_first_token']:.1f} ms, "
               f"decode {answer.tokens_per_s:.1f} tokens/s; bundle loaded in {load_ms:.0f} ms")


@click.group("bench")
def bench() -> None:
    """Benchmarks of a bundle against the PyTorch reference: latency per stage, accuracy parity."""


@bench.command("latency")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--runs", type=int, default=5, show_default=True, help="Measured requests (after warm-up).")
@click.option("--warmup", type=int, default=1, show_default=True, help="Extra warm-up requests.")
@click.option("--image", "images", multiple=True, help="Image file or sample name (repeat; default: the demo's "
              "questions about sample photos).")
@click.option("--question", default=None, help="One question for every image (default: each image's own).")
@click.option("--max-new-tokens", type=int, default=16, show_default=True, help="Answer length cap per request.")
@runtime_choices
@click.option("--experts", default=None, help="Force the routing, e.g. 'A,D', in every request.")
@click.option("--no-reference", is_flag=True, help="Skip the PyTorch reference side (and the ratio column).")
@click.option("--llm-threads", type=int, default=None, help=THREADS_HELP)
@click.option("--robot-loop", is_flag=True, help="Also: three questions per frame with and without the frame cache, "
              "and time to first token with and without the overlap thread.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("bench-results"), show_default=True,
              help="Folder for latency.json, latency.md and latency.png.")
@one_line_errors
def latency(bundle: Path, runs: int, warmup: int, images: tuple[str, ...], question: str | None,
            max_new_tokens: int, backend: str, device: str, precision: str | None, llm_quant: str | None,
            trusted_key: Path | None, experts: str | None, no_reference: bool, llm_threads: int | None,
            robot_loop: bool, out_dir: Path) -> None:
    """Per-stage p50/p95 latency, decode tokens/s and peak memory, side by side with the PyTorch reference."""
    from ..bench import latency_benchmark

    result = latency_benchmark(bundle, runs=runs, warmup=warmup, images=list(images) or None, question=question,
                               max_new_tokens=max_new_tokens,
                               options=_options(device, backend, precision, llm_threads, llm_quant,
                                                trusted_key=trusted_key),
                               experts=[e.strip().upper() for e in experts.split(",") if e.strip()]
                               if experts is not None else None,
                               reference=not no_reference, out_dir=out_dir, log=_log, robot_loop=robot_loop)
    click.echo(Path(result["files"]["markdown"]).read_text())
    click.echo(f"wrote {', '.join(result['files'].values())}")


@bench.command("parity")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--image", "images", multiple=True, help="Image file or sample name (repeat; default: the demo's "
              "questions about sample photos).")
@click.option("--question", default=None, help="One question for every image (default: each image's own).")
@click.option("--config", "configs", multiple=True, help="BACKEND[:PRECISION[:LLM]] to compare (repeat; default: "
              "every graph precision the bundle ships with its most exact GGUF, and the bundle's plan with every GGUF "
              "it ships).")
@click.option("--max-new-tokens", type=int, default=16, show_default=True, help="Answer length cap per question.")
@click.option("--device", type=DEVICE_CHOICE, default="cpu", show_default=True, help=DEVICE_HELP)
@click.option("--experts", default=None, help="Force this routing on both sides, e.g. 'A,D,F' (exercises the "
              "expert graphs when the LLM routes none).")
@click.option("--llm-threads", type=int, default=None, help=THREADS_HELP)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("bench-results"), show_default=True,
              help="Folder for parity.json, parity.md and parity.png.")
@one_line_errors
def parity(bundle: Path, images: tuple[str, ...], question: str | None, configs: tuple[str, ...],
           max_new_tokens: int, device: str, experts: str | None, llm_threads: int | None, out_dir: Path) -> None:
    """Routing agreement, equal answers, first divergence and per-graph cosine vs the PyTorch reference, per
    configuration (graph precision x GGUF type)."""
    from ..bench import ParityConfig, parity_benchmark

    result = parity_benchmark(bundle, images=list(images) or None, question=question,
                              configs=[ParityConfig.parse(c) for c in configs] or None,
                              max_new_tokens=max_new_tokens, device=device, llm_threads=llm_threads,
                              experts=[e.strip().upper() for e in experts.split(",") if e.strip()]
                              if experts is not None else None, out_dir=out_dir, log=_log)
    click.echo(Path(result["files"]["markdown"]).read_text())
    click.echo(f"wrote {', '.join(result['files'].values())}")

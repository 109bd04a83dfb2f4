"""`mova-export serve BUNDLE`: the OpenAI-compatible endpoint (mova_export/serve, the `serve` extra)."""
from __future__ import annotations

from pathlib import Path

import click

from .common import one_line_errors
from .run import THREADS_HELP, _options, runtime_choices


@click.command("serve")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every "
              "interface; set --api-key then).")
@click.option("--port", type=int, default=8000, show_default=True, help="TCP port.")
@click.option("--api-key", default=None, envvar="MOVA_API_KEY", help="Require `Authorization: Bearer KEY` on every "
              "endpoint but /health (or set MOVA_API_KEY).")
@click.option("--max-queue", type=click.IntRange(min=0), default=8, show_default=True,
              help="Requests that may wait behind the one being answered; more get 429 with Retry-After.")
@click.option("--max-image-pixels", type=click.IntRange(min=1), default=40_000_000, show_default=True,
              help="Largest image accepted (width x height, read before decoding).")
@click.option("--max-body-mb", type=click.FloatRange(min=0.01), default=20.0, show_default=True,
              help="Largest request body; 413 above.")
@click.option("--max-tokens", "default_max_tokens", type=click.IntRange(min=1), default=256, show_default=True,
              help="Answer cap when a request gives neither max_tokens nor max_completion_tokens.")
@click.option("--model-name", default=None, help="The model id clients pass (default: the bundle folder's name).")
@runtime_choices
@click.option("--llm-threads", type=int, default=None, help=THREADS_HELP)
@click.option("--f32-kv", is_flag=True, help="F32 KV cache in llama.cpp (exact parity with an f32 GGUF).")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the bundle's files at load.")
@one_line_errors
def serve(bundle: Path, host: str, port: int, api_key: str | None, max_queue: int, max_image_pixels: int,  # noqa: PLR0913 (one per option)
          max_body_mb: float, default_max_tokens: int, model_name: str | None, backend: str, device: str,
          precision: str | None, llm_quant: str | None, trusted_key: Path | None, llm_threads: int | None,
          f32_kv: bool, no_verify: bool) -> None:
    """Serve a bundle over the OpenAI chat-completions protocol (POST /v1/chat/completions, GET /v1/models,
    /health, /metrics). One request is answered at a time, the rest wait in arrival order. With --trusted-key the
    bundle's signature is checked before anything loads; a bundle that fails the check stops the server.

    \b
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' -d '{"model": "NAME",
      "messages": [{"role": "user", "content": [{"type": "text", "text": "What is in the image?"},
      {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}]}]}'
    """
    from ..bundle import load_bundle
    from ..runtime import MoVARuntime
    from ..serve import ServeOptions
    from ..serve import serve as run_server

    load_bundle(bundle, verify=False)          # a wrong path or manifest: one line now, before the port opens
    options = _options(device, backend, precision, llm_threads, llm_quant, f32_kv, not no_verify, trusted_key)
    name = model_name or Path(bundle).resolve().name
    click.echo(f"serving {bundle} as model {name!r} on http://{host}:{port} (loading; /health answers 200 when "
               "ready)", err=True)
    run_server(ServeOptions(model=name, api_key=api_key, max_queue=max_queue, max_image_pixels=max_image_pixels,
                            max_body_mb=max_body_mb, default_max_tokens=default_max_tokens),
               lambda: MoVARuntime.from_bundle(bundle, options), host=host, port=port)

"""Helpers every click command shares."""
from __future__ import annotations

import functools
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

import click

from .. import __version__
from ..core.errors import MoVAExportError

# The extra that brings each optional top-level module (pyproject.toml), for a one-line "install it" error.
EXTRA_OF = {"fastapi": "serve", "uvicorn": "serve", "starlette": "serve", "prometheus_client": "serve",
            "rosbags": "ros", "model_signing": "sign", "OpenSSL": "sign", "torch": "export", "transformers": "export",
            "onnx": "export", "onnxscript": "export", "onnxslim": "export", "gguf": "export", "skimage": "export",
            "matplotlib": "export", "filelock": "export", "llama_cpp": "llm", "tensorrt_rtx": "tensorrt-rtx"}


def one_line_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A MoVAExportError ends the command with `error: <message>` on stderr and exit code 2 (no traceback); any
    other exception is a bug: one `error: internal error ...` line naming the file its traceback went to, exit 1."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MoVAExportError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except ModuleNotFoundError as exc:
            extra = EXTRA_OF.get((exc.name or "").split(".")[0])
            if extra is None:
                _internal_error(exc)
            click.echo(f"error: this command needs the `{extra}` extra ({exc}); install it with "
                       f"pip install 'mova-export[{extra}]'", err=True)
            sys.exit(2)
        except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: the cleanup already ran in the library
            click.echo(f"error: interrupted ({exc or 'Ctrl-C'}); finished build units stay in the work folder, "
                       "re-run the same command to resume", err=True)
            sys.exit(130)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:  # a bug, not bad input: one line for the user, the traceback kept for the report
            _internal_error(exc)
    return wrapper


def _internal_error(exc: BaseException) -> NoReturn:
    click.echo(f"error: internal error in mova-export ({_first_line(exc)}); {_keep_traceback()}", err=True)
    sys.exit(1)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _keep_traceback() -> str:
    """Write the exception being handled to a file; say where, for a bug report."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    try:
        fd, path = tempfile.mkstemp(prefix=f"mova-export-error-{stamp}-", suffix=".txt")
        with os.fdopen(fd, "w") as f:
            f.write(f"mova-export {__version__}, python {platform.python_version()}\n{' '.join(sys.argv)}\n\n")
            f.write(traceback.format_exc())
    except OSError as exc:
        return f"its traceback could not be saved ({exc}); please report it with the command line"
    return f"the traceback is in {path}; please attach it to an issue"


def console():
    from rich.console import Console

    return Console(stderr=False, highlight=False)


def parse_components(text: str | None) -> list[str] | None:
    return None if text is None else [c.strip() for c in text.split(",") if c.strip()]


def parse_letters(text: str, letters: Sequence[str]) -> list[str]:
    """'A, d' -> ['A', 'D'], checked against the model's expert letters."""
    chosen = [p.strip().upper() for p in text.split(",") if p.strip()]
    bad = [p for p in chosen if p not in letters]
    if bad:
        raise click.BadParameter(f"unknown expert letter(s) {bad}; use {', '.join(letters)}", param_hint="--experts")
    return chosen


def resolve_image(image: str) -> Any:
    """A path, or the name of a scikit-image sample photo (lets the demo run with no files)."""
    if Path(image).exists():
        return Path(image)
    from ..source.photos import SAMPLE_QUESTIONS

    if image in SAMPLE_QUESTIONS:
        from ..source.photos import sample_images

        return sample_images([image])[image]
    from ..core.errors import RuntimeInputError

    raise RuntimeInputError(f"image {image!r} not found; pass an image file or one of {sorted(SAMPLE_QUESTIONS)}")

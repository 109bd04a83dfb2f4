"""Helpers every click command shares (cli.py and cli_run.py both import them; neither imports the other first)."""
from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any, Callable

import click

from .errors import MoVAExportError


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

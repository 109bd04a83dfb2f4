"""Write a folder atomically: build it in a temp folder beside the target, rename it into place at the end.

A failure (an error, Ctrl-C, SIGTERM once `terminate_as_interrupt` is installed) removes the temp folder, so no
half-written bundle is ever left behind and a previous bundle at the target stays untouched until the rename.
"""
from __future__ import annotations

import os
import shutil
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..core.errors import BundleError

PARTIAL_MARK = ".partial-"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_temp_dir(parent: Path, name: str) -> Path:
    """mkdtemp beside the target, with the permissions a plain mkdir would give (mkdtemp makes it owner-only)."""
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}{PARTIAL_MARK}", dir=parent))
    except OSError as exc:
        raise BundleError(f"folder {parent} is not writable ({exc.strerror or exc}); choose a folder you can "
                          "write to") from None
    tmp.chmod(0o777 & ~_umask())
    return tmp


def _finish(tmp: Path, out_dir: Path) -> None:
    """Move the finished temp dir into place; an old folder is swapped out first and removed afterwards."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_dir(out_dir: str | Path, overwrite: bool) -> Iterator[Path]:
    """A temp folder beside out_dir: renamed to out_dir when the block ends, removed when it raises."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise BundleError(f"output path {out_dir} is a file; pass a folder for the bundle")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise BundleError(f"output folder {out_dir} exists and is not empty; pass --overwrite or choose another")
    tmp = make_temp_dir(out_dir.absolute().parent, out_dir.name)
    try:
        yield tmp
        _finish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so every `finally` and `except BaseException` cleans up."""


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Inside the block SIGTERM raises Terminated in the main thread (the default would kill the process before any
    cleanup runs); the previous handler is restored afterwards. No-op outside the main thread."""
    try:
        previous = signal.getsignal(signal.SIGTERM)

        def handler(signum: int, frame: object) -> None:
            raise Terminated(f"terminated by signal {signum}")

        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)

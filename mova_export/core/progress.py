"""What long work shows a person: a bar per unit of work (its name, steps done of total, elapsed, an estimate), one
line per finished unit, the same lines in a log file; nothing but errors in quiet mode.

On a terminal the bars are rich's live progress; piped (CI, `| tee`) every step becomes a plain line, so logs stay
readable. Library code takes a `Console` and calls `line()` / `task()`; the NULL console does nothing.
"""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Callable, Iterator

Log = Callable[[str], None]   # where a library function reports a line of progress


def quiet(_: str) -> None:
    """A Log that drops every line."""


class Steps:
    """The handle of one running task: `advance(what)` after each step, `grow(n)` when more steps turn up."""

    def __init__(self, console: "Console", name: str, total: int, task_id: Any = None):
        self.console, self.name, self.total, self.task_id = console, name, max(1, total), task_id
        self.done = 0
        self.start = time.perf_counter()

    def advance(self, what: str = "") -> None:
        self.done += 1
        self.console._advance(self, what)

    def grow(self, n: int) -> None:
        self.total += n
        self.console._grow(self)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start


class Console:
    """Progress and log lines of one run. quiet: no console output; log_path: every line also goes there."""

    def __init__(self, quiet: bool = False, log_path: Path | None = None, stream: IO[str] | None = None):
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.start = time.perf_counter()
        self._log: IO[str] | None = None
        self._live = None
        self._rich = None
        if log_path is not None:
            self.log_to(log_path)
        if not quiet and self.stream.isatty():
            from rich.console import Console as RichConsole
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._rich = RichConsole(file=self.stream, highlight=False, soft_wrap=True)
            self._live = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("{task.fields[what]}"), TimeElapsedColumn(),
                                  TextColumn("eta"), TimeRemainingColumn(), console=self._rich, transient=True)

    def log_to(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(path, "a", encoding="utf-8")

    def close(self) -> None:
        if self._live is not None and self._live.live.is_started:
            self._live.stop()
        if self._log is not None:
            self._log.close()
            self._log = None

    def _stamp(self) -> str:
        return f"{time.perf_counter() - self.start:7.1f}s"

    def line(self, message: str) -> None:
        text = f"{self._stamp()} {message}"
        if self._log is not None:
            self._log.write(text + "\n")
            self._log.flush()
        if self.quiet:
            return
        if self._rich is not None:
            from rich.markup import escape

            self._rich.print(f"[dim]{self._stamp()}[/dim] {escape(message)}")
        else:
            print(text, file=self.stream, flush=True)

    @contextmanager
    def task(self, name: str, total: int) -> Iterator[Steps]:
        """A bar for one unit of work; on exit one line with its time (or that it failed)."""
        task_id = None
        if self._live is not None:
            if not self._live.live.is_started:
                self._live.start()
            task_id = self._live.add_task(name, total=max(1, total), what="")
        steps = Steps(self, name, total, task_id)
        self.line(f"{name}: started ({total} steps)")
        try:
            yield steps
        except BaseException as exc:
            self.line(f"{name}: stopped after {steps.elapsed:.1f} s ({type(exc).__name__})")
            raise
        finally:
            if task_id is not None:
                self._live.remove_task(task_id)
        self.line(f"{name}: done in {steps.elapsed:.1f} s")

    def _advance(self, steps: Steps, what: str) -> None:
        if self._log is not None and what:
            self._log.write(f"{self._stamp()} {steps.name}: {steps.done}/{steps.total} {what}\n")
            self._log.flush()
        if self.quiet:
            return
        if steps.task_id is not None:
            self._live.update(steps.task_id, completed=steps.done, what=what)
        elif what:
            print(f"{self._stamp()} {steps.name}: {steps.done}/{steps.total} {what}", file=self.stream, flush=True)

    def _grow(self, steps: Steps) -> None:
        if steps.task_id is not None:
            self._live.update(steps.task_id, total=steps.total)


class _Null(Console):
    def __init__(self) -> None:
        super().__init__(quiet=True)


NULL = _Null()

"""The build's work folder: every finished unit of work (a stage of one component) under its cache key.

    <work>/<stage>/<name>/<key>/          a finished unit: its files and unit.json (what it produced)
    <work>/<stage>/<name>/<key>.partial-<pid>/   a unit being produced (renamed into place when it finishes)
    <work>/.locks/<stage>.<name>.<key>.lock   held while the unit is produced: two builds on one work folder (two
                                          terminals, two CI jobs) never produce one unit at once; the second waits,
                                          then reuses it. An OS lock (flock): a killed build's lock is released with
                                          its process, so it never blocks the next build. Apart from the units so a
                                          failed unit leaves nothing in its stage folder; never deleted while in use
                                          (unlinking a flock file lets two holders in)

A unit's key hashes exactly what its output depends on (checkpoint fingerprint, calibration set, the recipe fields of
that component, the keys of the units it reads), so a change to one component's precision redoes that component's
quantization only, switching --target reuses every export, and two bundles built from one checkpoint into different
folders share the work. An interrupted build (Ctrl-C, SIGTERM, a crash, a full disk) leaves finished units in place:
re-running the same command resumes from them. The default folder is ~/.cache/mova-export/work (XDG_CACHE_HOME is
respected); `mova-export clean` removes it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from filelock import FileLock, Timeout

from ..bundle.staging import PARTIAL_MARK
from ..core.errors import BuildError

UNIT_FILE = "unit.json"
PRODUCED_FILE = "produced.json"   # what producing the unit cost (seconds, when): a resumed build still adds it up
STAMP_FILE = "stamps.json"     # size and mtime of every file when the unit finished: an edit since shows
GIB = 1 << 30


def default_work_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "mova-export" / "work"


def digest(*parts: Any) -> str:
    """16 hex digits of sha256 over the parts as canonical JSON: the cache key of a unit."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class Unit:
    stage: str
    name: str
    key: str
    path: Path

    @property
    def done(self) -> bool:
        return (self.path / UNIT_FILE).is_file()

    def changed_files(self) -> list[str]:
        """Files of a finished unit edited, added or removed since it finished (bundles hard-link these files, so an
        in-place edit of a bundle file lands here): such a unit is produced again, not reused."""
        try:
            recorded = json.loads((self.path / STAMP_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            return [STAMP_FILE]
        now = _stamps(self.path)
        return sorted(rel for rel in set(recorded) | set(now) if recorded.get(rel) != now.get(rel))

    @contextmanager
    def lock(self, waiting: Callable[[str], None] = lambda message: None) -> Iterator[None]:
        """Hold the unit's lock file (filelock: flock on POSIX, released by the OS when the holder dies). When another
        build holds it, `waiting` is told once and this waits until that build has finished the unit or died."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        locks = self.path.parents[2] / ".locks"
        locks.mkdir(exist_ok=True)
        lock = FileLock(str(locks / f"{self.stage}.{self.name}.{self.key}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            waiting(f"{self.stage} {self.name}: another build is producing this unit; waiting for it "
                    f"({lock.lock_file})")
            lock.acquire()
        try:
            yield
        finally:
            lock.release()

    def produced(self) -> dict[str, Any]:
        """What producing this unit cost ({"seconds", "finished_utc"}); {} for a unit finished before it was kept."""
        try:
            return dict(json.loads((self.path / PRODUCED_FILE).read_text()))
        except (OSError, json.JSONDecodeError, TypeError, ValueError):
            return {}

    def read(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / UNIT_FILE).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise BuildError(f"work unit {self.path} is unreadable ({exc}); remove it or run `mova-export clean`") \
                from None

    @contextmanager
    def produce(self) -> Iterator[Path]:
        """A temp folder to write the unit into; renamed to the unit's path when the block ends (the caller has then
        written unit.json), removed when it raises."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.key}{PARTIAL_MARK}{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            yield tmp
            if not (tmp / UNIT_FILE).is_file():
                raise BuildError(f"work unit {self.stage}/{self.name} finished without {UNIT_FILE}; this is a bug")
            for f in tmp.rglob("*"):   # read-only: the bundle's hard links to these files must not be edited
                if f.is_file():
                    f.chmod(f.stat().st_mode & ~0o222)
            (tmp / STAMP_FILE).write_text(json.dumps(_stamps(tmp), indent=1, sort_keys=True) + "\n")
            shutil.rmtree(self.path, ignore_errors=True)   # --no-reuse: replace the old result
            os.replace(tmp, self.path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _stamps(folder: Path) -> dict[str, list[int]]:
    out = {}
    for f in folder.rglob("*"):
        if f.is_file() and f.name != STAMP_FILE:
            st = f.stat()
            out[f.relative_to(folder).as_posix()] = [st.st_size, st.st_mtime_ns]
    return out


def write_unit(folder: Path, result: Mapping[str, Any], seconds: float | None = None) -> None:
    """The unit's result (unit.json) and, when given, what producing it took (produced.json)."""
    (folder / UNIT_FILE).write_text(json.dumps(result, indent=2) + "\n")
    if seconds is not None:
        finished = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        (folder / PRODUCED_FILE).write_text(json.dumps({"seconds": round(seconds, 2), "finished_utc": finished}) + "\n")


class WorkFolder:
    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_work_dir()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BuildError(f"work folder {self.root} cannot be created ({exc.strerror or exc}); pass --work-dir "
                             "with a writable folder") from None

    def unit(self, stage: str, name: str, key: str) -> Unit:
        return Unit(stage, name, key, self.root / stage / name / key)

    def partials(self) -> list[Path]:
        """Unit folders left by a process that is gone (killed before it could clean up)."""
        out = []
        for p in self.root.glob(f"*/*/*{PARTIAL_MARK}*"):
            pid = p.name.rsplit(PARTIAL_MARK, 1)[-1]
            if not pid.isdigit() or not _pid_alive(int(pid)):
                out.append(p)
        return out

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())

    def require_free(self, needed_bytes: int, what: str) -> None:
        """Refuse, with the number needed, before a unit that would not fit on the work folder's disk."""
        free = shutil.disk_usage(self.root).free
        if needed_bytes > free:
            raise BuildError(f"{what} needs about {needed_bytes / GIB:.1f} GiB free in {self.root}, which has "
                             f"{free / GIB:.1f} GiB; free some space or pass --work-dir on a larger disk")


def clean(root: str | Path | None = None, partials_only: bool = False) -> tuple[int, int]:
    """Remove the work folder (or only the leftovers of killed builds); returns (folders removed, bytes freed)."""
    work = Path(root) if root is not None else default_work_dir()
    if not work.is_dir():
        return 0, 0
    folder = WorkFolder(work)
    targets = folder.partials() if partials_only else [work]
    freed = 0
    for target in targets:
        freed += sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
        shutil.rmtree(target, ignore_errors=True)
    return len(targets), freed

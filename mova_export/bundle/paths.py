"""Containment: every path a manifest names stays inside its bundle (pure Python).

A bundle travels (build box -> fleet -> robot) and whoever edits it can edit manifest.json too, so the manifest's
paths are outside input: an absolute path, a `..` part or a symlink that leaves the bundle would make the verifier
hash, and the runtime load, a file the bundle does not hold. `check_contained` refuses each by name before any file
is read; it runs on every load, with or without the sha256 check.
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Iterator

from ..core.errors import BundleError

if TYPE_CHECKING:  # pragma: no cover
    from .manifest import Manifest


def manifest_paths(manifest: "Manifest") -> Iterator[tuple[str, Any]]:
    """(where in the manifest, bundle-relative path) for every path the manifest names."""
    for rel in manifest.files:
        yield "file table", rel
    for name, graph in manifest.graphs.items():
        for precision, variant in graph.variants.items():
            yield f"graphs.{name}.variants.{precision}.graph", variant.graph
            for rel in variant.files:
                yield f"graphs.{name}.variants.{precision}.files", rel
    for which, entry in manifest.tokenizers.items():     # shapes checked by Manifest.from_json
        folder = entry.get("dir")
        yield f"tokenizers.{which}.dir", folder
        for name in entry.get("files") or []:
            yield f"tokenizers.{which}.files", f"{folder}/{name}" if isinstance(folder, str) and isinstance(
                name, str) else name
    if manifest.llm is not None:
        yield "llm.gguf", manifest.llm.gguf
    for qtype, llm in manifest.llms.items():
        yield f"llms.{qtype}.gguf", llm.gguf
    for graph, rel in manifest.checks.items():
        yield f"checks.{graph}", rel
    for graph, entry in manifest.engines.items():
        for key in ("engine", "metadata"):
            if entry.get(key) is not None:
                yield f"engines.{graph}.{key}", entry[key]
    for key, rel in (manifest.report or {}).items():
        yield f"report.{key}", rel


def inside(root: Path, rel: Any, where: str) -> Path:
    """root / rel, refused (BundleError naming the entry) unless it is a relative path that stays inside root once
    every symlink on the way is followed."""
    where = repr(where)[1:-1][:160]      # names from the manifest: printable, on one line
    if not isinstance(rel, str) or not rel.strip():
        raise BundleError(f"bundle {root}: manifest entry {where} is {repr(rel)[:80]}, not a path; the manifest was "
                          "edited or damaged: rebuild the bundle")
    problem = None
    parts = PurePosixPath(rel).parts
    if any(ord(c) < 0x20 or c == "\x7f" for c in rel):
        problem = "holds control characters"
    elif rel.startswith(("/", "\\")) or (len(rel) > 1 and rel[1] == ":"):
        problem = "is an absolute path"
    elif "\\" in rel:
        problem = "uses backslashes"
    elif ".." in parts:
        problem = "climbs out with '..'"
    if problem is None:
        path = root / rel
        try:
            real, top = path.resolve(), root.resolve()
        except (OSError, RuntimeError) as exc:   # a symlink loop
            raise BundleError(f"bundle {root}: {where} path {rel!r} cannot be resolved ({exc}); rebuild the bundle") \
                from None
        if real != top and top not in real.parents:
            problem = f"is a symlink (or lies under one) to {str(real)!r}, outside the bundle"
    if problem is not None:
        raise BundleError(f"bundle {root}: {where} path {rel[:200]!r} {problem}; a bundle only names its own files: "
                          "refusing it (rebuild the bundle or get it again from its source)")
    return path


def check_contained(root: Path, manifest: "Manifest") -> None:
    """Every path the manifest names stays inside root (see `inside`)."""
    for where, rel in manifest_paths(manifest):
        inside(root, rel, where)

"""Hashes, file tables, the source checkpoint's fingerprint and the tool versions a bundle records (pure Python)."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

from ..core.errors import CheckpointError

# What `tool_versions` records: the build side's libraries where installed (the device side records its own).
TOOL_DISTRIBUTIONS = ("torch", "onnx", "onnxruntime", "onnxscript", "onnx-ir", "onnxslim", "transformers", "numpy",
                      "tokenizers", "gguf", "llama-cpp-python", "tensorrt", "tensorrt_rtx_cu12_bindings",
                      "nvidia-modelopt")


def sha256_file(path: str | Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_table(root: Path, skip: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """{bundle-relative path: {sha256, bytes}} of every file under root except the names in `skip`."""
    return FileTable(root).scan(skip).entries


class FileTable:
    """The manifest's file table, filled once per build: each file is hashed the first time it is added and never
    again (a rescan adds only files it has not seen, e.g. engines and the report written after the graphs)."""

    def __init__(self, root: Path, entries: dict[str, dict[str, Any]] | None = None):
        self.root = Path(root)
        self.entries: dict[str, dict[str, Any]] = dict(entries or {})

    def add(self, rel: str, sha256: str | None = None) -> dict[str, Any]:
        """Record one file (hashing it unless its sha256 is known) and return its entry."""
        path = self.root / rel
        self.entries[rel] = {"sha256": sha256 or sha256_file(path), "bytes": path.stat().st_size}
        return self.entries[rel]

    def scan(self, skip: tuple[str, ...] = ()) -> "FileTable":
        """Add every file under root not yet in the table, except the names in `skip`."""
        for p in sorted(self.root.rglob("*")):
            rel = p.relative_to(self.root).as_posix()
            if p.is_file() and p.name not in skip and rel not in self.entries:
                self.add(rel)
        self.entries = dict(sorted(self.entries.items()))
        return self

    def sha256(self, rel: str) -> str:
        return self.entries[rel]["sha256"] if rel in self.entries else self.add(rel)["sha256"]


def checkpoint_fingerprint(checkpoint_dir: str | Path) -> dict[str, Any]:
    """Identify the source checkpoint cheaply: sha256 of config.json and the shard index, shard names and sizes
    (not the shard bytes: 23 GB would take minutes to hash), and one digest over all of it."""
    checkpoint_dir = Path(checkpoint_dir)
    info: dict[str, Any] = {"path": str(checkpoint_dir.resolve()),
                            "config_sha256": sha256_file(checkpoint_dir / "config.json")}
    indexes = sorted(checkpoint_dir.glob("*.index.json"))
    shards: set[str] = set()
    if indexes:
        info["index"] = {p.name: sha256_file(p) for p in indexes}
        for p in indexes:
            try:
                shards.update(json.loads(p.read_text()).get("weight_map", {}).values())
            except json.JSONDecodeError:
                raise CheckpointError(f"{p} is not valid JSON; re-download the checkpoint index") from None
    else:
        shards = {p.name for p in checkpoint_dir.iterdir() if p.suffix in (".bin", ".safetensors")}
    info["shards"] = [{"name": s, "bytes": (checkpoint_dir / s).stat().st_size if (checkpoint_dir / s).exists()
                       else None} for s in sorted(shards)]
    info["digest"] = hashlib.sha256(json.dumps({k: v for k, v in info.items() if k != "path"},
                                               sort_keys=True).encode()).hexdigest()
    return info


def tool_versions() -> dict[str, str]:
    from .. import __version__

    out = {"python": platform.python_version(), "mova_export": __version__}
    for dist in TOOL_DISTRIBUTIONS:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def link_or_copy(src: Path, dst: Path, *, link: bool = True) -> None:
    """Put src at dst: a hard link when `link` and both are on one filesystem (no copy of gigabytes), else a copy.
    Whatever was at dst is unlinked first, so a file linked there before is never written through."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copy2(src, dst)

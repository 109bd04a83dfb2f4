"""`mova-export inspect`: one describe() for checkpoints and bundles, rendered as rich tables."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import MoVAExportError


def describe_path(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if (path / "manifest.json").is_file():
        from .bundle import describe_bundle

        return describe_bundle(path)
    if (path / "config.json").is_file():
        from .checkpoint import describe

        return {"kind": "checkpoint", **describe(path)}
    if not path.exists():
        raise MoVAExportError(f"{path} does not exist; pass a checkpoint folder (config.json + shards) or a bundle "
                              "folder (manifest.json)")
    raise MoVAExportError(f"{path} holds neither config.json (checkpoint) nor manifest.json (bundle); pass one of those")


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


def _human_count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def render_description(info: dict[str, Any], console) -> None:
    from rich.table import Table

    if info.get("kind") == "bundle":
        console.print(f"[bold]bundle[/bold] {info['path']}  format {info['format_version']}  "
                      f"{info['num_files']} files, {_human_bytes(info['total_bytes'])}  "
                      f"(files verified: {info['verified']})")
        table = Table("component", "precision", "inputs", "outputs", "size", "min cosine", "max rel L2")
        for g in info["graphs"]:
            table.add_row(g["component"], g["precision"], "\n".join(g["inputs"]), "\n".join(g["outputs"]),
                          _human_bytes(g["bytes"]), f"{g['min_cosine']:.6f}", f"{g['max_rel_l2']:.2e}")
        console.print(table)
        return

    cfg = info["config"]
    console.print(f"[bold]checkpoint[/bold] {info['path']}  scale {cfg['scale']}  format {info['format']}  "
                  f"{len(info['shards'])} shard(s), {_human_bytes(info['disk_bytes'])} on disk")
    table = Table("component", "params", "tensors", "size", "dtypes")
    for name, c in info["components"].items():
        table.add_row(name, _human_count(c["params"]), str(c["tensors"]), _human_bytes(c["bytes"]),
                      ", ".join(f"{k}x{v}" for k, v in sorted(c["dtypes"].items())))
    totals = info["totals"]
    table.add_row("[bold]total[/bold]", _human_count(totals["params"]), str(totals["tensors"]),
                  _human_bytes(totals["bytes"]), "")
    console.print(table)
    if info.get("missing_components"):
        console.print(f"[red]missing components:[/red] {', '.join(info['missing_components'])}")
    if info.get("unowned_keys"):
        console.print(f"[yellow]{len(info['unowned_keys'])} keys belong to no component[/yellow], "
                      f"e.g. {info['unowned_keys'][:3]}")
    if cfg.get("defaulted"):
        console.print(f"inferred defaults in use (not in config.json): {', '.join(cfg['defaulted'])}")

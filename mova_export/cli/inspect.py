"""`mova-export inspect`: one description for checkpoints and bundles, rendered as rich tables."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..core.errors import MoVAExportError, SignatureError


def describe_path(path: str | Path, verify: bool = True, trusted_key: str | Path | None = None) -> dict[str, Any]:
    path = Path(path)
    if (path / "manifest.json").is_file():
        return describe_bundle(path, verify, trusted_key)
    if (path / "config.json").is_file():
        from ..source.checkpoint import describe

        return {"kind": "checkpoint", **describe(path)}
    if not path.exists():
        raise MoVAExportError(f"{path} does not exist; pass a checkpoint folder (config.json + shards) or a bundle "
                              "folder (manifest.json)")
    raise MoVAExportError(f"{path} holds neither config.json (checkpoint) nor manifest.json (bundle); pass one of those")


def describe_bundle(path: str | Path, verify: bool = True, trusted_key: str | Path | None = None) -> dict[str, Any]:
    """What `mova-export inspect BUNDLE` shows: one row per graph variant (quantized ones included), the LLMs, the
    engines with their flavor and whether their parity was checked on a GPU, and who signed it."""
    from ..bundle import load_bundle

    bundle = load_bundle(path, verify=verify)
    signature = describe_signature(bundle.path, trusted_key)
    m = bundle.manifest
    graphs = []
    for name, g in m.graphs.items():
        for precision, v in g.variants.items():
            graphs.append({
                "graph": name, "component": g.component, "role": g.role, "precision": precision,
                "shipped": m.runtime.precision.get(name) == precision, "file": v.graph, "files": len(v.files),
                "bytes": v.bytes, "nodes": v.nodes, "inputs": [t.describe() for t in g.inputs],
                "outputs": [t.describe() for t in g.outputs], "axes": g.axes, "form": g.form,
                "reference": (v.parity or {}).get("reference", "PyTorch module"),
                "parity_samples": (v.parity or {}).get("num_samples"), "min_cosine": v.min_cosine(),
                "max_rel_l2": v.max_rel_l2(), "decision": (v.decision or {}).get("final"),
            })
    engines = [{"graph": name, **{k: e.get(k) for k in ("engine", "precision", "flavor", "tensorrt_version",
                                                          "compute_capability", "verified", "parity")},
                **_engine_figures(bundle.path, e)} for name, e in m.engines.items()]
    return {"kind": "bundle", "path": str(bundle.path), "verified": verify, "scale": m.scale,
            "created_utc": m.created_utc, "target": m.target, "graphs": graphs, "engines": engines,
            "llms": {q: e.to_json() for q, e in (m.llms or ({m.llm.qtype: m.llm} if m.llm else {})).items()},
            "default_llm": m.llm.qtype if m.llm else None, "experts": list(m.model.letters),
            "text_buckets": list(m.model.text_buckets), "tools": m.tools, "source_checkpoint": m.source_checkpoint,
            "total_bytes": sum(f["bytes"] for f in m.files.values()), "num_files": len(m.files),
            "signature": signature}


def describe_signature(root: Path, trusted_key: str | Path | None) -> dict[str, Any] | None:
    """Who signed the bundle and whether it verifies: None when unsigned; `verified` is None without a trusted key
    (the signature is then only read), else True, or False with the one-line `problem`."""
    from ..bundle.signing import read_signature, verify_bundle

    try:
        claimed = read_signature(root)
    except SignatureError as exc:
        return {"signer": None, "verified": False, "problem": str(exc)}
    if claimed is None:
        if trusted_key is None:
            return None
        return {"signer": None, "verified": False, "problem": f"the bundle is not signed; sign it with `mova-export "
                                                              f"sign {root} --key KEY`"}
    info = {**claimed.to_json(), "problem": None}
    if trusted_key is not None:
        try:
            info.update(verify_bundle(root, trusted_key).to_json())
        except SignatureError as exc:
            info.update(verified=False, trusted=str(trusted_key), problem=str(exc))
    return info


def _engine_figures(root: Path, entry: dict[str, Any]) -> dict[str, Any]:
    """Size, build seconds, fp32 share of the compute layers and the platform it was built for (JetPack, compute
    capability, TensorRT, CUDA major: core.platforms.EnginePlatform), from the engine's metadata file (hashed with
    the bundle, so it is the one the engine was built with)."""
    from ..core.platforms import EnginePlatform

    meta_file = Path(root) / str(entry.get("metadata") or f"{entry.get('engine')}.json")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError):
        meta = {}
    layers = meta.get("layers") or {}
    share = layers["fp32"] / layers["compute_layers"] if layers.get("compute_layers") else None
    platform = EnginePlatform.from_json({**entry, **(entry.get("platform") or {}), **meta})
    return {"bytes": meta.get("engine_bytes"), "build_s": meta.get("build_s"), "fp32_layer_share": share,
            "platform": {**platform.to_json(), "describe": platform.describe()}}


def _signature_line(sig: dict[str, Any] | None) -> str:
    if sig is None:
        return "signature: none (unsigned; `mova-export sign BUNDLE --key KEY` signs it)"
    if sig.get("signer") is None:
        return f"signature: {sig['problem']}"
    head = f"signature: signed by {sig['signer']} ({sig['kind']}, {sig['files']} files)"
    if sig["verified"] is None:
        return head + "; not checked (pass --trusted-key PUBLIC.pem to verify it)"
    if sig["verified"]:
        return head + f"; verifies with {sig['trusted']}"
    return head + f"; DOES NOT VERIFY with {sig['trusted']}: {sig['problem']}"


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


def _num(x: Any, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def render_description(info: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    if info.get("kind") == "bundle":
        target = (info.get("target") or {}).get("recipe", "no target (export only)")
        console.print(f"[bold]bundle[/bold] {info['path']}  {target}, {info['scale']} scale  {info['num_files']} "
                      f"files, {_human_bytes(info['total_bytes'])}  (files verified: {info['verified']})")
        from rich import box

        # variants in one table, shapes (one row per graph) in another: both stay readable at 80 columns
        table = Table(title="graphs (graphs/<graph>.<precision>.onnx)", title_justify="left", box=box.SIMPLE_HEAD,
                      caption="* the precision the runtime runs; min cosine: lowest over the parity inputs, against "
                              "'vs'", caption_justify="left")
        for col in ("graph", "precision", "size", "min cosine", "vs"):
            table.add_column(col, no_wrap=col != "vs", overflow="fold",
                             justify="right" if col in ("size", "min cosine") else "left")
        for g in info["graphs"]:
            table.add_row(g["graph"], g["precision"] + (" *" if g["shipped"] else ""), _human_bytes(g["bytes"]),
                          _num(g["min_cosine"], ".6f"), g["reference"])
        console.print(table)
        shapes = Table(title="graph inputs and outputs (static shapes)", title_justify="left", box=box.SIMPLE_HEAD)
        shapes.add_column("graph", no_wrap=True)
        shapes.add_column("inputs", overflow="fold")
        shapes.add_column("outputs", overflow="fold")
        seen: set[str] = set()
        for g in info["graphs"]:
            if g["graph"] not in seen:
                seen.add(g["graph"])
                shapes.add_row(g["graph"], "\n".join(g["inputs"]), "\n".join(g["outputs"]))
        console.print(shapes)
        if info["llms"]:
            console.print("LLM: " + ", ".join(f"{q} {e['gguf']}" + (" (default)" if q == info["default_llm"] else "")
                                              for q, e in info["llms"].items()))
        if info["engines"]:
            flavors = sorted({f"{e['flavor']} {e['tensorrt_version']}" for e in info["engines"]})
            engines = Table(title=f"TensorRT engines ({', '.join(flavors)}): engines/<graph>.<precision>.engine",
                            title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
                            caption="fp32 layers: share of the compute layers TensorRT runs in fp32; verified: "
                                    "checked against the ONNX graph on a GPU", caption_justify="left")
            for col in ("graph", "precision", "cc", "size", "build s", "fp32 layers", "verified"):
                engines.add_column(col, no_wrap=True, min_width=4 if col == "cc" else len(col),   # "12.0"
                                   justify="left" if col in ("graph", "precision") else "right")
            for e in info["engines"]:
                engines.add_row(e["graph"], str(e["precision"]), str(e["compute_capability"]),
                                "-" if e["bytes"] is None else _human_bytes(e["bytes"]), _num(e["build_s"], ".1f"),
                                "-" if e["fp32_layer_share"] is None else f"{100 * e['fp32_layer_share']:.0f}%",
                                "yes" if e["verified"] else "no")
            console.print(engines)
            built_for: dict[str, int] = {}
            for e in info["engines"]:
                where = e["platform"]["describe"] + (f" (built on {e['platform']['built_on']})"
                                                     if e["platform"].get("built_on") else "")
                built_for[where] = built_for.get(where, 0) + 1
            for where, count in built_for.items():
                console.print(f"engines built for {where}: {count}")
        console.print(f"experts {', '.join(info['experts'])}; text length buckets {info['text_buckets']}")
        console.print(_signature_line(info.get("signature")), markup=False)
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

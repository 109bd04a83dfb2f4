"""The deployable bundle: static ONNX graphs per component, tokenizers, calibration inputs and manifest.json.

    bundle/
      manifest.json              format version, components, graph files per precision, input/output specs,
                                 parity figures, sha256 + size of every file, source checkpoint fingerprint, tools
      graphs/<component>.<precision>.onnx   (+ .onnx.data when the graph passes 2 GB)
      calibration/<component>.npz           the real-image feeds the parity check used (calibration-ready)
      tokenizer/llm/...  tokenizer/text/... the Llama-3 tokenizer files and the BERT vocab

`export_bundle` writes everything into a temp dir next to the target and renames it at the end: a failed export
(parity over threshold included) leaves no bundle. `load_bundle` verifies every file's sha256 before use.
"""
from __future__ import annotations

import gc
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from .errors import BundleError, CheckpointError, ComponentError, ExportError, MoVAExportError

if TYPE_CHECKING:  # pragma: no cover
    from .config import MoVAConfig

FORMAT = "mova-export-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ARTIFACT_DIRS = ("graphs", "llm", "engines")  # every file under these must be in the manifest's file table
SAMPLE_IMAGES = ("astronaut", "coffee", "chelsea")
NOT_ONNX = {"llm": "the LLM goes to GGUF (its own stage), not to ONNX"}
LLM_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                       "chat_template.jinja", "generation_config.json")
_WEIGHT_SUFFIXES = (".bin", ".safetensors", ".pt", ".pth", ".ckpt", ".onnx", ".gguf", ".h5", ".msgpack")


def graph_components() -> list[str]:
    """Every registered component that becomes an ONNX graph, in pipeline order."""
    from .components import component_names

    return [n for n in component_names() if n not in NOT_ONNX]


def _console_log(enabled: bool) -> Callable[[str], None]:
    if not enabled:
        return lambda _: None
    from rich.console import Console

    console = Console(stderr=True, highlight=False, soft_wrap=True)
    start = time.perf_counter()
    from rich.markup import escape

    return lambda msg: console.print(f"[dim]{time.perf_counter() - start:7.1f}s[/dim] {escape(msg)}")


# ---------------------------------------------------------------------------------------------------------------
# hashing and fingerprints

def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def checkpoint_fingerprint(checkpoint_dir: Path) -> dict[str, Any]:
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
    from . import __version__

    out = {"python": platform.python_version(), "mova_export": __version__}
    for dist in ("torch", "onnx", "onnxruntime", "onnxscript", "onnx-ir", "onnxslim", "transformers", "numpy", "gguf",
                 "llama-cpp-python"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


# ---------------------------------------------------------------------------------------------------------------
# argument checks (before any slow work)

def _check_components(components: Iterable[str] | None) -> list[str]:
    from .components import component_names, get_spec

    if components is None:
        return graph_components()
    names = list(dict.fromkeys(components))
    if not names:
        raise ComponentError(f"no component selected; choose from {', '.join(graph_components())}")
    for name in names:
        if name in NOT_ONNX:
            raise ComponentError(f"component {name!r} is not exported to ONNX: {NOT_ONNX[name]}; choose from "
                                 f"{', '.join(graph_components())}")
        get_spec(name)  # raises ComponentError naming the unknown component
    order = component_names()
    return sorted(names, key=order.index)


def _check_precisions(precisions: Iterable[str]) -> list[str]:
    from .export import PRECISIONS

    chosen = list(dict.fromkeys(precisions))
    bad = [p for p in chosen if p not in PRECISIONS]
    if bad or not chosen:
        raise ExportError(f"unknown precision(s) {bad or chosen}; choose from {', '.join(PRECISIONS)}")
    if "fp32" not in chosen:  # the fp16 graph is converted from the checked fp32 one
        chosen.insert(0, "fp32")
    return chosen


def _prepare_target(out_dir: Path, overwrite: bool) -> Path:
    """Refuse an existing non-empty target (unless overwrite) and create the temp dir beside it."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise BundleError(f"output path {out_dir} is a file; pass a folder for the bundle")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise BundleError(f"output folder {out_dir} exists and is not empty; pass --overwrite or choose another")
    parent = out_dir.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=parent))
    except OSError as exc:
        raise BundleError(f"output folder {parent} is not writable ({exc.strerror or exc}); "
                          "choose a folder you can write to") from None


def _finish(tmp: Path, out_dir: Path) -> None:
    """Move the finished temp dir into place; an old bundle is swapped out first and removed afterwards."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_bundle(out_dir: Path, overwrite: bool) -> Iterator[Path]:
    """A temp folder beside out_dir to write a bundle into: renamed to out_dir when the block ends, removed when it
    raises (so a failed export or build leaves no bundle, and the previous one untouched)."""
    tmp = _prepare_target(out_dir, overwrite)
    try:
        yield tmp
        _finish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------------------------------
# export

def export_bundle(checkpoint_dir: str | Path, out_dir: str | Path, components: Sequence[str] | None = None,
                  precisions: Sequence[str] = ("fp32",), samples: Sequence[Any] = SAMPLE_IMAGES,
                  progress: bool = True, overwrite: bool = False, *, random_samples: int = 1,
                  mask_sweep: bool = True, simplify: bool = True, calibration: bool = True,
                  questions: Sequence[str] | None = None) -> Path:
    """Export the chosen components of a checkpoint to a validated bundle at `out_dir`; returns its path.

    components: names from the registry (default: every ONNX component; `llm` goes to GGUF instead).
    precisions: "fp32" (always built: the others derive from it) and/or "fp16".
    samples: parity images: scikit-image sample names (reference.SAMPLE_QUESTIONS), image paths or HxWx3 arrays;
             each graph is also checked on `random_samples` seeded random feeds from its spec.
    mask_sweep: check the adapter graph against the skipping reference for every mask with K <= topk_experts.
    questions: one question per sample image for the text encoder's feeds (default: the samples' own questions).
    Raises CheckpointError / ConfigError (bad checkpoint), ComponentError (unknown component), BundleError
    (target exists or is not writable) or ExportError (export or parity failure); nothing is left behind then.
    """
    from .checkpoint import Checkpoint
    from .export import FeedBuilder, _role
    from .components import get_spec

    log = _console_log(progress)
    names = _check_components(components)
    chosen = _check_precisions(precisions)
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint = Checkpoint.open(checkpoint_dir)  # CheckpointError / ConfigError name what is missing
    cfg = checkpoint.config
    out_dir = Path(out_dir)
    with staged_bundle(out_dir, overwrite) as tmp:
        log(f"exporting {', '.join(names)} ({'/'.join(chosen)}) from {checkpoint_dir} ({cfg.scale} scale)")
        adapters = [n for n in names if _role(get_spec(n), cfg) == "adapter"]
        feeds = FeedBuilder(checkpoint, samples=samples, random_samples=random_samples, log=log,
                            needs_features=bool(adapters), questions=questions)
        graphs: dict[str, Any] = {}
        calib: dict[str, Any] = {}
        for name in names:
            graphs[name] = _export_one(name, cfg, feeds, tmp, chosen, mask_sweep, simplify, log)
            if calibration:
                calib[name] = _write_calibration(tmp, name, feeds.calibration_feeds(name))
            feeds.needs_features = any(a not in graphs for a in adapters)
            feeds.release(name)
            gc.collect()
        tokenizers = _copy_tokenizers(checkpoint, checkpoint_dir, tmp)
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "components": names, "precisions": chosen, "graphs": graphs, "calibration": calib,
            "tokenizers": tokenizers, "config": cfg.to_dict(),
            "source_checkpoint": checkpoint_fingerprint(checkpoint_dir),
            "export": _export_settings(simplify, feeds), "tools": tool_versions(),
        }
        write_manifest(tmp, manifest)
    log(f"bundle written to {out_dir}")
    return out_dir


def _export_one(name: str, cfg: "MoVAConfig", feeds: Any, root: Path, precisions: list[str],
                mask_sweep: bool, simplify: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """Export one component (fp32, then the other precisions from it) and validate every variant in ORT."""
    from .components import get_spec
    from .export import _role, fp16_from_onnx, onnx_from_component, validate_graph
    from .runners import OrtRunner

    spec = get_spec(name)
    inputs, outputs = spec.inputs(cfg), spec.outputs(cfg)
    role = _role(spec, cfg)
    entry: dict[str, Any] = {"role": role, "inputs": [_tensor_json(t) for t in inputs],
                             "outputs": [_tensor_json(t) for t in outputs], "variants": {}}
    if role == "tower":
        entry["input_kind"] = spec.expert.input_kind if spec.expert is not None else "clip672"
        entry["expert"] = ({"letter": spec.expert.letter, "index": spec.expert.index, "name": spec.expert.name}
                           if spec.expert is not None else None)
    samples = feeds.samples(name, mask_sweep=mask_sweep)  # references from the torch module
    paths = {"fp32": root / "graphs" / f"{name}.fp32.onnx"}
    start = time.perf_counter()
    onnx_from_component(spec, feeds.module(name), cfg, paths["fp32"], feed=samples[0].feed, simplify=simplify,
                        log=log)
    build_s = {"fp32": time.perf_counter() - start}
    feeds.drop_module(name)  # from here on only ONNX Runtime runs: free the torch weights first
    gc.collect()
    for precision in precisions:
        if precision != "fp32":
            start = time.perf_counter()
            paths[precision] = root / "graphs" / f"{name}.{precision}.onnx"
            fp16_from_onnx(paths["fp32"], paths[precision], inputs, outputs, name, log=log)
            build_s[precision] = time.perf_counter() - start
        path = paths[precision]
        start = time.perf_counter()
        checked = samples if precision == "fp32" else _spot_check(samples)
        report = validate_graph(OrtRunner(path, name=f"{name}.{precision}"), checked, name, precision)
        validate_s = time.perf_counter() - start
        gc.collect()
        log(f"{name} [{precision}] {len(samples)} samples in {validate_s:.1f} s: " +
            "; ".join(f"{out}: {fig.describe()}" for out, fig in report.per_output().items()))
        files = graph_files(path)
        entry["variants"][precision] = {
            "graph": _rel(path, root), "files": [_rel(f, root) for f in files],
            "bytes": sum(f.stat().st_size for f in files), "nodes": _node_count(path),
            "build_s": round(build_s[precision], 2), "validate_s": round(validate_s, 2), "parity": report.to_json(),
        }
    return entry


def _spot_check(samples: Sequence[Any], every: int = 8) -> list[Any]:
    """The fp16 graphs' samples: every non-sweep sample and every 8th mask of the adapter's 64-mask sweep (the
    fp32 graph carries the full sweep; fp16 only changes arithmetic precision, not which branches run)."""
    sweep = [s for s in samples if "/" in s.label and not s.label.endswith("+unrouted")]
    drop = {id(s) for s in sweep} - {id(s) for s in sweep[::every]}
    return [s for s in samples if id(s) not in drop]


def graph_files(path: Path) -> list[Path]:
    from .export import graph_files as files_of

    return files_of(path)


def _node_count(path: Path) -> int:
    import onnx

    return len(onnx.load(str(path), load_external_data=False).graph.node)


def _tensor_json(t: Any) -> dict[str, Any]:
    return {"name": t.name, "shape": list(t.shape), "dtype": t.dtype}


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _write_calibration(root: Path, name: str, feeds: Sequence[Any]) -> dict[str, Any]:
    """The real-image feeds (input name -> stacked [N, ...] arrays) a quantizer can calibrate with."""
    path = root / "calibration" / f"{name}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(feeds[0].feed)
    np.savez(path, **{k: np.stack([f.feed[k] for f in feeds]) for k in keys})
    return {"file": _rel(path, root), "samples": [f.label for f in feeds], "stacked_on_axis": 0}


def _copy_tokenizers(checkpoint: Any, checkpoint_dir: Path, root: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    llm_dir = root / "tokenizer" / "llm"
    llm_files = [checkpoint_dir / n for n in LLM_TOKENIZER_FILES if (checkpoint_dir / n).is_file()]
    if not llm_files:
        raise CheckpointError(f"{checkpoint_dir} has no LLM tokenizer files ({', '.join(LLM_TOKENIZER_FILES[:2])})")
    llm_dir.mkdir(parents=True)
    for f in llm_files:
        shutil.copy2(f, llm_dir / f.name)
    out["llm"] = {"dir": _rel(llm_dir, root), "files": sorted(f.name for f in llm_files)}
    text_src = Path(checkpoint.text_tokenizer_dir)
    text_files = [f for f in sorted(text_src.iterdir()) if f.is_file() and f.suffix not in _WEIGHT_SUFFIXES
                  and not f.name.endswith(".index.json") and f.name != "config.json"] if text_src.is_dir() else []
    if not any(f.name == "vocab.txt" or f.name == "tokenizer.json" for f in text_files):
        raise CheckpointError(f"{text_src} has no BERT vocab (vocab.txt or tokenizer.json); the text encoder "
                              "cannot tokenize questions without it")
    text_dir = root / "tokenizer" / "text"
    text_dir.mkdir(parents=True)
    for f in text_files:
        shutil.copy2(f, text_dir / f.name)
    out["text"] = {"dir": _rel(text_dir, root), "files": [f.name for f in text_files]}
    return out


def _export_settings(simplify: bool, feeds: Any) -> dict[str, Any]:
    from .export import DYNAMIC_OPS, EXPORTER, FP32_OPS, OPSET

    return {"exporter": f"torch.onnx.export {EXPORTER} (dynamo=False)", "opset": OPSET, "static_shapes": True,
            "simplifier": "onnxslim" if simplify else None, "external_data_over_bytes": 2**31 - 1,
            "fp16": {"converter": "onnxruntime.transformers.float16", "keep_io_types": True,
                     "fp32_ops": list(FP32_OPS), "fp32_nodes": "elementwise ops under a '*norm*' module scope"},
            "forbidden_ops": sorted(DYNAMIC_OPS), "parity_samples": feeds.describe()}


def _file_table(root: Path) -> dict[str, dict[str, Any]]:
    return {_rel(p, root): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST}


# ---------------------------------------------------------------------------------------------------------------
# the LLM as GGUF

def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    """Recompute the file table and write manifest.json through a temp file (a reader never sees half of it)."""
    manifest["files"] = _file_table(root)
    tmp = root / f".{MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, root / MANIFEST)


def attach_llm(root: str | Path, checkpoint_dir: str | Path, qtype: str = "q8_0", *, n_ctx: int = 4096,
               n_gpu_layers: int = 0, n_threads: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Convert the checkpoint's LLM to `llm/model.<qtype>.gguf` inside the bundle folder `root` and record it in the
    manifest (`llm`: file, qtype, widths, runner settings). The GGUF is written to a temp file and renamed, then the
    manifest is rewritten atomically; a failure leaves the bundle as it was."""
    from .gguf_convert import QTYPES, convert_checkpoint_to_gguf

    root = Path(root)
    manifest = json.loads((root / MANIFEST).read_text())
    if qtype not in QTYPES:
        raise BundleError(f"unknown LLM quant type {qtype!r}; use one of {', '.join(QTYPES)}")
    llm_dir = root / "llm"
    llm_dir.mkdir(exist_ok=True)
    for old in llm_dir.glob("model.*.gguf"):
        old.unlink()
    path = llm_dir / f"model.{qtype}.gguf"
    log = _console_log(progress)
    start = time.perf_counter()
    convert_checkpoint_to_gguf(checkpoint_dir, path, qtype)
    cfg = manifest["config"]
    manifest["llm"] = {"gguf": _rel(path, root), "qtype": qtype, "n_embd": int(cfg["hidden_size"]),
                       "n_vocab": int(cfg["vocab_size"]), "n_ctx": int(n_ctx), "n_gpu_layers": int(n_gpu_layers),
                       "n_threads": n_threads, "convert_s": round(time.perf_counter() - start, 2)}
    log(f"llm: {path.name} ({path.stat().st_size / 2**20:.1f} MiB) in {manifest['llm']['convert_s']} s")
    manifest.setdefault("tools", {}).update(tool_versions())
    write_manifest(root, manifest)
    return manifest["llm"]


# ---------------------------------------------------------------------------------------------------------------
# loading

@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict[str, Any]

    @property
    def components(self) -> list[str]:
        return list(self.manifest["components"])

    @property
    def config(self) -> "MoVAConfig":
        from .config import MoVAConfig

        return MoVAConfig.from_dict(self.manifest["config"], source=f"{self.path / MANIFEST} (config)")

    def graph(self, component: str, precision: str = "fp32") -> Path:
        graphs = self.manifest["graphs"]
        if component not in graphs:
            raise BundleError(f"bundle {self.path} has no {component!r} graph; it holds {', '.join(graphs)}")
        variants = graphs[component]["variants"]
        if precision not in variants:
            raise BundleError(f"bundle {self.path} has no {precision} variant of {component!r}; it has "
                              f"{', '.join(variants)}")
        return self.path / variants[precision]["graph"]

    def tokenizer_dir(self, which: str) -> Path:
        return self.path / self.manifest["tokenizers"][which]["dir"]

    @property
    def llm(self) -> dict[str, Any]:
        """The manifest's `llm` entry with `path` resolved; BundleError when the bundle carries no GGUF."""
        entry = self.manifest.get("llm")
        if not entry:
            raise BundleError(f"bundle {self.path} has no LLM (GGUF); build it with `mova-export build` or add one "
                              "with `mova-export gguf CHECKPOINT --bundle BUNDLE`")
        return {**entry, "path": self.path / entry["gguf"]}


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Read manifest.json and (by default) check every listed file's size and sha256; refuse any mismatch,
    missing file or unlisted graph file, naming the file."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise BundleError(f"bundle folder {path} does not exist; create one with `mova-export export`")
    if not manifest_path.is_file():
        raise BundleError(f"{path} has no {MANIFEST}; it is not a mova-export bundle (or the export was interrupted)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{manifest_path} is not valid JSON ({exc}); re-export the bundle") from None
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{manifest_path} is not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{manifest_path} has format version {manifest.get('format_version')}; this mova-export "
                          f"reads version {FORMAT_VERSION}: re-export the bundle")
    if verify:
        verify_files(path, manifest)
    return Bundle(path, manifest)


def verify_files(path: Path, manifest: Mapping[str, Any]) -> None:
    files = manifest.get("files", {})
    for rel, meta in files.items():
        f = path / rel
        if not f.is_file():
            raise BundleError(f"bundle {path}: file {rel} listed in the manifest is missing")
        if f.stat().st_size != meta["bytes"]:
            raise BundleError(f"bundle {path}: file {rel} has {f.stat().st_size} bytes, the manifest says "
                              f"{meta['bytes']}; it is truncated or modified: re-export the bundle")
        if sha256_file(f) != meta["sha256"]:
            raise BundleError(f"bundle {path}: file {rel} does not match its sha256 in the manifest; it was "
                              "modified or corrupted: re-export the bundle")
    for variant_files in (v["files"] for g in manifest.get("graphs", {}).values() for v in g["variants"].values()):
        for rel in variant_files:
            if rel not in files:
                raise BundleError(f"bundle {path}: graph file {rel} is not covered by the manifest's file table")
    unlisted = [p.relative_to(path).as_posix() for folder in ARTIFACT_DIRS for p in (path / folder).rglob("*")
                if p.is_file() and p.relative_to(path).as_posix() not in files]
    if unlisted:
        raise BundleError(f"bundle {path}: file(s) {', '.join(sorted(unlisted))} are not in the manifest")


def describe_bundle(path: str | Path, verify: bool = True) -> dict[str, Any]:
    """What `mova-export inspect BUNDLE` shows: a JSON-friendly summary (files verified unless verify=False)."""
    bundle = load_bundle(path, verify=verify)
    m = bundle.manifest
    graphs = []
    for name in m["components"]:
        g = m["graphs"][name]
        for precision, v in g["variants"].items():
            worst = v["parity"]["worst"]
            graphs.append({
                "component": name, "precision": precision, "graph": v["graph"], "files": len(v["files"]),
                "bytes": v["bytes"], "nodes": v["nodes"],
                "inputs": [f"{t['name']}{t['shape']}:{t['dtype']}" for t in g["inputs"]],
                "outputs": [f"{t['name']}{t['shape']}:{t['dtype']}" for t in g["outputs"]],
                "parity_samples": v["parity"]["num_samples"],
                "min_cosine": min(f["cosine"] for f in worst.values()),
                "max_rel_l2": max(f["rel_l2"] for f in worst.values()),
                "max_abs": max(f["max_abs"] for f in worst.values()),
            })
    return {"kind": "bundle", "path": str(bundle.path), "format_version": m["format_version"],
            "created_utc": m["created_utc"], "verified": verify, "scale": m["config"].get("mova_export", {}).get(
                "scale"), "components": m["components"], "precisions": m["precisions"], "graphs": graphs,
            "tokenizers": m["tokenizers"], "source_checkpoint": m["source_checkpoint"], "tools": m["tools"],
            "export": m["export"], "total_bytes": sum(f["bytes"] for f in m["files"].values()),
            "num_files": len(m["files"])}


__all__ = ["Bundle", "BundleError", "MoVAExportError", "checkpoint_fingerprint", "describe_bundle", "export_bundle",
           "graph_components", "load_bundle", "sha256_file", "verify_files"]

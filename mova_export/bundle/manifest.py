"""The bundle manifest as a typed object: read once, verified once, carried in memory, written once atomically.

    bundle/
      manifest.json              this object: format version, the model facts, graphs per precision with their
                                 I/O specs and parity figures, tokenizers, LLM, engines, target, runtime defaults,
                                 build stages, memory plan, sha256 + size of every file, source checkpoint, tools
      graphs/<graph>.<precision>.onnx   (+ .onnx.data when the graph passes 2 GB)
      checks/<graph>.npz         one held-out real-image feed per graph (fp16-stored), for engine parity on the device
      llm/model.<quant>.gguf     the LLM with its Llama-3 tokenizer, for llama.cpp
      tokenizer/llm, tokenizer/text   the Llama-3 tokenizer files, the BERT vocab
      engines/                   TensorRT engines + metadata
      report.md, report.json, build.log

Pure Python (json + dataclasses): the device runtime loads bundles with it.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from ..core.errors import BundleError
from ..core.facts import ModelFacts
from ..core.spec import (
    PRECISIONS,  # noqa: F401  (re-exported by bundle)
    TensorSpec,
)
from .files import FileTable, sha256_file
from .paths import check_contained, inside

FORMAT = "mova-export-bundle"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
BUILD_LOG = "build.log"     # appended to until the build ends, so not hashed
SIGNATURE = "bundle.sig"    # the bundle's signature (bundle/signing.py): it covers every other file, manifest included
# every file under these must be in the file table (the runtime reads from them)
ARTIFACT_DIRS = ("graphs", "llm", "engines", "checks", "tokenizer")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _from(cls: type, raw: Mapping[str, Any]) -> Any:
    """A flat dataclass from JSON, ignoring keys it does not know (newer writers may add some)."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in raw.items() if k in names})


@dataclass
class Variant:
    """One precision of one graph."""
    graph: str                                   # bundle-relative path of the .onnx file
    files: list[str]                             # the graph and its external data
    bytes: int
    nodes: int | None = None
    parity: dict[str, Any] | None = None         # validate.ParityReport.to_json(): vs PyTorch (fp32/fp16) or fp32
    decision: dict[str, Any] | None = None       # quantization decision (int8 / fp8 variants)
    build_s: float | None = None
    validate_s: float | None = None

    def min_cosine(self) -> float | None:
        worst = (self.parity or {}).get("worst") or {}
        return min((f["cosine"] for f in worst.values()), default=None)

    def max_rel_l2(self) -> float | None:
        worst = (self.parity or {}).get("worst") or {}
        return max((f["rel_l2"] for f in worst.values()), default=None)


@dataclass
class GraphEntry:
    """One exported graph: the component it comes from, its role in the two passes, its declared I/O and the
    precisions it is shipped in. axes: a symbolic dimension and the static sizes it takes (text_length buckets)."""
    name: str
    component: str
    role: str                                    # tower | text | adapter_routing | adapter_answer
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    variants: dict[str, Variant] = field(default_factory=dict)
    axes: dict[str, list[int]] = field(default_factory=dict)
    form: str | None = None                      # adapter_answer: "dense" (7 branches) or "slots" (top-K slots)
    proven: dict[str, float] = field(default_factory=dict)   # min cosine vs PyTorch of every exported variant
    missing: dict[str, str] = field(default_factory=dict)    # an exported precision not shipped, and why

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "component": self.component, "role": self.role,
                "inputs": [t.to_json() for t in self.inputs], "outputs": [t.to_json() for t in self.outputs],
                "variants": {p: asdict(v) for p, v in self.variants.items()}, "axes": self.axes, "form": self.form,
                "proven": self.proven, "missing": self.missing}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> "GraphEntry":
        return cls(str(raw["name"]), str(raw["component"]), str(raw["role"]),
                   [TensorSpec.from_json(t) for t in raw["inputs"]], [TensorSpec.from_json(t) for t in raw["outputs"]],
                   {p: _from(Variant, v) for p, v in raw.get("variants", {}).items()},
                   {k: [int(s) for s in v] for k, v in raw.get("axes", {}).items()}, raw.get("form"),
                   {k: float(v) for k, v in raw.get("proven", {}).items()}, dict(raw.get("missing") or {}))

    def variant(self, precision: str, bundle: Path | str = "bundle") -> Variant:
        if precision not in self.variants:
            raise BundleError(f"bundle {bundle} has no {precision} variant of {self.name}; it has "
                              f"{', '.join(self.variants) or 'none'} (pick one of those, or rebuild with "
                              f"`--also-precision {precision}`)")
        return self.variants[precision]


@dataclass(frozen=True)
class LLMSettings:
    """How llama.cpp runs the LLM: the recipe's llm section, the one place these defaults live."""
    n_ctx: int = 4096
    n_gpu_layers: int = 0                        # -1: every layer on the GPU
    n_threads: int | None = None                 # None: llama.cpp's default (capped at the host's cores)
    flash_attn: bool = False
    f32_kv: bool = False                         # an F32 KV cache: exact parity with an f32 GGUF

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LLMEntry:
    gguf: str                                    # bundle-relative path
    qtype: str
    n_embd: int
    n_vocab: int
    settings: LLMSettings = field(default_factory=LLMSettings)
    convert_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "settings": self.settings.to_json()}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> "LLMEntry":
        entry = _from(cls, {k: v for k, v in raw.items() if k != "settings"})
        entry.settings = _from(LLMSettings, raw.get("settings") or {})
        return entry


@dataclass
class RuntimeDefaults:
    """What the runtime does unless told otherwise: the precision per graph, the expert policy, the backend."""
    precision: dict[str, str] = field(default_factory=dict)   # graph name -> shipped precision
    expert_policy: str = "resident"
    max_loaded_experts: int | None = None
    vision_backend: str = "onnxruntime"


@dataclass
class Manifest:
    model: ModelFacts
    config: dict[str, Any]                       # config.json of the source checkpoint (MoVAConfig.to_dict)
    graphs: dict[str, GraphEntry]
    tokenizers: dict[str, dict[str, Any]]        # "llm" / "text" -> {"dir", "files"}
    source_checkpoint: dict[str, Any]
    tools: dict[str, str]
    created_utc: str
    export: dict[str, Any] = field(default_factory=dict)
    llm: LLMEntry | None = None                  # the GGUF the runtime loads by default
    llms: dict[str, LLMEntry] = field(default_factory=dict)    # every shipped GGUF by quant type (llm among them)
    engines: dict[str, dict[str, Any]] = field(default_factory=dict)
    checks: dict[str, str] = field(default_factory=dict)       # graph -> bundle-relative held-out feed file
    target: dict[str, Any] | None = None
    recipe: dict[str, Any] | None = None
    runtime: RuntimeDefaults = field(default_factory=RuntimeDefaults)
    quantize: dict[str, dict[str, Any]] = field(default_factory=dict)
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    memory_plan: dict[str, Any] | None = None
    report: dict[str, str] | None = None
    files: dict[str, dict[str, Any]] = field(default_factory=dict)

    # ---- queries ---------------------------------------------------------------------------------------------------
    @property
    def scale(self) -> str | None:
        return (self.config.get("mova_export") or {}).get("scale")

    def graph(self, name: str) -> GraphEntry:
        if name not in self.graphs:
            raise BundleError(f"bundle has no {name!r} graph; it holds {', '.join(self.graphs)}")
        return self.graphs[name]

    def graph_of_role(self, role: str) -> GraphEntry | None:
        return next((g for g in self.graphs.values() if g.role == role), None)

    def graph_of_component(self, component: str) -> GraphEntry | None:
        return next((g for g in self.graphs.values() if g.component == component), None)

    # ---- (de)serialisation -----------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "created_utc": self.created_utc,
                "model": self.model.to_json(), "config": self.config,
                "graphs": {n: g.to_json() for n, g in self.graphs.items()}, "tokenizers": self.tokenizers,
                "source_checkpoint": self.source_checkpoint, "tools": self.tools, "export": self.export,
                "llm": None if self.llm is None else self.llm.to_json(),
                "llms": {q: e.to_json() for q, e in self.llms.items()}, "engines": self.engines,
                "checks": self.checks, "target": self.target, "recipe": self.recipe,
                "runtime": asdict(self.runtime), "quantize": self.quantize, "stages": self.stages,
                "memory_plan": self.memory_plan, "report": self.report, "files": self.files}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any], source: str = MANIFEST) -> "Manifest":
        if not isinstance(raw, Mapping):
            raise BundleError(f"{source} holds a JSON {type(raw).__name__}, not an object; it is not a {FORMAT} "
                              "manifest: rebuild the bundle")
        if raw.get("format") != FORMAT:
            raise BundleError(f"{source} is not a {FORMAT} manifest")
        if raw.get("format_version") != FORMAT_VERSION:
            raise BundleError(f"{source} has format version {raw.get('format_version')}; this mova-export reads "
                              f"version {FORMAT_VERSION}: rebuild the bundle with `mova-export build`")
        try:
            manifest = cls(
                model=ModelFacts.from_json(raw["model"]), config=dict(raw["config"]),
                graphs={n: GraphEntry.from_json(g) for n, g in raw["graphs"].items()},
                tokenizers=dict(raw["tokenizers"]), source_checkpoint=dict(raw.get("source_checkpoint") or {}),
                tools=dict(raw.get("tools") or {}), created_utc=str(raw.get("created_utc", "")),
                export=dict(raw.get("export") or {}),
                llm=None if not raw.get("llm") else LLMEntry.from_json(raw["llm"]),
                llms={q: LLMEntry.from_json(e) for q, e in (raw.get("llms") or {}).items()},
                engines=dict(raw.get("engines") or {}), checks=dict(raw.get("checks") or {}),
                target=raw.get("target"), recipe=raw.get("recipe"),
                runtime=_from(RuntimeDefaults, raw.get("runtime") or {}), quantize=dict(raw.get("quantize") or {}),
                stages=dict(raw.get("stages") or {}), memory_plan=raw.get("memory_plan"), report=raw.get("report"),
                files=dict(raw.get("files") or {}))
        except (KeyError, TypeError, ValueError, AttributeError, ArithmeticError) as exc:
            detail = str(exc).splitlines()[0][:200] if str(exc) else ""
            raise BundleError(f"{source} is malformed ({type(exc).__name__}: {detail}); rebuild the bundle") from None
        _check_file_table(manifest.files, source)
        _check_path_fields(manifest, source)
        return manifest

    def write(self, root: Path, files: "FileTable | None" = None) -> None:
        """Write manifest.json through a temp file (atomic). The file table is `files` with every file under root it
        lacks added (files it holds are not hashed again), or, without one, a fresh scan of root."""
        table = files if files is not None else FileTable(root)
        self.files = table.scan(skip=(MANIFEST, BUILD_LOG, SIGNATURE)).entries
        tmp = root / f".{MANIFEST}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        os.replace(tmp, root / MANIFEST)


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: Manifest

    def graph_path(self, name: str, precision: str) -> Path:
        return self.path / self.manifest.graph(name).variant(precision, self.path).graph

    def tokenizer_dir(self, which: str) -> Path:
        return self.path / self.manifest.tokenizers[which]["dir"]

    def llm_entry(self, qtype: str | None = None) -> LLMEntry:
        """The default GGUF, or the one of `qtype` (BundleError naming the ones the bundle ships)."""
        m = self.manifest
        if m.llm is None:
            raise BundleError(f"bundle {self.path} has no LLM (GGUF); build it with `mova-export build` or add one "
                              "with `mova-export gguf CHECKPOINT --bundle BUNDLE`")
        if qtype is None or qtype == m.llm.qtype:
            return m.llm
        if qtype not in m.llms:
            raise BundleError(f"bundle {self.path} has no {qtype} GGUF; it ships {', '.join(m.llms) or m.llm.qtype} "
                              f"(build with --also-llm {qtype})")
        return m.llms[qtype]


def _check_file_table(files: Mapping[str, Any], source: str) -> None:
    """Every entry of the file table is {"sha256": 64 hex digits, "bytes": a size}."""
    for rel, meta in files.items():
        ok = (isinstance(meta, Mapping) and isinstance(meta.get("sha256"), str) and _SHA256.fullmatch(meta["sha256"])
              and isinstance(meta.get("bytes"), int) and not isinstance(meta["bytes"], bool) and meta["bytes"] >= 0)
        if not ok:
            raise BundleError(f"{source}: file table entry {str(rel)[:200]!r} is {repr(meta)[:80]}, not "
                              '{"sha256": ..., "bytes": ...}; the manifest was edited or damaged: rebuild the bundle')


def _check_path_fields(m: Manifest, source: str) -> None:
    """The fields that name files have the shapes the loader walks (the JSON could hold anything there)."""
    def bad(field: str, value: Any, want: str) -> None:
        raise BundleError(f"{source}: {repr(field)[1:-1][:120]} is {repr(value)[:60]}, not {want}; the manifest was "
                          "edited or damaged: rebuild the bundle")

    for name, graph in m.graphs.items():
        for precision, variant in graph.variants.items():
            if not isinstance(variant.files, list):
                bad(f"graphs.{name}.variants.{precision}.files", variant.files, "a list of paths")
    for which, entry in m.tokenizers.items():
        if not isinstance(entry, Mapping) or not isinstance(entry.get("files", []), list):
            bad(f"tokenizers.{which}", entry, '{"dir": ..., "files": [...]}')
    for name, entry in m.engines.items():
        if not isinstance(entry, Mapping):
            bad(f"engines.{name}", entry, '{"engine": ..., "metadata": ...}')
    if m.report is not None and not isinstance(m.report, Mapping):
        bad("report", m.report, '{"json": ..., "markdown": ...}')


def load_bundle(path: str | Path, verify: bool = True, hashed: Mapping[str, str] | None = None) -> Bundle:
    """Read manifest.json, refuse any path it names that leaves the bundle (always), and (by default) check every
    listed file's size and sha256; refuse any mismatch, missing file or unlisted artifact, naming the file.

    hashed: {bundle-relative path: sha256} already computed from the files (a verified signature's digests): a file
    whose manifest sha256 equals it is not hashed again."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise BundleError(f"bundle folder {path} does not exist; create one with `mova-export build`")
    if not manifest_path.is_file():
        raise BundleError(f"{path} has no {MANIFEST}; it is not a mova-export bundle (or the build was interrupted)")
    inside(path, MANIFEST, "manifest")        # manifest.json itself may not be a symlink out of the bundle
    try:
        raw = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise BundleError(f"{manifest_path} is not valid JSON ({detail}); rebuild the bundle") from None
    except OSError as exc:
        raise BundleError(f"{manifest_path} cannot be read ({exc.strerror or exc}); check the bundle's "
                          "permissions") from None
    manifest = Manifest.from_json(raw, source=str(manifest_path))
    if verify:
        verify_files(path, manifest, hashed)
    else:
        check_contained(path, manifest)
    return Bundle(path, manifest)


def verify_files(path: Path, manifest: Manifest, hashed: Mapping[str, str] | None = None) -> None:
    """Containment first (nothing outside the bundle is read), then every listed file's size and sha256 (`hashed`:
    see load_bundle), then no artifact the table does not list."""
    files = manifest.files
    check_contained(path, manifest)
    for rel, meta in files.items():
        f = path / rel
        if not f.is_file():
            raise BundleError(f"bundle {path}: file {rel} listed in the manifest is missing; copy the whole "
                              "bundle again (or rebuild it)")
        if f.stat().st_size != meta["bytes"]:
            raise BundleError(f"bundle {path}: file {rel} has {f.stat().st_size} bytes, the manifest says "
                              f"{meta['bytes']}; it is truncated or modified: rebuild the bundle")
        if (hashed or {}).get(rel) != meta["sha256"] and sha256_file(f) != meta["sha256"]:
            raise BundleError(f"bundle {path}: file {rel} does not match its sha256 in the manifest; it was "
                              "modified or corrupted: rebuild the bundle")
    for graph in manifest.graphs.values():
        for variant in graph.variants.values():
            missing = [rel for rel in variant.files if rel not in files]
            if missing:
                raise BundleError(f"bundle {path}: graph file {missing[0]} is not covered by the manifest's file table")
    unlisted = [p.relative_to(path).as_posix() for folder in ARTIFACT_DIRS for p in (path / folder).rglob("*")
                if p.is_file() and p.relative_to(path).as_posix() not in files]
    if unlisted:
        raise BundleError(f"bundle {path}: file(s) {', '.join(sorted(unlisted))} are not in the manifest")

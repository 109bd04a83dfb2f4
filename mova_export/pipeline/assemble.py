"""The bundle's files and its manifest: the shipped variant of every graph (hard links into the work folder's
units), tokenizers, GGUFs, the engines' check feeds; one FileTable hashes each file once."""
from __future__ import annotations

import shutil
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..bundle import GraphEntry, LLMEntry, LLMSettings, Manifest, RuntimeDefaults, Variant, link_or_copy, tool_versions
from ..core.errors import CheckpointError
from ..export import graph_files, read_feeds
from .stages import Exported, gguf, quantize
from .unit import BuildContext

if TYPE_CHECKING:  # pragma: no cover
    from ..recipe import Recipe
    from ..source.checkpoint import Checkpoint

LLM_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                       "chat_template.jinja", "generation_config.json")
_WEIGHT_SUFFIXES = (".bin", ".safetensors", ".pt", ".pth", ".ckpt", ".onnx", ".gguf", ".h5", ".msgpack")


def copy_tokenizers(ckpt: "Checkpoint", root: Path) -> dict[str, Any]:
    """The Llama-3 tokenizer files and the BERT vocab into tokenizer/llm and tokenizer/text."""
    out: dict[str, Any] = {}
    llm_files = [ckpt.path / n for n in LLM_TOKENIZER_FILES if (ckpt.path / n).is_file()]
    if not llm_files:
        raise CheckpointError(f"{ckpt.path} has no LLM tokenizer files ({', '.join(LLM_TOKENIZER_FILES[:2])})")
    llm_dir = root / "tokenizer" / "llm"
    llm_dir.mkdir(parents=True)
    for f in llm_files:
        shutil.copy2(f, llm_dir / f.name)
    out["llm"] = {"dir": "tokenizer/llm", "files": sorted(f.name for f in llm_files)}
    text_src = Path(ckpt.text_tokenizer_dir)
    text_files = [f for f in sorted(text_src.iterdir()) if f.is_file() and f.suffix not in _WEIGHT_SUFFIXES
                  and not f.name.endswith(".index.json") and f.name != "config.json"]
    if not any(f.name in ("vocab.txt", "tokenizer.json") for f in text_files):
        raise CheckpointError(f"{text_src} has no BERT vocab (vocab.txt or tokenizer.json); the text encoder "
                              "cannot tokenize questions without it")
    text_dir = root / "tokenizer" / "text"
    text_dir.mkdir(parents=True)
    for f in text_files:
        shutil.copy2(f, text_dir / f.name)
    out["text"] = {"dir": "tokenizer/text", "files": [f.name for f in text_files]}
    return out


def ship_variant(root: Path, source: Variant, source_dir: Path, decision: dict[str, Any] | None = None) -> Variant:
    """Link a variant's graph from a unit folder into the bundle's graphs/, copy its external data, and return its
    bundle-relative entry. (onnx refuses to read external data that has several hard links, as a possible hard-link
    attack: a linked weight file would make both the bundle's graph and the work unit's unreadable to onnx.load,
    and the next build that reuses the unit would stop on it.)"""
    files = []
    for rel in source.files:
        dst = root / "graphs" / Path(rel).name
        link_or_copy(source_dir / rel, dst, link=Path(rel).name == Path(source.graph).name)
        files.append(dst.relative_to(root).as_posix())
    return Variant(graph=f"graphs/{Path(source.graph).name}", files=files, bytes=source.bytes, nodes=source.nodes,
                   parity=source.parity, decision=decision, build_s=source.build_s, validate_s=source.validate_s)


def _quantized_variant(unit_dir: Path, decision: dict[str, Any]) -> Variant:
    """A quantize unit's graph as a Variant, its parity the gate's: the worst held-out sample against fp32."""
    path = unit_dir / decision["path"]
    files = graph_files(path)
    held_out = decision.get("held_out") or {}
    parity = {"reference": "fp32 graph", "tolerance": decision["budget"], "gate": decision.get("gate"),
              "num_samples": len(held_out), "samples": sorted(held_out), "worst_sample": decision.get("worst_sample"),
              "worst": {"all outputs": {**decision["measured"], "finite": True}}}
    return Variant(graph=path.relative_to(unit_dir).as_posix(),
                   files=[f.relative_to(unit_dir).as_posix() for f in files], bytes=sum(f.stat().st_size for f in files), parity=parity, decision=decision)


def _write_checks(root: Path, graph: GraphEntry, exported: Exported) -> str:
    """The graph's check feed (one real image, from the export unit), stored fp16: engine parity on the device
    compares the engine with the ONNX graph on the same input, so the rounding of the input does not matter."""
    feed = read_feeds(exported.path / exported.result.checks[graph.name])[0]
    path = root / "checks" / f"{graph.name}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    # stacked on a leading sample axis of one, like every feeds file (read_feeds)
    np.savez_compressed(path, **{k: (v.astype(np.float16) if v.dtype == np.float32 else v)[None]
                                 for k, v in feed.items()})
    return path.relative_to(root).as_posix()


def ship_graphs(ctx: BuildContext, root: Path, recipe: "Recipe", exported: dict[str, Exported],
                also_precisions: Sequence[str]) -> tuple[dict[str, GraphEntry], dict[str, dict], dict[str, str],
                                                          dict[str, str]]:
    """Quantize what the recipe asks and link every shipped variant into root: (graphs, quantization decisions,
    shipped precision per graph, check feeds per graph)."""
    graphs: dict[str, GraphEntry] = {}
    decisions: dict[str, dict[str, Any]] = {}
    shipped: dict[str, str] = {}
    checks: dict[str, str] = {}
    for unit in exported.values():
        for graph in unit.result.graphs:
            entry = replace(graph, variants={})
            decision, quant_dir = quantize(ctx, graph, unit, recipe)
            precision = decision["variant"]
            decisions[graph.name], shipped[graph.name] = decision, precision
            for p in dict.fromkeys([precision, *also_precisions]):
                if p in graph.variants:
                    entry.variants[p] = ship_variant(root, graph.variants[p], unit.path)
                    continue
                if p != precision:   # an extra quantized precision: quantized like the recipe's own, with its budget
                    decision_p, quant_dir_p = quantize(ctx, graph, unit, recipe, p)
                    if decision_p["variant"] != p:
                        ctx.console.line(f"{graph.name}: the extra {p} variant missed its budget; not shipped")
                        continue
                else:
                    decision_p, quant_dir_p = decision, quant_dir
                source = _quantized_variant(quant_dir_p, decision_p)
                entry.variants[p] = ship_variant(root, source, quant_dir_p, decision_p)
            if recipe.runtime == "tensorrt":
                checks[graph.name] = _write_checks(root, graph, unit)
            graphs[graph.name] = entry
    return graphs, decisions, shipped, checks


def ship_llms(ctx: BuildContext, root: Path, qtypes: Sequence[str], settings: LLMSettings) -> dict[str, LLMEntry]:
    """The LLM as GGUF of each quant type, linked into llm/."""
    llms: dict[str, LLMEntry] = {}
    for qtype in dict.fromkeys(qtypes):
        path, info = gguf(ctx, qtype)
        rel = f"llm/{path.name}"
        link_or_copy(path, root / rel)
        llms[qtype] = LLMEntry(rel, qtype, info["n_embd"], info["n_vocab"], settings, info.get("convert_s"))
    return llms


def new_manifest(ctx: BuildContext, root: Path, graphs: dict[str, GraphEntry], **fields: Any) -> Manifest:
    """The manifest every entry point starts from (model facts, config, tokenizers, source, tools); `fields` add the
    rest (llm, target, recipe, runtime defaults, quantization decisions, checks)."""
    return Manifest(model=ctx.facts, config=ctx.checkpoint.config.to_dict(), graphs=graphs,
                    tokenizers=copy_tokenizers(ctx.checkpoint, root), source_checkpoint=ctx.source,
                    tools=tool_versions(), created_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    export={"calibration": ctx.calibration.to_json(), "full_sweep": ctx.full_sweep}, **fields)


def recipe_manifest(ctx: BuildContext, root: Path, recipe: "Recipe", exported: dict[str, Exported],
                    also_precisions: Sequence[str], also_llm: Sequence[str]) -> Manifest:
    """Quantize what the recipe asks, then put every shipped file into the bundle folder and describe it."""
    graphs, decisions, shipped, checks = ship_graphs(ctx, root, recipe, exported, also_precisions)
    llm = recipe.llm
    llms = ship_llms(ctx, root, [llm.quant, *also_llm],
                     LLMSettings(n_ctx=llm.context, n_gpu_layers=llm.gpu_layers, n_threads=llm.threads))
    return new_manifest(
        ctx, root, graphs, llm=llms[llm.quant], llms=llms, checks=checks,
        target={"recipe": recipe.name, "runtime": recipe.runtime, "device": recipe.device.name,
                "compute_capability": recipe.device.cc_str or None},
        recipe=recipe.to_json(),
        runtime=RuntimeDefaults(precision=shipped, expert_policy=recipe.experts.policy,
                                max_loaded_experts=recipe.experts.max_loaded,
                                vision_backend="tensorrt" if recipe.runtime == "tensorrt" else "onnxruntime"),
        quantize=decisions)

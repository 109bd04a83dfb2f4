"""The build's stages, one resumable unit per (stage, component): features, export, quantize, gguf.

Each stage function looks its unit up in the work folder by key: a finished unit is reused as it is (its result is
read back from unit.json), otherwise it is produced into a temp folder and renamed into place when done, so an
interruption keeps every unit finished before it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from ..errors import BuildError, RecipeError
from ..progress import Console
from .work import GIB, Unit, WorkFolder, digest, write_unit

if TYPE_CHECKING:  # pragma: no cover
    from ..bundle.manifest import GraphEntry
    from ..checkpoint import Checkpoint
    from ..export import CalibrationSet, ExportedComponent
    from ..facts import ModelFacts
    from ..recipe import Recipe

# Bumped when a stage's output for the same inputs changes (a new unit key, so old units are not reused).
STAGE_VERSIONS = {"features": 1, "export": 3, "quantize": 3, "gguf": 1}
BYTES_PER_PARAM = {"fp32": 4, "fp16": 2, "int8": 1, "fp8": 1}


@dataclass
class StageRecord:
    stage: str
    name: str
    key: str
    status: str                  # computed | reused (found finished in the work folder)
    seconds: float = 0.0
    detail: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"stage": self.stage, "name": self.name, "key": self.key, "status": self.status,
                "seconds": round(self.seconds, 2), **self.detail}


@dataclass
class BuildContext:
    checkpoint: "Checkpoint"
    fingerprint: str             # checkpoint_fingerprint(...)["digest"]
    calibration: "CalibrationSet"
    facts: "ModelFacts"
    work: WorkFolder
    console: Console
    reuse: bool = True
    full_sweep: bool = True
    random_samples: int = 1
    records: list[StageRecord] = field(default_factory=list)
    _images: list[tuple[str, np.ndarray]] | None = None
    _text_tokenizer: Any = None

    @property
    def images(self) -> list[tuple[str, np.ndarray]]:
        if self._images is None:
            self._images = self.calibration.images()
        return self._images

    @property
    def text_tokenizer(self) -> Any:
        if self._text_tokenizer is None:
            from ..text import BertTextTokenizer

            self._text_tokenizer = BertTextTokenizer.from_folder(self.checkpoint.text_tokenizer_dir)
        return self._text_tokenizer

    def find(self, stage: str, name: str, key: str) -> tuple[Unit, bool]:
        """The unit and whether it is finished and may be reused."""
        unit = self.work.unit(stage, name, key)
        if not (self.reuse and unit.done):
            return unit, False
        changed = unit.changed_files()
        if changed:
            self.console.line(f"{stage} {name}: the work folder's unit was modified since it finished "
                              f"({', '.join(changed[:3])}{' ...' if len(changed) > 3 else ''}); producing it again")
            return unit, False
        return unit, True

    def record(self, stage: str, name: str, key: str, reused: bool, start: float, **detail: Any) -> StageRecord:
        rec = StageRecord(stage, name, key, "reused" if reused else "computed", time.perf_counter() - start, detail)
        self.records.append(rec)
        if reused:
            self.console.line(f"{stage} {name}: reused from the work folder ({key})")
        return rec

    def component_bytes(self, name: str, precision: str = "fp32") -> int:
        from ..components import get_spec

        params = get_spec(name).memory.params if self.checkpoint.config.scale == "full" else 0
        if not params:  # tiny checkpoints: the tensors' own size
            info = self.checkpoint.tensor_info(self.checkpoint.component_keys(name))
            params = sum(int(np.prod(shape)) for shape, _ in info.values())
        return params * BYTES_PER_PARAM[precision]


# ---- features: every tower's and the text encoder's output on the calibration images ---------------------------------
def features_key(ctx: BuildContext, name: str) -> str:
    return digest("features", STAGE_VERSIONS["features"], ctx.fingerprint, name, ctx.calibration.digest(),
                  ctx.facts.to_json())


def features_stage(ctx: BuildContext, name: str) -> dict[str, np.ndarray]:
    """{image label: first output} of a tower / the text encoder (what the adapter's samples and the component's
    own parity references read)."""
    from ..export.component import FEATURES, component_features, read_features

    start = time.perf_counter()
    key = features_key(ctx, name)
    unit, reused = ctx.find("features", name, key)
    if not reused:
        with unit.produce() as tmp:
            feats = component_features(ctx.checkpoint, name, ctx.images, ctx.calibration.questions, ctx.facts,
                                       ctx.text_tokenizer, ctx.console)
            np.savez(tmp / FEATURES, **feats)
            write_unit(tmp, {"features": FEATURES, "images": list(feats)})
    ctx.record("features", name, key, reused, start)
    return read_features(unit.path / FEATURES)


# ---- export ------------------------------------------------------------------------------------------------------------
def export_key(ctx: BuildContext, name: str, upstream_keys: Mapping[str, str], simplify: bool) -> str:
    from ..export import EXPORT_PRECISIONS

    return digest("export", STAGE_VERSIONS["export"], ctx.fingerprint, name, ctx.calibration.digest(),
                  ctx.facts.to_json(), dict(upstream_keys), EXPORT_PRECISIONS, ctx.full_sweep, ctx.random_samples,
                  simplify)


def export_stage(ctx: BuildContext, name: str, upstream: Mapping[str, Mapping[str, np.ndarray]],
                 upstream_keys: Mapping[str, str], simplify: bool = True) -> tuple["ExportedComponent", Path]:
    """The component's graphs (fp32 + fp16) with their parity proof and calibration feeds: (result, unit folder)."""
    from ..export import ExportedComponent, ExportInputs, export_component

    start = time.perf_counter()
    key = export_key(ctx, name, upstream_keys, simplify)
    unit, reused = ctx.find("export", name, key)
    if reused:
        result = ExportedComponent.from_json(unit.read())
    else:
        ctx.work.require_free(ctx.component_bytes(name) * 2, f"exporting {name} (fp32 + fp16 graphs)")
        ins = ExportInputs(ctx.images, ctx.calibration.questions, ctx.facts, ctx.text_tokenizer, upstream,
                           ctx.random_samples, ctx.full_sweep)
        with unit.produce() as tmp:
            result = export_component(ctx.checkpoint, name, tmp, ins, simplify=simplify, console=ctx.console)
            write_unit(tmp, result.to_json())
    ctx.record("export", name, key, reused, start, graphs=[g.name for g in result.graphs])
    return result, unit.path


# ---- quantize ------------------------------------------------------------------------------------------------------
def quantize_stage(ctx: BuildContext, graph: "GraphEntry", export_dir: Path, export_unit_key: str,
                   calibration_file: str, recipe: "Recipe") -> tuple[dict[str, Any], Path | None]:
    """The shipped variant of one graph for the recipe: (decision, quantize unit folder or None). The decision's
    `variant` is what ships: an int8/fp8 graph at the unit's `path`, or the export's fp16/fp32 graph (what the
    recipe asks, or its fallback when the quantized graph misses the accuracy budget)."""
    from ..export import read_feeds
    from ..quantize import QDQ_BASE, quantize_with_budget, split_feeds
    from ..validate import Tolerance

    wanted = recipe.precision_of(graph.component)
    if wanted not in ("int8", "fp8"):
        return {"graph": graph.name, "requested": wanted, "final": wanted, "variant": wanted}, None
    from ..recipe import cache_key

    if wanted not in recipe.accuracy:
        raise RecipeError(f"recipe {recipe.name}: accuracy.{wanted} is missing; give it a min_cosine")
    start = time.perf_counter()
    key = digest("quantize", STAGE_VERSIONS["quantize"], export_unit_key, graph.name,
                 cache_key(recipe, "quantize", graph.component))
    unit, reused = ctx.find("quantize", graph.name, key)
    if reused:
        decision = unit.read()
    else:
        ctx.work.require_free(ctx.component_bytes(graph.component) * 3, f"quantizing {graph.name}")
        feeds = read_feeds(export_dir / calibration_file)[: recipe.calibration.samples]
        calib, held_out = split_feeds(feeds)
        budget = recipe.accuracy[wanted]
        tol = Tolerance(min_cosine=budget.min_cosine,
                        max_rel_l2=float("inf") if budget.max_rel_l2 is None else budget.max_rel_l2)
        with unit.produce() as tmp, ctx.console.task(f"quantize {graph.name} to {wanted}", total=1) as steps:
            result = quantize_with_budget(export_dir / graph.variants["fp32"].graph, tmp / "graphs", graph.name,
                                          wanted, calib, held_out, tol, method=recipe.calibration.method,
                                          base=QDQ_BASE[recipe.runtime], log=ctx.console.line)
            steps.advance(result.final)
            decision = result.to_json()
            decision["path"] = Path(decision["path"]).relative_to(tmp).as_posix()
            decision["graph"] = graph.name
            decision["variant"] = "fp16" if decision["final"] == "fp16" else wanted
            write_unit(tmp, decision)
    decision = dict(decision)
    if decision["final"] == "fp16" and recipe.calibration.fallback != "fp16":
        if recipe.calibration.fallback == "none":
            raise BuildError(f"{graph.name}: {wanted} misses the recipe's accuracy budget (cosine "
                             f"{decision['measured']['cosine']:.5f} < {decision['budget']['min_cosine']}) and "
                             f"calibration.fallback is none; relax accuracy.{wanted} or allow a fallback")
        decision["variant"] = decision["final"] = recipe.calibration.fallback   # fp32: the export's own graph
    ctx.record("quantize", graph.name, key, reused, start, requested=wanted, final=decision["final"])
    return decision, unit.path


# ---- gguf ------------------------------------------------------------------------------------------------------------
def gguf_stage(ctx: BuildContext, qtype: str) -> tuple[Path, dict[str, Any]]:
    """The LLM as GGUF of one quant type: (file, {qtype, n_embd, n_vocab, convert_s})."""
    from ..gguf.convert import convert_checkpoint_to_gguf, estimate_gguf_bytes

    start = time.perf_counter()
    key = digest("gguf", STAGE_VERSIONS["gguf"], ctx.fingerprint, qtype)
    unit, reused = ctx.find("gguf", qtype, key)
    name = f"model.{qtype}.gguf"
    if not reused:
        ctx.work.require_free(estimate_gguf_bytes(ctx.checkpoint, qtype), f"converting the LLM to GGUF {qtype}")
        with unit.produce() as tmp:
            convert_checkpoint_to_gguf(ctx.checkpoint.path, tmp / name, qtype, console=ctx.console)
            llm = ctx.checkpoint.config.llm
            write_unit(tmp, {"gguf": name, "qtype": qtype, "n_embd": int(llm["hidden_size"]),
                             "n_vocab": int(llm["vocab_size"]), "convert_s": round(time.perf_counter() - start, 2)})
    ctx.record("gguf", qtype, key, reused, start)
    return unit.path / name, unit.read()


def disk_estimate_gib(ctx: BuildContext, names: Sequence[str]) -> float:
    """Rough size of the export units of `names` (fp32 + fp16), for the plan's disk line."""
    return sum(ctx.component_bytes(n) * 1.5 for n in names) / GIB

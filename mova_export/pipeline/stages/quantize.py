"""quantize: the shipped variant of one graph for a recipe. An int8/fp8 graph is a unit keyed by the graph's export
unit and its QuantSettings (backend resolved, budget, calibration counts, base, gate mode); fp16/fp32 graphs ship the
export's own graph and need no unit."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...components import all_specs
from ...core.errors import BuildError
from ...export import read_feeds
from ...export.samples import adapter_calibration_feeds
from ...quantize import QuantSettings, quantize_with_budget, split_calibration
from ..unit import BuildContext, library_versions, run_unit
from .export import Exported
from .features import features

if TYPE_CHECKING:  # pragma: no cover
    from ...bundle.manifest import GraphEntry
    from ...recipe import Recipe

QUANTIZED = ("int8", "fp8")


@dataclass(frozen=True)
class QuantizeItem:
    graph: "GraphEntry"
    export: Exported
    settings: QuantSettings
    feature_keys: tuple[tuple[str, str], ...] = ()   # adapter graphs: the calibration features they are fed


class QuantizeStage:
    name = "quantize"
    version = 6             # 6: exclusion tries stop when they cannot reach the budget; the recipe's fallback decides
                            # the fallback graph (no fp16 graph written for a recipe falling back to fp32)

    def __init__(self, adapter_features: dict[str, Any] | None = None):
        self.adapter_features = adapter_features or {}

    def unit_name(self, item: QuantizeItem) -> str:
        return item.graph.name

    def settings(self, ctx: BuildContext, item: QuantizeItem) -> dict[str, Any]:
        tools = ("onnx", "onnxruntime") + (("nvidia-modelopt",) if item.settings.backend == "modelopt" else ())
        return {"graph": item.graph.name, "quantize": item.settings.to_json(), "tools": library_versions(*tools)}

    def upstream(self, ctx: BuildContext, item: QuantizeItem) -> dict[str, str]:
        return {"export": item.export.key, **dict(item.feature_keys)}

    def bytes_needed(self, ctx: BuildContext, item: QuantizeItem) -> int:
        return ctx.component_bytes(item.graph.component) * 3

    def _feeds(self, ctx: BuildContext, item: QuantizeItem) -> tuple[list[dict], list[str]]:
        labels = list(ctx.calibration.labels)
        if item.graph.role.startswith("adapter"):
            return adapter_calibration_feeds(item.graph, self.adapter_features, ctx.facts, labels), labels
        rel = item.export.result.calibration[item.graph.name]
        return read_feeds(item.export.path / rel), item.export.result.calibration_labels or labels

    def produce(self, ctx: BuildContext, item: QuantizeItem, tmp: Path) -> dict[str, Any]:
        feeds, labels = self._feeds(ctx, item)
        split = split_calibration(feeds, labels, item.settings.samples, item.settings.held_out)
        fp32 = item.export.path / item.graph.variants["fp32"].graph
        with ctx.console.task(f"quantize {item.graph.name} to {item.settings.precision}", total=1) as steps:
            result = quantize_with_budget(fp32, tmp / "graphs", item.graph.name, item.settings, split,
                                          _fp16_keep(item.graph), log=ctx.console.line)
            steps.advance(result.final)
        decision = result.to_json()
        decision["path"] = None if result.final == "fp32" else Path(decision["path"]).relative_to(tmp).as_posix()
        decision["graph"] = item.graph.name
        decision["variant"] = decision["final"] if decision["final"] in ("fp16", "fp32") else item.settings.precision
        return decision


def _fp16_keep(graph: "GraphEntry") -> list[str] | None:
    """The nodes the graph's fp16 variant keeps in fp32 (its export's repair), or None when it has no fp16 variant
    (none met the fp16 tolerance)."""
    fp16 = graph.variants.get("fp16")
    if fp16 is None:
        return None
    return list(((fp16.decision or {}).get("fp16_repair") or {}).get("kept_fp32", []))


def quantize(ctx: BuildContext, graph: "GraphEntry", exported: Exported, recipe: "Recipe",
             precision: str | None = None) -> tuple[dict[str, Any], Path | None]:
    """The shipped variant of one graph for the recipe: (decision, quantize unit folder or None). The decision's
    `variant` is what ships: an int8/fp8 graph at the unit's `path`, or the export's fp16/fp32 graph (what the
    recipe asks, or its fallback when the quantized graph misses the accuracy budget)."""
    wanted = precision or recipe.precision_of(graph.component)
    if wanted not in QUANTIZED:
        if wanted in graph.variants:
            return {"graph": graph.name, "requested": wanted, "final": wanted, "variant": wanted}, None
        reason = graph.missing.get(wanted, f"the export has no {wanted} graph")
        ctx.console.line(f"WARNING {graph.name}: {reason}; the fp32 graph ships")
        return {"graph": graph.name, "requested": wanted, "final": "fp32", "variant": "fp32", "reason": reason}, None
    settings = QuantSettings.from_recipe(recipe, graph.component, wanted)
    adapter_features, keys = {}, ()
    if graph.role.startswith("adapter"):   # calibrated on every calibration image's real features
        feeders = [c for c in _feeders()]
        got = {c: features(ctx, c, "calibration") for c in feeders}
        adapter_features, keys = {c: f for c, (f, _) in got.items()}, tuple((c, k) for c, (_, k) in got.items())
    unit = run_unit(ctx, QuantizeStage(adapter_features), QuantizeItem(graph, exported, settings, keys))
    decision = dict(unit.data)
    ctx.records[-1].detail.update(requested=wanted, final=decision["final"])
    shortfall = (decision.get("calibration") or {}).get("shortfall")
    if shortfall:
        ctx.console.line(f"WARNING {graph.name}: {shortfall}")
    if decision["final"] in ("fp16", "fp32") and settings.fallback == "none":
        best = max(h["cosine"] for h in decision["history"][:-1])      # the tries, not the fallback
        raise BuildError(f"{graph.name}: {wanted} misses the recipe's accuracy budget (worst held-out cosine of its "
                         f"best try {best:.5f} < {decision['budget']['min_cosine']}) and "
                         f"calibration.fallback is none; relax accuracy.{wanted} or allow a fallback")
    return decision, unit.path


def _feeders() -> list[str]:

    return [s.name for s in all_specs() if s.kind in ("tower", "text")]

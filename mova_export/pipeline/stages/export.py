"""export: a component's graphs (fp32 + fp16) proven against PyTorch on the parity images, and the calibration
feeds of its tower or text graph on every calibration image."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ...components import get_spec
from ...export import EXPORT_PRECISIONS, ExportedComponent, ExportInputs, export_component
from ..unit import BuildContext, library_versions, run_unit
from .features import features


@dataclass(frozen=True)
class ExportItem:
    component: str
    feature_keys: tuple[tuple[str, str], ...]     # (component, features unit key) the export reads
    simplify: bool = True


class ExportStage:
    name = "export"
    version = 5             # 5: the fp16 repair keeps whole blocks of a layered graph (export/fp16.py)

    def __init__(self, upstream: Mapping[str, Mapping[str, Any]]):
        self.features = upstream               # component -> parity features, for the item's produce()

    def unit_name(self, item: ExportItem) -> str:
        return item.component

    def settings(self, ctx: BuildContext, item: ExportItem) -> dict[str, Any]:
        return {"component": item.component, "checkpoint": ctx.fingerprint,
                "parity_images": ctx.calibration.parity().digest(), "calibration_images": ctx.calibration.digest(),
                "facts": ctx.facts.to_json(), "precisions": list(EXPORT_PRECISIONS), "full_sweep": ctx.full_sweep,
                "random_samples": ctx.random_samples, "simplify": item.simplify,
                "tools": library_versions("torch", "onnx", "onnxscript", "onnx-ir", "onnxslim", "onnxruntime")}

    def upstream(self, ctx: BuildContext, item: ExportItem) -> dict[str, str]:
        return dict(item.feature_keys)

    def bytes_needed(self, ctx: BuildContext, item: ExportItem) -> int:
        return ctx.component_bytes(item.component) * 2                  # the fp32 and fp16 graphs

    def produce(self, ctx: BuildContext, item: ExportItem, tmp: Path) -> dict[str, Any]:
        ins = ExportInputs(ctx.calibration.parity(), ctx.calibration, ctx.facts, ctx.text_tokenizer,
                           {c: self.features[c] for c, _ in item.feature_keys}, ctx.random_samples, ctx.full_sweep)
        return export_component(ctx.checkpoint, item.component, tmp, ins, simplify=item.simplify,
                                console=ctx.console).to_json()


@dataclass
class Exported:
    """A finished export unit: its result, its folder and its key (what the quantize units read)."""
    result: ExportedComponent
    path: Path
    key: str


def run_exports(ctx: BuildContext, names: list[str], feeders: list[str], simplify: bool = True
                ) -> dict[str, Exported]:
    """features + export units for `names`. The adapter's parity samples need every feeder's (tower's and text
    encoder's) parity features, whether or not those components are exported."""

    adapter = any(get_spec(n).kind == "adapter" for n in names)
    needs = feeders if adapter else [n for n in names if n in feeders]
    feats = {name: features(ctx, name) for name in needs}
    stage = ExportStage({name: f for name, (f, _) in feats.items()})
    out = {}
    for name in names:
        reads = needs if get_spec(name).kind == "adapter" else [name]
        item = ExportItem(name, tuple((c, feats[c][1]) for c in reads), simplify)
        unit = run_unit(ctx, stage, item)
        result = ExportedComponent.from_json(unit.data)
        ctx.records[-1].detail["graphs"] = [g.name for g in result.graphs]
        out[name] = Exported(result, unit.path, unit.key)
    return out

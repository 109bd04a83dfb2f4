"""features: a tower's or the text encoder's PyTorch output on images of the calibration set.

Two image sets per component: "parity" (the first PARITY_IMAGES images; the export's references and the adapter's
parity samples read these) and "calibration" (every image; read only when the adapter itself is quantized, to
calibrate it on real features). A full-size build of the shipped recipes computes the parity features only.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...export.component import FEATURES, component_features, read_features
from ..unit import BuildContext, library_versions, run_unit

IMAGE_SETS = ("parity", "calibration")


@dataclass(frozen=True)
class FeaturesItem:
    component: str
    images: str = "parity"                    # parity | calibration


class FeaturesStage:
    name = "features"
    version = 2

    def unit_name(self, item: FeaturesItem) -> str:
        return item.component if item.images == "parity" else f"{item.component}.{item.images}"

    def _set(self, ctx: BuildContext, item: FeaturesItem) -> Any:
        return ctx.calibration.parity() if item.images == "parity" else ctx.calibration

    def settings(self, ctx: BuildContext, item: FeaturesItem) -> dict[str, Any]:
        return {"component": item.component, "checkpoint": ctx.fingerprint,
                "images": self._set(ctx, item).digest(), "facts": ctx.facts.to_json(),
                "tools": library_versions("torch", "transformers")}

    def upstream(self, ctx: BuildContext, item: FeaturesItem) -> dict[str, str]:
        return {}

    def bytes_needed(self, ctx: BuildContext, item: FeaturesItem) -> int:
        return 0

    def produce(self, ctx: BuildContext, item: FeaturesItem, tmp: Path) -> dict[str, Any]:
        images = self._set(ctx, item)
        feats = component_features(ctx.checkpoint, item.component, images.images(), images.questions, ctx.facts,
                                   ctx.text_tokenizer, ctx.console)
        np.savez(tmp / FEATURES, **feats)
        return {"features": FEATURES, "images": list(feats)}


FEATURES_STAGE = FeaturesStage()


def features(ctx: BuildContext, component: str, images: str = "parity") -> tuple[dict[str, np.ndarray], str]:
    """({image label: the component's first output}, the unit's key)."""
    out = run_unit(ctx, FEATURES_STAGE, FeaturesItem(component, images))
    return read_features(out.path / FEATURES), out.key

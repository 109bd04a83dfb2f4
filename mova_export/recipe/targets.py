"""`--target` strings that pick a Jetson recipe's JetPack: `NAME@jetpackX.Y` -> the recipe mapping for that JetPack.

One Orin recipe per module, not one per JetPack: `jetson-orin@jetpack7.2` is the AGX Orin recipe with device.jetpack
7.2. Its precisions stay; its TensorRT version (so its flavor: weakly typed 10.3 on JetPack 6.2, strongly typed 10.16
on 7.2) follows the JetPack (core/jetpack.py), and DLA components run on the GPU where that JetPack's TensorRT has no
DLA. load.py validates the result like any recipe.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Mapping

from ..core.errors import RecipeError
from ..core.jetpack import JETPACKS, jetpack_line

DEFAULT_JETPACK = "6.2"      # what a Jetson recipe without device.jetpack assumes (the JetPack 6 recipes of before)


def split_target(name_or_path: str | Path) -> tuple[str, str | None]:
    """"jetson-orin@jetpack7.2" -> ("jetson-orin", "7.2"); a target without `@` -> (it, None)."""
    text = str(name_or_path)
    if "@" not in text:
        return text, None
    base, _, choice = text.rpartition("@")
    m = re.fullmatch(r"(?:jetpack|jp)-?(\d+\.\d+(?:\.\d+)?)", choice.strip().lower())
    if not base or m is None:
        raise RecipeError(f"target {text!r}: write the JetPack as NAME@jetpackX.Y, e.g. jetson-orin@jetpack7.2 "
                          f"(JetPacks: {', '.join(JETPACKS)})")
    return base, jetpack_line(m.group(1))


def with_jetpack(raw: Any, jetpack: str, target: str, source: str) -> dict[str, Any]:
    """The recipe mapping `raw` for JetPack `jetpack`: device.jetpack set, the TensorRT version left to follow it,
    the DLA list emptied where that JetPack's TensorRT has no DLA (said in the description), and the name
    `<name>@jetpack<X.Y>` (the recipe's own JetPack keeps the plain name). RecipeError for a non-Jetson recipe."""
    if not isinstance(raw, Mapping) or not isinstance(raw.get("device"), Mapping):
        return raw   # parse_recipe names what is wrong
    out = copy.deepcopy(dict(raw))
    if out["device"].get("kind") != "jetson":
        raise RecipeError(f"target {target!r}: {out.get('name', source)} is not a Jetson (device.kind "
                          f"{out['device'].get('kind')}); a JetPack applies to Jetson targets only: drop the @ part")
    default = str(out["device"].get("jetpack") or DEFAULT_JETPACK)
    if jetpack == jetpack_line(default):
        return out
    out["device"] = {**out["device"], "jetpack": jetpack}
    trt = out.get("tensorrt")
    if isinstance(trt, Mapping):
        trt = {k: v for k, v in trt.items() if k != "version"}
        dla = trt.get("dla") if isinstance(trt.get("dla"), Mapping) else {}
        if jetpack in JETPACKS and not JETPACKS[jetpack].dla and dla.get("components"):
            trt.pop("dla")
            out["description"] = (f"{out.get('description', '')}; JetPack {jetpack}: no DLA in its TensorRT, "
                                  f"{', '.join(dla['components'])} on the GPU").lstrip("; ")
        out["tensorrt"] = trt
    out["name"] = f"{out.get('name')}@jetpack{jetpack}"
    return out


__all__ = ["DEFAULT_JETPACK", "split_target", "with_jetpack"]

"""Target recipes: one YAML per device in the top-level `recipes/` folder -> one frozen `Recipe`.

schema.py    the dataclasses (Device, TensorRTOptions, Calibration, ..., Recipe)
hardware.py  `--target` aliases, known GPUs (compute capability, DLA cores), the FP8 threshold
load.py      finding a recipe by name, alias or path, and validating it field by field
targets.py   `NAME@jetpackX.Y`: a Jetson recipe on another JetPack (one recipe per module, not per JetPack)

Stages do not hash the recipe: each derives the settings object it consumes from it (quantize.QuantSettings,
compile.BuilderSettings, the GGUF type) and its unit key is a hash of that object (pipeline/stages).
"""
from .hardware import ALIASES, FP8_MIN_CC, KNOWN_GPUS
from .load import (
    list_recipes,
    load_recipe,
    parse_recipe,
    recipe_dirs,
    resolve_target,
)
from .schema import (
    CALIBRATION_METHODS,
    GROUP_KEYS,
    RUNTIMES,
    BuilderOptions,
    Calibration,
    Device,
    DLAOptions,
    ExpertPolicy,
    LLMOptions,
    MemoryOptions,
    Recipe,
    TensorRTOptions,
    expert_components,
    graph_components,
    llm_quants,
)
from .targets import DEFAULT_JETPACK, split_target, with_jetpack

__all__ = ["ALIASES", "CALIBRATION_METHODS", "DEFAULT_JETPACK", "FP8_MIN_CC", "GROUP_KEYS", "KNOWN_GPUS", "RUNTIMES", "BuilderOptions",
           "Calibration", "DLAOptions", "Device", "ExpertPolicy", "LLMOptions", "MemoryOptions", "Recipe",
           "TensorRTOptions", "expert_components", "graph_components", "list_recipes", "llm_quants", "load_recipe",
           "parse_recipe", "recipe_dirs", "resolve_target", "split_target", "with_jetpack"]

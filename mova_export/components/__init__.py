"""Component registry: one ComponentSpec per deployable piece of MoVA.

Components: `base` (CLIP), `expert_A`..`expert_G` (vision experts, code order), `text_encoder` (BERT),
`adapter` (MoV-Adapter incl. downsample + MLP + routing pool) and `llm` (Llama).

Contract every component module fulfils:
* `spec.build(cfg)` returns an eval-mode fp32 `nn.Module` whose `state_dict()` keys are exactly the checkpoint keys
  under `spec.prefix` (minus the prefix), excluding keys under `spec.exclude_prefixes`.
* its `forward(*tensors)` takes the tensors named by `spec.inputs(cfg)` in that order and returns the tensors named
  by `spec.outputs(cfg)` (a single tensor when there is one output). Vision towers return features already
  aligned to the image_feat_size^2 grid: [1, grid_tokens, C] in fp32.
* `spec.sample_inputs(cfg, seed)` returns a dict name -> tensor of valid (not only random) example inputs.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

from ..errors import ComponentError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from ..config import ExpertInfo, MoVAConfig


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"  # numpy dtype name: float32, int64, ...


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    prefix: str                                                   # checkpoint key prefix, ends with "."
    presets: Mapping[str, Mapping[str, Any]]                      # {"full": {...}, "tiny": {...}}
    build: Callable[["MoVAConfig"], "torch.nn.Module"]
    inputs: Callable[["MoVAConfig"], tuple[TensorSpec, ...]]
    outputs: Callable[["MoVAConfig"], tuple[TensorSpec, ...]]
    sample_inputs: Callable[["MoVAConfig", int], dict[str, "torch.Tensor"]] | None = None
    exclude_prefixes: tuple[str, ...] = ()   # sub-prefixes owned by another component (relative to prefix)
    include_prefixes: tuple[str, ...] = ()   # when set, only keys under these (relative) sub-prefixes are owned
    unused_keys: tuple[str, ...] = ()        # fnmatch patterns (relative) real checkpoints carry but MoVA never uses
    expert: "ExpertInfo | None" = None
    out_channels: Callable[[Mapping[str, Any]], int] | None = None  # towers: C of [1, grid, C] from the arch
    description: str = ""

    def owns(self, key: str) -> bool:
        """True when a full checkpoint key belongs to this component."""
        if not key.startswith(self.prefix):
            return False
        rel = key[len(self.prefix):]
        if self.include_prefixes and not any(rel.startswith(p) for p in self.include_prefixes):
            return False
        return not any(rel.startswith(p) for p in self.exclude_prefixes)

    def is_unused(self, rel_key: str) -> bool:
        return any(fnmatch.fnmatchcase(rel_key, pat) for pat in self.unused_keys)


_REGISTRY: dict[str, ComponentSpec] = {}


def register(spec: ComponentSpec) -> ComponentSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"component {spec.name!r} registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def get_spec(name: str) -> ComponentSpec:
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ComponentError(f"unknown component {name!r}; known: {', '.join(component_names())}") from None


def component_names() -> list[str]:
    _load_all()
    order = ["base", *(f"expert_{c}" for c in "ABCDEFG"), "text_encoder", "adapter", "llm"]
    return [n for n in order if n in _REGISTRY] + sorted(set(_REGISTRY) - set(order))


def all_specs() -> list[ComponentSpec]:
    return [_REGISTRY[n] for n in component_names()]


def expert_specs() -> list[ComponentSpec]:
    return [s for s in all_specs() if s.expert is not None]


def owner_of(key: str) -> ComponentSpec | None:
    """The one component that owns a full checkpoint key (None if nobody does)."""
    owners = [s for s in all_specs() if s.owns(key)]
    if len(owners) > 1:
        raise ComponentError(f"checkpoint key {key} is claimed by {[s.name for s in owners]}; fix the registry")
    return owners[0] if owners else None


_LOADED = False


def _load_all() -> None:
    """Import every component module once; each registers itself on import."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    import importlib

    for module in _COMPONENT_MODULES:
        try:
            importlib.import_module(f"{__name__}.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{module}":  # a real missing dependency: surface it
                raise


# One file per component family. Missing files are skipped so the package imports while they are written.
_COMPONENT_MODULES = ("clip", "dinov2", "sam", "codetr", "pix2struct", "biomedclip", "text_encoder",
                      "adapter", "llm")

"""Component registry: one ComponentSpec per deployable piece of MoVA, each owning every fact about itself.

Components: `base` (CLIP), `expert_A`..`expert_G` (vision experts, code order), `text_encoder` (BERT),
`adapter` (MoV-Adapter incl. downsample + MLP + routing pool) and `llm` (Llama). Adding an expert is one new file
in this folder (its module, presets, routing letter and router text, image input, declared I/O, memory figures) plus
its line in COMPONENT_MODULES: everything else (the routing prompt, the adapter's expert count, the recipes'
precision defaults, the memory planner, the bundle, the runtime) reads the registry.

This module is pure Python (no torch): the registry's facts are read by build-side code that must not build any
module, and the component files are imported only when a spec is asked for.

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
import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

from ..core.bert_inputs import TEXT_BUCKETS
from ..core.errors import ComponentError, ConfigError, RuntimeInputError
from ..core.facts import ModelFacts, TowerFacts
from ..core.prompts import routing_prompt
from ..core.spec import GraphForm, TensorSpec

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..core.image_inputs import ImageInput
    from ..source.config import MoVAConfig

KINDS = ("tower", "text", "adapter", "llm")


@dataclass(frozen=True)
class ExpertInfo:
    """What makes a tower an expert: the routing letter the LLM emits and the line the router prompt lists for it.
    Its routing index (position in routing_weights / expert_channels) is its letter's rank among the registered
    experts, so the code order A..G is the letter order."""
    letter: str
    router_text: str


@dataclass(frozen=True)
class MemoryFigures:
    """Full-size (MoVA-8B) figures the planner uses without weights: parameters, (tokens, width) of the graph's
    widest stage for the activation estimate, and (heads, tokens, score-sized tensors live at once) of its widest
    global attention: ONNX Runtime on a CPU materialises the attention scores, heads x tokens^2 floats each."""
    params: int
    activation: tuple[int, int]
    attention: tuple[int, int, int] = (0, 0, 0)


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    kind: str                                                     # tower | text | adapter | llm
    prefix: str                                                   # checkpoint key prefix, ends with "." (or "")
    presets: Mapping[str, Mapping[str, Any]]                      # {"full": {...}, "tiny": {...}}
    build: Callable[["MoVAConfig"], "torch.nn.Module"]
    inputs: Callable[["MoVAConfig"], tuple[TensorSpec, ...]]
    outputs: Callable[["MoVAConfig"], tuple[TensorSpec, ...]]
    memory: MemoryFigures
    sample_inputs: Callable[["MoVAConfig", int], dict[str, "torch.Tensor"]] | None = None
    image_inputs: tuple["ImageInput", ...] = ()   # towers: the preprocessed inputs, in the order of `inputs`
    exclude_prefixes: tuple[str, ...] = ()   # sub-prefixes owned by another component (relative to prefix)
    include_prefixes: tuple[str, ...] = ()   # when set, only keys under these (relative) sub-prefixes are owned
    unused_keys: tuple[str, ...] = ()        # fnmatch patterns (relative) real checkpoints carry but MoVA never uses
    expert: ExpertInfo | None = None
    out_channels: Callable[[Mapping[str, Any]], int] | None = None  # towers: C of [1, grid, C] from the arch
    # the graphs it exports as, when not the one graph of its own I/O (the adapter's routing, slot and dense forms)
    forms: Callable[["MoVAConfig"], tuple[GraphForm, ...]] | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ComponentError(f"component {self.name}: kind {self.kind!r}; use one of {', '.join(KINDS)}")
        if self.expert is not None and self.kind != "tower":
            raise ComponentError(f"component {self.name}: only towers can be experts")

    def owns(self, key: str) -> bool:
        """True when a full checkpoint key belongs to this component."""
        if not key.startswith(self.prefix):
            return False
        rel = key[len(self.prefix):]
        if self.include_prefixes and not any(rel.startswith(p) for p in self.include_prefixes):
            return False
        return not any(rel.startswith(p) for p in self.exclude_prefixes)

    def arch(self, cfg: "MoVAConfig") -> dict[str, Any]:
        """Architecture hyper-parameters at the config's scale: this component's preset, then the config's
        overrides for it."""
        if cfg.scale not in self.presets:
            raise ConfigError(f"component {self.name!r} has no {cfg.scale!r} preset; use scale full or tiny")
        return {**self.presets[cfg.scale], **dict(cfg.arch_overrides.get(self.name, {}))}

    def is_unused(self, rel_key: str) -> bool:
        return any(fnmatch.fnmatchcase(rel_key, pat) for pat in self.unused_keys)


# One module per component family, imported in this order (the pipeline order of the registry follows it).
COMPONENT_MODULES = ["clip", "dinov2", "sam", "codetr", "pix2struct", "biomedclip", "text_encoder", "adapter", "llm"]

_REGISTRY: dict[str, ComponentSpec] = {}
_LOADED = False


def register(spec: ComponentSpec) -> ComponentSpec:
    if spec.name in _REGISTRY:
        raise ComponentError(f"component {spec.name!r} registered twice")
    if spec.expert is not None and any(s.expert and s.expert.letter == spec.expert.letter for s in _REGISTRY.values()):
        raise ComponentError(f"component {spec.name}: routing letter {spec.expert.letter} is taken")
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove a spec (tests that register a toy component clean up with it)."""
    _REGISTRY.pop(name, None)


def _load_all() -> None:
    """Import every component module once; each registers itself on import. A module that fails to import is an
    error (a missing dependency must surface, not silently drop a component)."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for module in COMPONENT_MODULES:
        importlib.import_module(f"{__name__}.{module}")


def get_spec(name: str) -> ComponentSpec:
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ComponentError(f"unknown component {name!r}; known: {', '.join(component_names())}") from None


_KIND_ORDER = {"tower": 0, "text": 1, "adapter": 2, "llm": 3}


def all_specs() -> list[ComponentSpec]:
    """Every spec in pipeline order: the base, the experts by letter, other towers, text encoder, adapter, LLM."""
    _load_all()
    return sorted(_REGISTRY.values(), key=lambda s: (_KIND_ORDER[s.kind], s.expert is not None,
                                                      s.expert.letter if s.expert else "", s.name))


def component_names() -> list[str]:
    return [s.name for s in all_specs()]


def expert_specs() -> list[ComponentSpec]:
    """The experts in routing order (their letters sorted): index i = routing_weights[i] = expert_channels[i]."""
    return [s for s in all_specs() if s.expert is not None]


def expert_letters() -> tuple[str, ...]:
    return tuple(s.expert.letter for s in expert_specs())


def num_experts() -> int:
    return len(expert_specs())


def expert_index(name: str) -> int:
    names = [s.name for s in expert_specs()]
    if name not in names:
        raise ComponentError(f"component {name!r} is not an expert; experts: {', '.join(names)}")
    return names.index(name)


def arch(cfg: "MoVAConfig", name: str) -> dict[str, Any]:
    """The architecture of component `name` at the config's scale (ComponentSpec.arch)."""
    return get_spec(name).arch(cfg)


def check_config(cfg: "MoVAConfig", source: str = "config") -> None:
    """What a config must agree on with the registry: one expert_channels entry per registered expert, and a top-k
    within the expert count."""
    letters = expert_letters()
    if len(cfg.expert_channels) != len(letters):
        raise ConfigError(f"{source}: expert_channels has {len(cfg.expert_channels)} entries, the registry has "
                          f"{len(letters)} experts ({', '.join(letters)})")
    if not 0 <= cfg.topk_experts <= len(letters):
        raise ConfigError(f"{source}: topk_experts={cfg.topk_experts} must be within 0..{len(letters)}")


def specs_of_kind(kind: str) -> list[ComponentSpec]:
    return [s for s in all_specs() if s.kind == kind]


def one_of_kind(kind: str) -> ComponentSpec:
    found = specs_of_kind(kind)
    if len(found) != 1:
        raise ComponentError(f"the registry holds {len(found)} {kind} component(s) ({', '.join(s.name for s in found)}); "
                             "MoVA has exactly one")
    return found[0]


def owner_of(key: str) -> ComponentSpec | None:
    """The one component that owns a full checkpoint key (None if nobody does)."""
    owners = [s for s in all_specs() if s.owns(key)]
    if len(owners) > 1:
        raise ComponentError(f"checkpoint key {key} is claimed by {[s.name for s in owners]}; fix the registry")
    return owners[0] if owners else None


def routing_prompt_lines() -> list[tuple[str, str]]:
    """(letter, router text) of every expert in routing order: the model pool of MoVA's routing prompt."""
    return [(s.expert.letter, s.expert.router_text) for s in expert_specs()]


def image_input_table() -> dict[str, "ImageInput"]:
    """Every preprocessed input the registered towers consume, by kind; two towers declaring one kind differently
    is a registry error."""
    table: dict[str, ImageInput] = {}
    for spec in specs_of_kind("tower"):
        for row in spec.image_inputs:
            if table.setdefault(row.kind, row) != row:
                raise ComponentError(f"component {spec.name} declares image input {row.kind!r} differently from "
                                     "another tower; give it another kind name")
    return table


def facts_from_config(cfg: "MoVAConfig") -> ModelFacts:
    """The facts of a checkpoint: its config plus the registry's towers (build side)."""
    def tower(name: str) -> TowerFacts:
        spec = get_spec(name)
        return TowerFacts(name, spec.expert.letter if spec.expert else None, tuple(r.kind for r in spec.image_inputs))

    towers = specs_of_kind("tower")
    bases = [s for s in towers if s.expert is None]
    if len(bases) != 1:
        raise RuntimeInputError(f"the registry holds {len(bases)} non-expert towers; MoVA has one base encoder")
    one_of_kind("adapter")
    text = one_of_kind("text")
    longest = int(text.arch(cfg)["max_position_embeddings"])
    return ModelFacts(
        base=tower(bases[0].name), experts=tuple(tower(s.name) for s in towers if s.expert is not None),
        image_inputs=image_input_table(), image_feat_size=int(cfg.image_feat_size),
        image_aspect_ratio=str(cfg.image_aspect_ratio), pix2struct_max_patches=int(cfg.pix2struct_max_patches),
        topk_experts=int(cfg.topk_experts), num_routing_tokens=int(cfg.num_routing_tokens),
        mm_use_im_start_end=bool(cfg.mm_use_im_start_end), routing_prompt=routing_prompt(routing_prompt_lines()),
        text_buckets=tuple(b for b in TEXT_BUCKETS if b <= longest))

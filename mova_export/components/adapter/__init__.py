"""The MoV-Adapter (`mm_projector_type: mov_adapter`, upstream mova/model/multimodal_projector/builder.py): the
component that fuses the base features, the routed experts' features and the question's BERT feature into the LLM's
image tokens. It exports as three graphs: the routing pass (base only), the answer pass with K static expert slots,
and the dense seven-branch graph for the rare answer that names more than K experts. docs/adapter-forms.md has the
design (module tree, forms, numerics, why slots are gathered inside the adapter).

modules.py  the upstream module tree and its dense / reference forward passes
slots.py    SlotAdapter (top-K slots) and RoutingAdapter (no experts), wrapping a loaded MoVAdapter
forms.py    declared I/O, samples, the three GraphForms and their references
"""
from __future__ import annotations

from .. import ComponentSpec, MemoryFigures, register
from .forms import (
    ROUTING_FORM,
    _build,
    _forms,
    _inputs,
    _outputs,
    _sample,
    _slot_sample,
    routing_inputs,
    routing_spec,
    slot_form,
    slot_inputs,
    slot_spec,
)
from .modules import NAME, PRESETS, ROUTING_MASK_FILL, MoVAdapter, text_width
from .slots import RoutingAdapter, SlotAdapter, StackedLayerNorm

SPEC = register(ComponentSpec(
    name=NAME,
    kind="adapter",
    prefix="model.mm_projector.",
    memory=MemoryFigures(params=151_500_000, activation=(2304, 5632)),
    presets=PRESETS,
    build=_build,
    inputs=_inputs,
    outputs=_outputs,
    sample_inputs=_sample,
    exclude_prefixes=("text_encoder.",),
    forms=_forms,
    description="MoV-Adapter: 3 blocks of gated per-expert cross-attention (2-D RoPE) + self-attention + SwiGLU, "
                "RegStage / 2x2 avg-pool / RegStage, MLP to the LLM width; routing tokens = 2x2 mean (144)",
))

__all__ = ["NAME", "PRESETS", "ROUTING_FORM", "ROUTING_MASK_FILL", "SPEC", "MoVAdapter", "RoutingAdapter",
           "SlotAdapter", "StackedLayerNorm", "_build", "_inputs", "_outputs", "_sample", "_slot_sample", "routing_inputs",
           "routing_spec", "slot_form", "slot_inputs", "slot_spec", "text_width"]

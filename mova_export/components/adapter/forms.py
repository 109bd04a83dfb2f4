"""The adapter's declared I/O, seeded samples and the three graph forms it exports (routing, top-K slots, dense),
each with the reference that proves it: upstream's skipping B == 1 inference on the same inputs."""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ...core.slots import SLOT_INPUTS, fill_slots
from ...core.spec import GraphForm, TensorSpec
from .. import ComponentSpec, arch, expert_letters, get_spec, num_experts
from .modules import NAME, MoVAdapter, text_width
from .slots import RoutingAdapter, SlotAdapter


def _inputs(cfg) -> tuple[TensorSpec, ...]:
    n = cfg.grid_tokens
    return (TensorSpec("base", (1, n, int(cfg.mm_hidden_size))),
            *(TensorSpec(f"expert_{letter}", (1, n, int(c))) for letter, c in zip(expert_letters(), cfg.expert_channels)),
            TensorSpec("text_features", (1, text_width(cfg))),
            TensorSpec("routing_mask", (1, num_experts())))


def _outputs(cfg) -> tuple[TensorSpec, ...]:
    h = cfg.llm_hidden_size
    return (TensorSpec("image_tokens", (1, cfg.adapter_grid ** 2, h)),
            TensorSpec("routing_tokens", (1, cfg.num_routing_tokens, h)))


def _sample(cfg, seed: int) -> dict[str, torch.Tensor]:
    """Features ~ N(0, 1) for the base, every expert (unrouted ones too) and the text, with experts A, B, C routed."""
    gen = torch.Generator().manual_seed(seed)
    feed = {t.name: torch.randn(t.shape, generator=gen) for t in _inputs(cfg)[:-1]}
    mask = torch.zeros(1, num_experts())
    mask[0, :3] = 1.0
    feed["routing_mask"] = mask
    return feed


def _wide_sample(cfg, seed: int) -> dict[str, torch.Tensor]:
    """_sample's features with topk + 1 experts routed (the masks the dense fallback graph serves)."""
    feed = _sample(cfg, seed)
    feed["routing_mask"][0, :min(int(cfg.topk_experts) + 1, num_experts())] = 1.0
    return feed


def _build(cfg) -> nn.Module:
    return MoVAdapter(cfg, arch(cfg, NAME)).eval()


def _reference(module: "MoVAdapter", base: Any, experts: Sequence[Any], text: Any, mask: Any) -> dict[str, Any]:
    """Upstream's skipping B == 1 inference (forward_reference) on numpy inputs; unrouted experts None."""
    def tensor(a: Any) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a))

    with torch.inference_mode():
        image, routing = module.forward_reference(tensor(base), [None if e is None else tensor(e) for e in experts],
                                                  tensor(text), tensor(mask))
    return {"image_tokens": image.float().numpy(), "routing_tokens": routing.float().numpy()}


def _dense_reference(module: "MoVAdapter", feed: Mapping[str, Any]) -> dict[str, Any]:
    mask = np.asarray(feed["routing_mask"], np.float32)
    experts = [feed[f"expert_{letter}"] if on else None for letter, on in zip(expert_letters(), mask[0])]
    return _reference(module, feed["base"], experts, feed["text_features"], mask)


def _slot_reference(module: "MoVAdapter", feed: Mapping[str, Any]) -> dict[str, Any]:
    """The slots hold the routed experts' features (channels past C_j are padding): back to one per expert."""
    channels = [int(n.normalized_shape[0]) for n in module.blocks[0].norm2]
    experts: list[Any] = [None] * len(channels)
    for k, (j, valid) in enumerate(zip(feed["slot_expert"], feed["slot_valid"])):
        if valid:
            experts[int(j)] = feed["slot_features"][k][None, :, :channels[int(j)]]
    return _reference(module, feed["base"], experts, feed["text_features"], feed["routing_mask"])


def _routing_reference(module: "MoVAdapter", feed: Mapping[str, Any]) -> dict[str, Any]:
    """No expert routed: the text feature has no effect (no gate runs), zeros stand in for it."""
    count = len(module.blocks[0].norm2)
    return _reference(module, feed["base"], [None] * count, np.zeros((1, module.blocks[0].gate[0].in_features
                                                                       - module.dim), np.float32),
                      np.zeros((1, count), np.float32))


def _forms(cfg) -> tuple[GraphForm, ...]:
    """The three graphs the adapter ships: the routing pass (no expert input at all), the answer pass with
    topk_experts static slots, and the dense seven-branch graph for the rare mask with more than topk experts
    (each block's gate keeps its own top-k of them; the dense graph is exact for any mask, and cheaper than a slot
    per expert: every slot pays its K/V projections at the widest expert's width)."""
    k = min(int(cfg.topk_experts), num_experts())
    outputs = _outputs(cfg)
    return (GraphForm(ROUTING_FORM, "adapter_routing", routing_inputs(cfg), outputs, wrap=RoutingAdapter,
                      reference=_routing_reference, sample_inputs=lambda c, seed: {"base": _sample(c, seed)["base"]}),
            GraphForm(slot_form(k), "adapter_answer", slot_inputs(cfg, k), outputs,
                      wrap=lambda module: SlotAdapter(module, k), reference=_slot_reference, form="slots",
                      sample_inputs=lambda c, seed: _slot_sample(c, seed, k)),
            GraphForm(NAME, "adapter_fallback", _inputs(cfg), outputs, reference=_dense_reference, form="dense",
                      sample_inputs=_wide_sample))


# ---- the routing and slot forms: graph declarations beside the dense one (not registered: the checkpoint keys
# belong to `adapter`). routing_spec / slot_spec give a form as a spec of its own, for exporting it alone
# (onnx_from_component(slot_spec(3), SlotAdapter(loaded_adapter, 3), cfg, path)): the benchmark and the tests do.
ROUTING_FORM = f"{NAME}_routing"


def slot_form(num_slots: int) -> str:
    return f"{NAME}_slots{num_slots}"


def routing_inputs(cfg) -> tuple[TensorSpec, ...]:
    return _inputs(cfg)[:1]


def slot_inputs(cfg, num_slots: int) -> tuple[TensorSpec, ...]:
    """base, slot_features [K, N, Cmax], slot_expert [K] int64, slot_valid [K], text_features, routing_mask."""
    base, text, mask = _inputs(cfg)[0], *_inputs(cfg)[-2:]
    features, expert, valid = SLOT_INPUTS[:3]
    return (base, TensorSpec(features, (num_slots, cfg.grid_tokens, max(int(c) for c in cfg.expert_channels))),
            TensorSpec(expert, (num_slots,), "int64"), TensorSpec(valid, (num_slots,)), text, mask)


def _slot_sample(cfg, seed: int, num_slots: int) -> dict[str, torch.Tensor]:
    """_sample's features, routing a mask this form is chosen for: the first K experts, topk + 1 for K > topk."""
    feed = _sample(cfg, seed)
    count = num_experts()
    topk = min(int(cfg.topk_experts), count)
    mask = [float(j < (num_slots if num_slots <= topk else topk + 1)) for j in range(count)]
    experts = {j: feed[f"expert_{letter}"].numpy() for j, letter in enumerate(expert_letters())}
    slots = fill_slots(mask, experts, num_slots, cfg.expert_channels, cfg.grid_tokens)
    return {"base": feed["base"], "text_features": feed["text_features"],
            **{name: torch.from_numpy(value) for name, value in slots.items()}}


def routing_spec() -> ComponentSpec:
    return replace(get_spec(NAME), name=ROUTING_FORM, build=lambda cfg: RoutingAdapter(_build(cfg)).eval(),
                   inputs=routing_inputs, sample_inputs=lambda cfg, seed: {"base": _sample(cfg, seed)["base"]},
                   description="MoV-Adapter routing pass: no expert routed, no cross-attention, no gate, no text")


def slot_spec(num_slots: int) -> ComponentSpec:
    return replace(get_spec(NAME), name=slot_form(num_slots),
                   build=lambda cfg: SlotAdapter(_build(cfg), num_slots).eval(),
                   inputs=lambda cfg: slot_inputs(cfg, num_slots),
                   sample_inputs=lambda cfg, seed: _slot_sample(cfg, seed, num_slots),
                   description=f"MoV-Adapter answer pass with {num_slots} static expert slots per block")

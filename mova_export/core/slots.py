"""The slot contract of the adapter's answer-pass graphs, runtime side (numpy only: the runtime has no torch).

The adapter ships in three static forms (see components/adapter.py for the graphs and why):
* the routing form `adapter_routing`: (base) -> image_tokens, routing_tokens; used when no expert is routed
  (the routing pass, and the answer pass of a "none" answer, which it equals);
* the slot form `adapter_slots{K}`, K = topk_experts (3), for 1..K routed experts (more: the dense `adapter`):
  (base, slot_features, slot_expert, slot_valid, text_features, routing_mask) -> image_tokens, routing_tokens.

`num_slots_for(mask, topk)` picks the form; `fill_slots(...)` builds the four mask-derived inputs:
* slot_features [K, N, Cmax] float32, Cmax = max(expert_channels): the routed experts' aligned features
  ([1, N, C_j] as the expert graphs return them), in ascending expert index (A..G), one per slot, channels
  C_j..Cmax zero; slots past the routed experts all zero.
* slot_expert [K] int64: the expert index (0..6 = A..G) each slot holds; 0 in unused slots.
* slot_valid [K] float32: 1 for a routed expert's slot, 0 for an unused one.
* routing_mask [1, 7] float32: the LLM's multi-hot, unchanged (the gate's softmax runs over all seven logits).
The graph multiplies an unused slot's cross-attention by slot_valid = 0, so its contents cannot change the output
as long as they are finite, and its norm2 ignores a real slot's padded channels; zeros are the contract all the
same. The whole feed is {"base": ..., "text_features": ..., **fill_slots(...)} (batch 1). This module needs only
numpy and the error classes, not the component registry: the expert count is len(expert_channels).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from .errors import RuntimeInputError

SLOT_INPUTS = ("slot_features", "slot_expert", "slot_valid", "routing_mask")


def _letter(j: int) -> str:
    return chr(ord("A") + j)  # MoVA's routing letters run A, B, ... in expert index order


def routed_experts(mask: Sequence[float] | np.ndarray, num_experts: int) -> list[int]:
    """Indices (ascending) of the experts a multi-hot mask [E] or [1, E] routes."""
    flat = np.asarray(mask, dtype=np.float64).reshape(-1)
    if flat.size != num_experts or not np.isin(flat, (0.0, 1.0)).all():
        raise RuntimeInputError(f"routing mask {np.asarray(mask).tolist()} is not a multi-hot of {num_experts} "
                                "zeros and ones; pass the parsed routing answer (e.g. [1, 0, 1, 0, 0, 0, 0])")
    return [int(j) for j in np.flatnonzero(flat)]


def num_slots_for(mask: Sequence[float] | np.ndarray, topk: int) -> int:
    """Which adapter form serves a mask: 0 = the routing form, topk = the usual slot graph, all experts (7) = more
    than topk routed (each block's gate keeps its own top-k of them, so every routed expert needs a branch: a bundle
    serves that mask with its dense `adapter` graph, cheaper than seven slots)."""
    size = np.asarray(mask).size
    count = len(routed_experts(mask, size))
    if count == 0:
        return 0
    return topk if count <= topk else size


def fill_slots(mask: Sequence[float] | np.ndarray, features_by_index: Mapping[int, np.ndarray], num_slots: int,
               expert_channels: Sequence[int], tokens: int) -> dict[str, np.ndarray]:
    """The slot graph's mask-derived inputs (SLOT_INPUTS) from a routing mask and the routed experts' features.

    features_by_index maps an expert index to its aligned features [1, tokens, C_j] or [tokens, C_j] (entries of
    unrouted experts are ignored); expert_channels are the C_j (config.expert_channels), their max is Cmax.
    """
    num_experts = len(expert_channels)
    routed = routed_experts(mask, num_experts)
    if len(routed) > num_slots:
        raise RuntimeInputError(f"{len(routed)} experts routed but the slot graph has {num_slots} slots; use the "
                                f"{num_experts}-slot graph for this mask (num_slots_for picks it)")
    cmax = max(int(c) for c in expert_channels)
    features = np.zeros((num_slots, tokens, cmax), dtype=np.float32)
    slot_expert = np.zeros(num_slots, dtype=np.int64)
    slot_valid = np.zeros(num_slots, dtype=np.float32)
    for slot, j in enumerate(routed):
        if j not in features_by_index:
            raise RuntimeInputError(f"expert {_letter(j)} is routed but has no features; run expert {_letter(j)} "
                                    "before the answer pass")
        value = np.asarray(features_by_index[j])
        want = (tokens, int(expert_channels[j]))
        if value.shape[-2:] != want or value.ndim not in (2, 3) or value.size != want[0] * want[1]:
            raise RuntimeInputError(f"expert {_letter(j)} features have shape {list(value.shape)}, the slot "
                                    f"needs [1, {want[0]}, {want[1]}]; pass that expert's own aligned output")
        features[slot, :, :want[1]] = value.reshape(want)
        slot_expert[slot], slot_valid[slot] = j, 1.0
    routing_mask = np.asarray(mask, dtype=np.float32).reshape(1, num_experts)
    return dict(zip(SLOT_INPUTS, (features, slot_expert, slot_valid, routing_mask)))

"""The adapter's answer pass with K static expert slots (`SlotAdapter`) and its routing pass without experts
(`RoutingAdapter`): both wrap a loaded MoVAdapter and reuse its modules; the slot form stacks the seven experts'
cross-attention weights and gathers them per slot (core/slots.py is the runtime side of the contract)."""
from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...core.errors import ComponentError
from .modules import NAME, AdapterBlock, ExpertTerm, MoVAdapter, attend


class StackedLayerNorm(nn.Module):
    """The 7 experts' LayerNorms stacked ([7, width] weight/bias, zero past C_j), gathered per slot. An expert
    narrower than `width` is normalised over its first C_j channels only (masked mean and variance): the padded
    channels contribute nothing and come out zero."""

    def __init__(self, norms: Sequence[nn.LayerNorm], width: int):
        super().__init__()
        channels = [int(n.normalized_shape[0]) for n in norms]
        self.width, self.eps = width, float(norms[0].eps)
        self.padded = any(c != width for c in channels)
        weight, bias = torch.zeros(len(norms), width), torch.zeros(len(norms), width)
        for j, (norm, c) in enumerate(zip(norms, channels)):
            weight[j, :c], bias[j, :c] = norm.weight.detach(), norm.bias.detach()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        if self.padded:
            self.register_buffer("channel_mask", (torch.arange(width)[None] < torch.tensor(channels)[:, None]).float())
            self.register_buffer("channels", torch.tensor(channels, dtype=torch.float32)[:, None, None])

    def forward(self, x: torch.Tensor, slot_expert: torch.Tensor) -> torch.Tensor:
        """x [1 or K, N, width] -> [K, N, width], slot k normalised by expert slot_expert[k]'s LayerNorm."""
        weight = self.weight.index_select(0, slot_expert)[:, None]
        bias = self.bias.index_select(0, slot_expert)[:, None]
        if not self.padded:                                # one LayerNormalization, the affine part per slot
            return F.layer_norm(x, (self.width,), eps=self.eps) * weight + bias
        mask = self.channel_mask.index_select(0, slot_expert)[:, None]
        count = self.channels.index_select(0, slot_expert)
        mean = (x * mask).sum(-1, keepdim=True) / count
        centred = (x - mean) * mask
        var = (centred * centred).sum(-1, keepdim=True) / count
        return centred * torch.rsqrt(var + self.eps) * weight + bias


class StackedLinear(nn.Module):
    """The 7 experts' Linear layers stacked as [7, width, out] (transposed, input rows zero past C_j), gathered per
    slot: x [1 or K, N, width] -> [K, N, out]."""

    def __init__(self, linears: Sequence[nn.Linear], width: int):
        super().__init__()
        weight = torch.zeros(len(linears), width, linears[0].out_features)
        for j, lin in enumerate(linears):
            weight[j, :lin.in_features] = lin.weight.detach().t()
        self.register_buffer("weight", weight)
        has_bias = linears[0].bias is not None
        self.register_buffer("bias", torch.stack([lin.bias.detach() for lin in linears]) if has_bias else None)

    def forward(self, x: torch.Tensor, slot_expert: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight.index_select(0, slot_expert)
        return y if self.bias is None else y + self.bias.index_select(0, slot_expert)[:, None]


class SlotCrossAttention(nn.Module):
    """One block's 7 expert cross-attentions (with norm1[j] on the queries, norm2[j] on the keys/values) as stacked
    constants; the K slots run as a batch of K attentions with their experts' weights and RoPE tables."""

    def __init__(self, block: AdapterBlock, width: int):
        super().__init__()
        attns, dim = block.cross_attn, block.norm1[0].normalized_shape[0]
        self.num_heads, self.scale = attns[0].num_heads, attns[0].scale
        self.norm1 = StackedLayerNorm(block.norm1, dim)
        self.norm2 = StackedLayerNorm(block.norm2, width)
        self.q_proj = StackedLinear([a.q_proj for a in attns], dim)
        self.k_proj = StackedLinear([a.k_proj for a in attns], width)
        self.v_proj = StackedLinear([a.v_proj for a in attns], width)
        self.inner_attn_ln = StackedLayerNorm([a.inner_attn_ln for a in attns], dim)
        self.proj = StackedLinear([a.proj for a in attns], dim)
        self.register_buffer("rope_cos", torch.stack([a.rope.freqs_cos.detach() for a in attns]))
        self.register_buffer("rope_sin", torch.stack([a.rope.freqs_sin.detach() for a in attns]))

    def forward(self, x: torch.Tensor, w: torch.Tensor, slot_features: torch.Tensor, slot_expert: torch.Tensor,
                slot_valid: torch.Tensor) -> torch.Tensor:
        """x [1, N, C], gate w [1, 7] -> sum_k w[slot_expert[k]] * slot_valid[k] * Y_k, [1, N, C]."""
        slot_weight = w[0].index_select(0, slot_expert) * slot_valid.to(w.dtype)
        q = self.q_proj(self.norm1(x, slot_expert), slot_expert)
        value = self.norm2(slot_features, slot_expert)
        k, v = self.k_proj(value, slot_expert), self.v_proj(value, slot_expert)
        cos = self.rope_cos.index_select(0, slot_expert)[:, None]
        sin = self.rope_sin.index_select(0, slot_expert)[:, None]
        y = attend(q, k, v, cos, sin, self.num_heads, self.scale)
        y = self.proj(self.inner_attn_ln(y, slot_expert), slot_expert)
        return (y * slot_weight[:, None, None]).sum(dim=0, keepdim=True)


class SlotAdapter(nn.Module):
    """The answer-pass form: (base, slot_features, slot_expert, slot_valid, text_features, routing_mask) ->
    (image_tokens, routing_tokens) with `num_slots` cross-attentions per block instead of seven.

    Wraps a loaded MoVAdapter: the gate, self-attention, SwiGLU, downsample and MLP are its own modules; the
    cross-attention weights are stacked at construction (a snapshot: build it after loading the checkpoint).
    Batch 1, as the slot contract (mova_export/slots.py)."""

    def __init__(self, adapter: MoVAdapter, num_slots: int):
        super().__init__()
        count = len(adapter.blocks[0].norm2)
        if not 1 <= num_slots <= count:
            raise ComponentError(f"component {NAME}: num_slots={num_slots}; a slot graph has 1 to {count} slots "
                                 "(topk_experts for the answer pass)")
        self.adapter, self.num_slots = adapter, num_slots
        self.cmax = max(int(n.normalized_shape[0]) for n in adapter.blocks[0].norm2)
        self.cross_attn = nn.ModuleList(SlotCrossAttention(blk, self.cmax) for blk in adapter.blocks)

    def forward(self, base: torch.Tensor, slot_features: torch.Tensor, slot_expert: torch.Tensor,
                slot_valid: torch.Tensor, text_features: torch.Tensor,
                routing_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.adapter.run(base, text_features, routing_mask,
                                self._terms(slot_features, slot_expert, slot_valid))

    def gate_weights(self, base: torch.Tensor, slot_features: torch.Tensor, slot_expert: torch.Tensor,
                     slot_valid: torch.Tensor, text_features: torch.Tensor,
                     routing_mask: torch.Tensor) -> torch.Tensor:
        """Per-block gate weights [num_blocks, 1, 7] of this form's forward."""
        record: list[torch.Tensor] = []
        self.adapter.run(base, text_features, routing_mask, self._terms(slot_features, slot_expert, slot_valid),
                         record)
        return torch.stack(record)

    def _terms(self, slot_features: torch.Tensor, slot_expert: torch.Tensor,
               slot_valid: torch.Tensor) -> list[ExpertTerm]:
        return [partial(attn, slot_features=slot_features, slot_expert=slot_expert, slot_valid=slot_valid)
                for attn in self.cross_attn]


class RoutingAdapter(nn.Module):
    """The routing-pass form: (base) -> (image_tokens, routing_tokens) with no expert routed. binary = 0 removes the
    cross-attention term exactly, so no expert branch, no gate and hence no text feature is left: BERT is not needed
    before routing. Equal to forward_reference(base, [None] * 7, any text, zeros), and to the answer pass of an
    empty mask."""

    def __init__(self, adapter: MoVAdapter):
        super().__init__()
        self.adapter = adapter

    def forward(self, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.adapter.run(base, None, None, None)

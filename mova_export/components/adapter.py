"""The MoV-Adapter (`mm_projector_type: mov_adapter`), upstream `mova/model/multimodal_projector/builder.py`.

Module tree and state-dict keys are upstream's `MoVAdapter` minus its BERT (`text_encoder.*`, its own component):
  pos_embed [1, grid^2, C]
  blocks.{b}: gate.{0,2} (Linear(Ct + C -> C), GELU, Linear(C -> 7)), cross_attn.{0..6}, norm1.{j} (LayerNorm C),
              norm2.{j} (LayerNorm C_j), self_attn, norm3, norm4, mlp.{w1,w2,ffn_ln,w3} (SwiGLU with sub-LN)
  Attention: q_proj (C -> C), k_proj / v_proj (C_j -> C), all without bias; rope.freqs_{cos,sin}; inner_attn_ln; proj
  downsample.{0,2}.b1: timm 0.9 RegStage(depth 1, linear_out) Bottleneck: conv1 1x1, conv2 3x3 depthwise, conv3 1x1
              as ConvNormAct `.conv` (no bias) + `.bn` (timm LayerNormAct2d, eps 1e-5, SiLU except after conv3),
              se.fc1 / se.fc2 (SEModule, rd = round(0.25 * C_in), SiLU, sigmoid gate), identity shortcut, no final act;
              downsample.1 = AdaptiveAvgPool2d(grid / 2), written as an exact 2x2 average pool
  mlp.{0,2}: Linear(C -> H) -> GELU -> Linear(H -> H)

Forward (MoVAdapter.forward / AdapterBlock.forward):
  residual = base; x = base + pos_embed; weight_mask = (1 - r) * -1e6 (fp32); binary = 1 if mean(r) > 0 else 0
  per block: w = renorm(top-k(softmax(gate(cat(text, mean_tokens(x))).float() + weight_mask)))
             x = x + binary * sum_j w_j * cross_attn[j](norm1[j](x), norm2[j](value_j))   (stack + sum, as upstream)
             x = x + self_attn(norm3(x), norm3(x)); x = x + mlp(norm4(x))
  x = (x + residual) / 2 -> [1, C, grid, grid] -> downsample -> [1, (grid/2)^2, C] -> mlp -> image_tokens
  routing_tokens = the 2x2 mean of image_tokens on the (grid/2)^2 grid (arch.py's adaptive pool to 12x12).

Four forms share every submodule (`MoVAdapter.run`: the blocks' gate, self-attention and SwiGLU, the downsample,
the MLP and the routing pool; only the per-block expert term differs):
* `forward` is the static, dense graph: all 7 cross-attentions run and the gate weights (exactly 0 for unrouted
  experts: their -1e6 logits underflow in the fp32 softmax) select them; top-k has a static k; `binary` is a tensor
  op on the mask. No data-dependent control flow. It is the benchmark baseline.
* `forward_reference` is upstream's B == 1 inference: an unrouted expert's cross-attention is skipped and a zero
  tensor stacked in its place, so its input may be None. The ground truth for every form.
* `RoutingAdapter(adapter)`, graph `adapter_routing`, (base) -> (image_tokens, routing_tokens): no expert routed.
  binary = 0 multiplies the cross-attention term away exactly, so the form has no expert branch, no gate and no
  text input (the text only reaches the output through the gate: BERT is off the path to the routing answer). It
  equals the reference with the empty mask, which is also the answer pass of a "none" answer.
* `SlotAdapter(adapter, K)`, graphs `adapter_slots3` / `adapter_slots7`, (base, slot_features [K, N, Cmax],
  slot_expert [K] int64, slot_valid [K], text_features, routing_mask) -> (image_tokens, routing_tokens): the answer
  pass with K static slots. Per block the gate w [1, 7] is computed exactly as in the dense form (softmax over all
  seven masked logits, static top-k, renormalised); slot k gets weight w[slot_expert[k]] * slot_valid[k]; the 7
  cross-attentions' weights (norm1, q_proj, inner_attn_ln, proj with bias; norm2, k_proj, v_proj) and RoPE tables
  are stacked over the experts as constants (`SlotCrossAttention`), gathered by slot_expert and run as one
  attention batched over the K slots; x += binary * sum_k weight_k * Y_k, then self-attention and SwiGLU as ever.
  K = topk_experts (3) serves every mask the prompt and parser produce; K = 7 serves a mask with more than three
  experts ("A B C D" parses to four), where each block's own gate keeps its own top-3, so every routed expert needs
  a slot. The runtime side of the contract (which graph, how to fill the slots) is mova_export/slots.py
  (numpy only): routed experts in ascending index, one per slot, channels zero-padded to Cmax = max(C_j); unused
  slots zero with slot_expert 0 and slot_valid 0. Their contents cannot change the output (weight 0, any finite
  values); norm2 is a LayerNorm over C_j written with a masked mean and variance and gamma/beta zero past C_j, so
  padded channels contribute nothing either. Both outputs are kept in every form: the 2x2 pool costs nothing and
  all forms then declare the dense adapter's outputs.
  Why slots gathered inside the adapter (design b) rather than other cuts: graph boundaries stay where components
  own their weights. The expert graphs stay pure towers, each with its own precision and engine, emitting [1, N,
  C_j] as before; the adapter graph owns all of its weights (stacked) and just receives up to K feature tensors.
  Static shapes, Gather on constants, no If/Loop/NonZero, so ONNX Runtime and TensorRT take it as it is. The price
  of padding is confined to the K/V projections of narrow experts (a 256-channel expert pays Cmax / C_j = 6x for
  its k_proj/v_proj; norm2 and the slot_features feed scale with Cmax too, both negligible), plus the stacked K/V
  weights: 7 x Cmax instead of sum(C_j) rows per block (benchmarks/adapter_slots.py measures all forms). The slot
  projections multiply by Gather outputs, not initializers: onnxruntime's quantize_static leaves such MatMuls fp32.

Numerics choices: every LayerNorm is nn.LayerNorm's default eps 1e-5 (upstream passes no eps: arch `norm_eps`); the
downsample norms are timm's LayerNormAct2d (eps 1e-5, arch `downsample_eps`), not builder.py's unused
LayerNorm2d(eps=1e-6). RoPE is VisionRotaryEmbeddingFast with pt_seq_len = ft_seq_len = image_feat_size; upstream
hard-codes its dim to 32 (= head_dim / 2 for the real 16 x 64 heads), this module uses head_dim / 2 so the toy widths
work too. The tables are persistent buffers upstream, one pair per Attention (`...rope.freqs_cos`); arch
`rope_in_checkpoint: false` makes them non-persistent for a checkpoint that turns out not to carry them. Upstream's
zero initialisations (every attention's proj, mlp.w3, the last gate layer, conv3's norm weight) are reproduced; they
only matter for training, a checkpoint overwrites them. The gate's text width is hard-coded 1024 (BERT-large)
upstream; here it is the text_encoder component's hidden_size (arch `text_width` when that component is absent).
All of the above was checked against upstream builder.py as published (TempleX98/MoVA, file at commit 9c33cb4).
"""
from __future__ import annotations

from dataclasses import replace
from functools import partial
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ComponentError
from ..core.slots import SLOT_INPUTS, fill_slots
from ..core.spec import GraphForm
from . import ComponentSpec, MemoryFigures, TensorSpec, arch, component_names, expert_letters, num_experts, register
from .codetr import Rope, SwiGLU, rotate_half

NAME = "adapter"
ROUTING_MASK_FILL = -1e6  # builder.py: (1 - r) * -1e6 added to the fp32 gate logits

_COMMON = dict(norm_eps=1e-5, downsample_eps=1e-5, mlp_ratio=8 / 3, rope_theta=10000.0, rope_in_checkpoint=True,
               se_ratio=0.25, bottle_ratio=1.0, group_size=1, linear_out=True)
PRESETS: dict[str, dict[str, Any]] = {
    # text_width is only used when no text_encoder component is registered (then its hidden_size is the width)
    "full": {**_COMMON, "num_heads": 16, "text_width": 1024},
    "tiny": {**_COMMON, "num_heads": 2, "text_width": 32},  # 2 heads: half the 2304x2304 attention maps
}


def text_width(cfg) -> int:
    """Width of the BERT [CLS] feature the gate reads: the text_encoder component's hidden size when it exists."""
    if "text_encoder" in component_names():
        return int(arch(cfg, "text_encoder")["hidden_size"])
    return int(arch(cfg, NAME)["text_width"])


# ---- attention and block ---------------------------------------------------------------------------------------
def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int,
           scale: float) -> torch.Tensor:
    """q, k, v [B, N, C] -> softmax((rope(q) * scale) rope(k)^T) v with heads merged, [B, N, C]. The RoPE tables
    broadcast against [B, heads, N, head_dim]: [N, head_dim] for one attention, [K, 1, N, head_dim] for K slots."""
    n, c = q.shape[-2:]
    d = c // heads

    def split(t: torch.Tensor) -> torch.Tensor:                       # [B, n, c] -> [B, heads, n, d]
        return t.reshape(-1, n, heads, d).transpose(1, 2)

    def rope(t: torch.Tensor) -> torch.Tensor:
        return t * cos + rotate_half(t, n, d).reshape(t.shape) * sin

    q, k, v = rope(split(q)), rope(split(k)), split(v)
    attn = ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    return (attn @ v).transpose(1, 2).reshape(-1, n, c)


class Attention(nn.Module):
    """builder.py `Attention` (subln, no qkv bias): 2-D RoPE on q and k, softmax((q * d^-0.5) k^T) v, sub-LN, proj."""

    def __init__(self, dim: int, value_dim: int, num_heads: int, grid: int, theta: float, eps: float,
                 persistent: bool):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim ** -0.5
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(value_dim, dim, bias=False)
        self.v_proj = nn.Linear(value_dim, dim, bias=False)
        self.inner_attn_ln = nn.LayerNorm(dim, eps=eps)
        self.proj = nn.Linear(dim, dim)
        self.rope = Rope(head_dim, grid, grid, theta, persistent)   # VisionRotaryEmbeddingFast(pt = ft = grid)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """x [B, N, C] queries, value [B, N, C_j] keys/values (both on the grid) -> [B, N, C]."""
        x = attend(self.q_proj(x), self.k_proj(value), self.v_proj(value), self.rope.freqs_cos, self.rope.freqs_sin,
                   self.num_heads, self.scale)
        return self.proj(self.inner_attn_ln(x))


ExpertTerm = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]   # (x [1, N, C], gate w [1, 7]) -> [1, N, C]


class AdapterBlock(nn.Module):
    def __init__(self, dim: int, expert_channels: Sequence[int], text_dim: int, topk: int, grid: int,
                 arch: Mapping[str, Any]):
        super().__init__()
        self.topk = topk
        heads, eps = int(arch["num_heads"]), float(arch["norm_eps"])
        theta, persistent = float(arch["rope_theta"]), bool(arch["rope_in_checkpoint"])

        def attention(value_dim: int) -> Attention:
            return Attention(dim, value_dim, heads, grid, theta, eps, persistent)

        self.cross_attn = nn.ModuleList(attention(c) for c in expert_channels)
        self.norm1 = nn.ModuleList(nn.LayerNorm(dim, eps=eps) for _ in expert_channels)
        self.norm2 = nn.ModuleList(nn.LayerNorm(c, eps=eps) for c in expert_channels)
        self.mlp = SwiGLU(dim, int(dim * float(arch["mlp_ratio"])), eps)
        self.self_attn = attention(dim)
        self.norm3 = nn.LayerNorm(dim, eps=eps)
        self.norm4 = nn.LayerNorm(dim, eps=eps)
        self.gate = nn.Sequential(nn.Linear(text_dim + dim, dim), nn.GELU(), nn.Linear(dim, len(expert_channels)))
        for p in (self.mlp.w3.weight, self.mlp.w3.bias, self.gate[-1].weight, self.gate[-1].bias):
            nn.init.zeros_(p)

    def gate_weights(self, x: torch.Tensor, text: torch.Tensor, weight_mask: torch.Tensor) -> torch.Tensor:
        """[B, 7]: fp32 softmax over the LLM-routed experts, top-k kept (static k) and renormalised."""
        logits = self.gate(torch.cat([text.to(x.dtype), x.mean(1)], dim=-1))
        w = torch.softmax(logits.float() + weight_mask, dim=-1)
        top = torch.topk(w, self.topk, dim=-1).indices
        w = w * torch.zeros_like(w).scatter(-1, top, 1.0)               # one_hot(top).sum(1)
        return (w / w.sum(-1, keepdim=True)).to(x.dtype)

    def dense_experts(self, x: torch.Tensor, w: torch.Tensor,
                      values: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """sum_j w_j * cross_attn[j](norm1[j](x), norm2[j](value_j)); values[j] None = expert j skipped (upstream's
        B == 1 inference): a zero tensor takes its place (stack + sum, as upstream)."""
        ys = [torch.zeros_like(x) if value is None else attn(norm1(x), norm2(value))
              for value, attn, norm1, norm2 in zip(values, self.cross_attn, self.norm1, self.norm2)]
        return (torch.stack(ys, dim=1) * w[:, :, None, None]).sum(dim=1)

    def transformer(self, x: torch.Tensor) -> torch.Tensor:
        """The block's pre-norm self-attention and SwiGLU."""
        h = self.norm3(x)
        x = x + self.self_attn(h, h)
        return x + self.mlp(self.norm4(x))

    def forward(self, x: torch.Tensor, text: torch.Tensor, weight_mask: torch.Tensor, binary: torch.Tensor,
                expert_term: ExpertTerm, record: list | None = None) -> torch.Tensor:
        """expert_term computes the gated sum of the experts' cross-attentions (the dense or the slot form)."""
        w = self.gate_weights(x, text, weight_mask)
        if record is not None:
            record.append(w)
        x = x + expert_term(x, w) * binary[:, None, None]
        return self.transformer(x)


# ---- downsample: timm 0.9 RegStage(depth=1) with LayerNormAct2d ------------------------------------------------
class LayerNormAct2d(nn.LayerNorm):
    """timm LayerNormAct2d: LayerNorm over the channels of [B, C, H, W], then SiLU (apply_act) or nothing."""

    def __init__(self, channels: int, eps: float, apply_act: bool):
        super().__init__(channels, eps=eps)
        self.apply_act = apply_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        x = x.permute(0, 3, 1, 2)
        return F.silu(x) if self.apply_act else x


class ConvNormAct(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, eps: float, apply_act: bool = True, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, groups=groups, bias=False)
        self.bn = LayerNormAct2d(cout, eps, apply_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class SEModule(nn.Module):
    def __init__(self, channels: int, rd_channels: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, rd_channels, 1)
        self.fc2 = nn.Conv2d(rd_channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.fc2(F.silu(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * s.sigmoid()


class Bottleneck(nn.Module):
    """timm regnet Bottleneck, stride 1, in == out channels (identity shortcut)."""

    def __init__(self, channels: int, arch: Mapping[str, Any]):
        super().__init__()
        eps = float(arch["downsample_eps"])
        mid = int(round(channels * float(arch["bottle_ratio"])))
        self.conv1 = ConvNormAct(channels, mid, 1, eps)
        self.conv2 = ConvNormAct(mid, mid, 3, eps, groups=mid // int(arch["group_size"]))
        self.se = SEModule(mid, int(round(channels * float(arch["se_ratio"]))))
        self.conv3 = ConvNormAct(mid, channels, 1, eps, apply_act=False)
        self.linear_out = bool(arch["linear_out"])
        nn.init.zeros_(self.conv3.bn.weight)                            # upstream s{1,2}.b1.zero_init_last()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv3(self.se(self.conv2(self.conv1(x)))) + x
        return y if self.linear_out else F.silu(y)


class RegStage(nn.Module):
    def __init__(self, channels: int, arch: Mapping[str, Any]):
        super().__init__()
        self.b1 = Bottleneck(channels, arch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b1(x)


# ---- the adapter -----------------------------------------------------------------------------------------------
class MoVAdapter(nn.Module):
    """(base, expert_A..G, text_features, routing_mask) -> (image_tokens [1, (g/2)^2, H], routing_tokens [1, r^2, H]).
    """

    def __init__(self, cfg, arch: Mapping[str, Any]):
        super().__init__()
        dim, grid = int(cfg.mm_hidden_size), int(cfg.image_feat_size)
        heads = int(arch["num_heads"])
        if dim % heads or (dim // heads) % 4:
            raise ComponentError(f"component {NAME}: mm_hidden_size {dim} / num_heads {heads} must give a head dim "
                                 "that is a multiple of 4 (2-D RoPE pairs); change the adapter's num_heads")
        self.topk = min(int(cfg.topk_experts), num_experts())
        if self.topk < 1:
            raise ComponentError(f"component {NAME}: topk_experts={cfg.topk_experts}; the gate keeps the top-k "
                                 "experts and needs k >= 1 (MoVA uses 3)")
        self.grid, self.dim, self.out_grid = grid, dim, int(cfg.adapter_grid)
        self.routing_grid = int(cfg.routing_grid)
        if self.out_grid % self.routing_grid:
            raise ComponentError(f"component {NAME}: num_routing_tokens={cfg.num_routing_tokens} is a "
                                 f"{self.routing_grid}x{self.routing_grid} grid that does not divide the "
                                 f"{self.out_grid}x{self.out_grid} adapter output; use e.g. 144 for 24x24")
        channels = tuple(int(c) for c in cfg.expert_channels)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, dim))
        self.blocks = nn.ModuleList(AdapterBlock(dim, channels, text_width(cfg), self.topk, grid, arch)
                                    for _ in range(int(cfg.num_projector_layers)))
        # AdaptiveAvgPool2d(grid / 2) on an even grid is exactly a 2x2 average pool (exports as one AveragePool)
        self.downsample = nn.Sequential(RegStage(dim, arch), nn.AvgPool2d(grid // self.out_grid),
                                        RegStage(dim, arch))
        hidden = int(cfg.llm_hidden_size)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))

    # shared pieces ---------------------------------------------------------------------------------------------
    def run(self, base: torch.Tensor, text: torch.Tensor | None, routing_mask: torch.Tensor | None,
            expert_terms: Sequence[ExpertTerm] | None,
            record: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapter with one expert term per block (dense or slot form), or none at all: with no expert routed
        binary = 0 removes the term exactly, so the routing form needs neither the gate nor the text."""
        x = base + self.pos_embed
        if expert_terms is None:
            for blk in self.blocks:
                x = blk.transformer(x)
        else:
            r = routing_mask.float()
            weight_mask = (1 - r) * ROUTING_MASK_FILL
            binary = (r.mean(-1) > 0).to(base.dtype)                    # torch.where(mean > 0, 1, 0)
            for blk, term in zip(self.blocks, expert_terms):
                x = blk(x, text, weight_mask, binary, term, record)
        x = (x + base) / 2
        x = x.transpose(1, 2).reshape(-1, self.dim, self.grid, self.grid)
        x = self.downsample(x)
        x = x.reshape(-1, self.dim, self.out_grid * self.out_grid).transpose(1, 2)
        image_tokens = self.mlp(x)
        return image_tokens, self.routing_pool(image_tokens)

    def routing_pool(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """Adaptive average pool of the out_grid^2 tokens to routing_grid^2 (an exact k x k mean)."""
        s, r = self.out_grid, self.routing_grid
        k, h = s // r, image_tokens.shape[-1]
        x = image_tokens.reshape(-1, r, k, r, k, h).mean(dim=(2, 4))
        return x.reshape(-1, r * r, h)

    def _dense_terms(self, values: Sequence[torch.Tensor | None]) -> list[ExpertTerm]:
        return [partial(blk.dense_experts, values=values) for blk in self.blocks]

    # the entry points ------------------------------------------------------------------------------------------
    def forward(self, base: torch.Tensor, *experts_text_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Static dense path (base, expert_A.., text_features, routing_mask): all cross-attentions run, unrouted
        experts (any features, e.g. zeros) get weight 0."""
        *values, text_features, routing_mask = experts_text_mask
        return self.run(base, text_features, routing_mask, self._dense_terms(values))

    def forward_reference(self, base: torch.Tensor, experts: Sequence[torch.Tensor | None] | None,
                          text_features: torch.Tensor,
                          routing_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Upstream's B == 1 inference: cross-attention of unrouted experts skipped (their features may be None)."""
        values = self._routed(base, experts, routing_mask)
        return self.run(base, text_features, routing_mask, self._dense_terms(values))

    def gate_weights(self, base: torch.Tensor, experts: Sequence[torch.Tensor | None] | None,
                     text_features: torch.Tensor, routing_mask: torch.Tensor) -> torch.Tensor:
        """Per-block gate weights [num_blocks, B, 7] of the reference forward (equal to the dense forward's)."""
        record: list[torch.Tensor] = []
        values = self._routed(base, experts, routing_mask)
        self.run(base, text_features, routing_mask, self._dense_terms(values), record)
        return torch.stack(record)

    def _routed(self, base: torch.Tensor, experts: Sequence[torch.Tensor | None] | None,
                routing_mask: torch.Tensor) -> list[torch.Tensor | None]:
        count, letters = num_experts(), expert_letters()
        experts = [None] * count if experts is None else list(experts)
        if len(experts) != count:
            raise ComponentError(f"component {NAME}: forward_reference takes {count} expert features "
                                 f"(A..G, None for unrouted ones), got {len(experts)}")
        if base.shape[0] != 1:  # upstream only skips at batch 1; every expert must be present otherwise
            routed = [True] * count
        else:
            routed = [bool(v) for v in routing_mask[0].tolist()]
        missing = [letters[j] for j, (e, on) in enumerate(zip(experts, routed)) if on and e is None]
        if missing:
            raise ComponentError(f"component {NAME}: expert(s) {', '.join(missing)} are routed by the mask but their "
                                 "features are None; run those experts or clear them from the mask")
        return [e if on else None for e, on in zip(experts, routed)]


# ---- the answer pass with static top-K slots, and the routing pass without experts -----------------------------
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


# ---- registration ----------------------------------------------------------------------------------------------
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


# ---- the routing and slot forms: graph declarations beside the dense one (not registered: the checkpoint keys
# belong to `adapter`; export a form with onnx_from_component(form_spec, Form(loaded_adapter), cfg, path)) -------
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
    return replace(SPEC, name=ROUTING_FORM, build=lambda cfg: RoutingAdapter(_build(cfg)).eval(),
                   inputs=routing_inputs, sample_inputs=lambda cfg, seed: {"base": _sample(cfg, seed)["base"]},
                   description="MoV-Adapter routing pass: no expert routed, no cross-attention, no gate, no text")


def slot_spec(num_slots: int) -> ComponentSpec:
    return replace(SPEC, name=slot_form(num_slots), build=lambda cfg: SlotAdapter(_build(cfg), num_slots).eval(),
                   inputs=lambda cfg: slot_inputs(cfg, num_slots),
                   sample_inputs=lambda cfg, seed: _slot_sample(cfg, seed, num_slots),
                   description=f"MoV-Adapter answer pass with {num_slots} static expert slots per block")

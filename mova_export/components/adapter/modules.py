"""The MoV-Adapter's module tree with upstream's key names (builder.py `MoVAdapter` minus its BERT): the gated
per-expert cross-attention blocks with 2-D RoPE, the RegStage downsample and the MLP, and the forward passes every
form shares (`MoVAdapter.run`): the static dense one and upstream's skipping B == 1 reference. docs/adapter-forms.md
has the whole design and its numerics choices."""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...core.errors import ComponentError
from .. import arch, component_names, expert_letters, num_experts
from ..layers import Rope, SwiGLU, rotate_half

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

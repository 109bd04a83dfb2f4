"""The MoV-Adapter component: shapes, the gate (routing, top-k, renormalisation), the dense export path against the
skipping reference for all 64 masks, the K=0 `binary` behaviour, the checkpoint key layout and full-scale size,
numerics of the attention / RegStage against written-out upstream formulas, and a static ONNX export.
Then the routing form (no expert branch) and the static top-K slot forms (K = 3 and 7) against the same reference,
the slot contract (mova_export/slots.py) and their static ONNX exports."""
from __future__ import annotations

import copy
import math
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mova_export import components
from mova_export.components import arch, expert_letters, get_spec
from mova_export.components.adapter import RoutingAdapter, SlotAdapter, StackedLayerNorm, routing_spec, slot_spec
from mova_export.core.errors import ComponentError, RuntimeInputError
from mova_export.core.prompts import mask_label as _mask_label
from mova_export.core.prompts import parse_routing as _parse_routing
from mova_export.core.slots import SLOT_INPUTS, fill_slots, num_slots_for
from mova_export.export import DYNAMIC_OPS, onnx_from_component, routing_masks
from mova_export.source.config import FULL_LLM, MoVAConfig


def mask_label(mask) -> str:
    return _mask_label(mask, expert_letters())


def parse_routing(response: str) -> list[int]:
    return _parse_routing(response, expert_letters())
from helpers import randomize

SPEC = get_spec("adapter")
TINY_CHANNELS = (48, 32, 16, 48, 24, 24, 16)       # toy expert widths (A..G), the real 48x48 grid
TINY = MoVAConfig(llm=dict(FULL_LLM, hidden_size=256), scale="tiny", mm_hidden_size=32, expert_channels=TINY_CHANNELS)
SMALL_GRID = TINY.with_overrides(image_feat_size=16, num_routing_tokens=16)  # 16x16 grid: the 64-mask sweep is fast
FULL = MoVAConfig(llm=dict(FULL_LLM))
ABC = (1, 1, 1, 0, 0, 0, 0)


def _randomize(module: nn.Module, seed: int) -> nn.Module:
    """Every parameter away from its (partly zero) init, so every path counts: norms 1 + noise, matrices ~ fan-in."""
    return randomize(module, seed, keep_scale=lambda name: name == "pos_embed")


def _feed(cfg: MoVAConfig, seed: int, mask=ABC, zero_unrouted: bool = True) -> dict[str, torch.Tensor]:
    feed = SPEC.sample_inputs(cfg, seed)
    feed["routing_mask"] = torch.tensor([mask], dtype=torch.float32)
    if zero_unrouted:
        for j, on in enumerate(mask):
            if not on:
                feed[f"expert_{'ABCDEFG'[j]}"] = torch.zeros_like(feed[f"expert_{'ABCDEFG'[j]}"])
    return feed


def _args(cfg: MoVAConfig, feed: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return tuple(feed[t.name] for t in SPEC.inputs(cfg))


def _experts(feed: dict[str, torch.Tensor], mask) -> list[torch.Tensor | None]:
    return [feed[f"expert_{c}"] if on else None for c, on in zip("ABCDEFG", mask)]


def _reference(module, feed, mask):
    return module.forward_reference(feed["base"], _experts(feed, mask), feed["text_features"],
                                    torch.tensor([mask], dtype=torch.float32))


def _gates(module, feed, mask) -> torch.Tensor:
    return module.gate_weights(feed["base"], _experts(feed, mask), feed["text_features"],
                               torch.tensor([mask], dtype=torch.float32))


def _max_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def tiny():
    return _randomize(SPEC.build(TINY), seed=1)


@pytest.fixture(scope="module")
def small():
    return _randomize(SPEC.build(SMALL_GRID), seed=2)


# ---- spec, shapes, routing pool ----------------------------------------------------------------------------------
def test_spec_declares_inputs_outputs_and_prefixes():
    assert SPEC.prefix == "model.mm_projector." and SPEC.exclude_prefixes == ("text_encoder.",)
    assert SPEC.owns("model.mm_projector.mlp.0.weight") and SPEC.owns("model.mm_projector.blocks.0.gate.0.bias")
    assert not SPEC.owns("model.mm_projector.text_encoder.bert.embeddings.word_embeddings.weight")
    got = [(t.name, t.shape) for t in SPEC.inputs(FULL)]
    assert got == [("base", (1, 2304, 1024)),
                   *((f"expert_{c}", (1, 2304, ch)) for c, ch in zip("ABCDEFG", (1536, 512, 256, 1536, 768, 768, 256))),
                   ("text_features", (1, 1024)), ("routing_mask", (1, 7))]
    assert [(t.name, t.shape) for t in SPEC.outputs(FULL)] == [("image_tokens", (1, 576, 4096)),
                                                               ("routing_tokens", (1, 144, 4096))]


def test_text_width_falls_back_to_the_preset_without_a_text_encoder(monkeypatch):
    if "text_encoder" in components.component_names():
        assert SPEC.inputs(TINY)[-2].shape == (1, int(arch(TINY, "text_encoder")["hidden_size"]))
    monkeypatch.delitem(components._REGISTRY, "text_encoder", raising=False)
    assert SPEC.inputs(TINY)[-2].shape == (1, SPEC.presets["tiny"]["text_width"])
    assert SPEC.inputs(FULL)[-2].shape == (1, 1024)
    assert SPEC.build(SMALL_GRID).blocks[0].gate[0].in_features == SPEC.presets["tiny"]["text_width"] + 32


def test_output_shapes_and_routing_tokens_are_the_2x2_mean(tiny):
    with torch.inference_mode():
        image, routing = tiny(*_args(TINY, _feed(TINY, 0)))
    assert image.shape == (1, 576, 256) and routing.shape == (1, 144, 256)
    assert image.dtype == routing.dtype == torch.float32 and torch.isfinite(image).all()
    grid = image.reshape(1, 24, 24, 256).permute(0, 3, 1, 2)
    pooled = F.adaptive_avg_pool2d(grid, 12).flatten(2).transpose(1, 2)
    assert float((routing - pooled).abs().max()) <= 1e-6


# ---- the gate ----------------------------------------------------------------------------------------------------
def test_gate_weights_zero_for_unrouted_and_renormalised_top3(tiny):
    feed = _feed(TINY, 3, zero_unrouted=False)
    with torch.inference_mode():
        w = _gates(tiny, feed, ABC)
        assert w.shape == (3, 1, 7)
        assert (w[:, 0, 3:] == 0).all() and (w[:, 0, :3] > 0).all()
        assert torch.allclose(w.sum(-1), torch.ones(3, 1), atol=1e-6)
        # independent check of block 0: softmax over the routed logits only (the -1e6 ones underflow to exactly 0)
        blk = tiny.blocks[0]
        x = feed["base"] + tiny.pos_embed
        logits = blk.gate(torch.cat([feed["text_features"], x.mean(1)], -1))[0]
        assert torch.allclose(w[0, 0, :3], torch.softmax(logits[:3], -1), atol=1e-6)
        assert not torch.allclose(w[0], w[1])                          # each block has its own gate

        four = parse_routing("A B C D")
        assert four == [1, 1, 1, 1, 0, 0, 0]
        w4 = _gates(tiny, feed, four)
        assert ((w4[:, 0] != 0).sum(-1) == 3).all()                   # top-3 of the 4 routed experts
        assert (w4[:, 0, 4:] == 0).all() and torch.allclose(w4.sum(-1), torch.ones(3, 1), atol=1e-6)

        one = (0, 0, 0, 0, 0, 1, 0)
        w1 = _gates(tiny, feed, one)
        assert (w1[:, 0, 5] == 1).all() and (w1[:, 0].sum(-1) == 1).all()


# ---- dense == skipping reference ---------------------------------------------------------------------------------
def test_dense_forward_equals_skipping_reference_for_all_64_masks(small):
    masks = routing_masks(7, 3)
    assert len(masks) == 64
    worst = worst_leak = 0.0
    with torch.inference_mode():
        for i, mask in enumerate(masks):
            feed = _feed(SMALL_GRID, 100 + i, mask, zero_unrouted=False)
            zeros = _feed(SMALL_GRID, 100 + i, mask, zero_unrouted=True)
            ref = _reference(small, feed, mask)
            dense = small(*_args(SMALL_GRID, zeros))
            leak = small(*_args(SMALL_GRID, feed))                    # real features in the unrouted slots
            d, dl = _max_diff(ref, dense), _max_diff(dense, leak)
            assert d <= 1e-5, (mask_label(mask), d)
            assert dl <= 1e-6, (mask_label(mask), dl)
            worst, worst_leak = max(worst, d), max(worst_leak, dl)
    print(f"64 masks: max |dense - reference| = {worst:.3g}, max |leak| = {worst_leak:.3g}")


def test_dense_equals_reference_on_the_real_48_grid(tiny):
    with torch.inference_mode():
        for mask in (ABC, (0, 0, 0, 1, 0, 1, 1)):
            feed = _feed(TINY, 7, mask, zero_unrouted=False)
            ref = _reference(tiny, feed, mask)
            assert _max_diff(ref, tiny(*_args(TINY, _feed(TINY, 7, mask)))) <= 1e-5
            assert _max_diff(ref, tiny(*_args(TINY, feed))) <= 1e-5


def test_reference_rejects_a_routed_expert_without_features(small):
    feed = _feed(SMALL_GRID, 0)
    with pytest.raises(ComponentError, match="expert\\(s\\) B are routed"):
        small.forward_reference(feed["base"], [feed["expert_A"], None] + [None] * 5, feed["text_features"],
                                torch.tensor([[1, 1, 0, 0, 0, 0, 0]], dtype=torch.float32))


# ---- K = 0: binary ---------------------------------------------------------------------------------------------
def test_no_expert_routed_removes_the_cross_attention_term(tiny):
    feed = _feed(TINY, 11, (0,) * 7, zero_unrouted=False)
    with torch.inference_mode():
        image, routing = tiny(*_args(TINY, feed))
        # blocks without the cross-attention term, then the shared tail
        x = feed["base"] + tiny.pos_embed
        for blk in tiny.blocks:
            h = blk.norm3(x)
            x = x + blk.self_attn(h, h)
            x = x + blk.mlp(blk.norm4(x))
        x = ((x + feed["base"]) / 2).transpose(1, 2).reshape(1, 32, 48, 48)
        want = tiny.mlp(tiny.downsample(x).flatten(2).transpose(1, 2))
        assert float((image - want).abs().max()) <= 1e-5
        assert float((routing - tiny.routing_pool(want)).abs().max()) <= 1e-5
        assert torch.equal(tiny.forward_reference(feed["base"], None, feed["text_features"], feed["routing_mask"])[0],
                           image)
        # the gate weights are not zero at K=0 (a uniform shift of the logits): binary is what removes the term
        w = tiny.gate_weights(feed["base"], None, feed["text_features"], feed["routing_mask"])
        assert ((w[:, 0] > 0).sum(-1) == 3).all()
        one = _feed(TINY, 11, (0, 1, 0, 0, 0, 0, 0), zero_unrouted=False)
        assert float((tiny(*_args(TINY, one))[0] - image).abs().max()) > 1e-3


# ---- checkpoint layout and size --------------------------------------------------------------------------------
def _expected_keys(cfg: MoVAConfig, rope: bool = True) -> list[str]:
    def lin(p: str, bias: bool = True) -> list[str]:
        return [f"{p}.weight"] + ([f"{p}.bias"] if bias else [])

    def attn(p: str) -> list[str]:
        keys = lin(f"{p}.q_proj", False) + lin(f"{p}.k_proj", False) + lin(f"{p}.v_proj", False)
        keys += lin(f"{p}.inner_attn_ln") + lin(f"{p}.proj")
        return keys + ([f"{p}.rope.freqs_cos", f"{p}.rope.freqs_sin"] if rope else [])

    keys = ["pos_embed"]
    for b in range(cfg.num_projector_layers):
        blk = f"blocks.{b}"
        for j in range(7):
            keys += attn(f"{blk}.cross_attn.{j}") + lin(f"{blk}.norm1.{j}") + lin(f"{blk}.norm2.{j}")
        keys += attn(f"{blk}.self_attn") + lin(f"{blk}.norm3") + lin(f"{blk}.norm4")
        keys += [k for w in ("w1", "w2", "ffn_ln", "w3") for k in lin(f"{blk}.mlp.{w}")]
        keys += lin(f"{blk}.gate.0") + lin(f"{blk}.gate.2")
    for s in (0, 2):
        b1 = f"downsample.{s}.b1"
        for conv in ("conv1", "conv2", "conv3"):
            keys += [f"{b1}.{conv}.conv.weight"] + lin(f"{b1}.{conv}.bn")
        keys += lin(f"{b1}.se.fc1") + lin(f"{b1}.se.fc2")
    return keys + lin("mlp.0") + lin("mlp.2")


def test_full_scale_key_layout_shapes_and_parameter_count():
    with torch.device("meta"):
        module = SPEC.build(FULL)
    state = module.state_dict()
    assert sorted(state) == sorted(_expected_keys(FULL))
    shapes = {
        "pos_embed": (1, 2304, 1024),
        "blocks.0.cross_attn.6.k_proj.weight": (1024, 256),
        "blocks.2.cross_attn.0.v_proj.weight": (1024, 1536),
        "blocks.1.cross_attn.3.rope.freqs_cos": (2304, 64),
        "blocks.0.norm2.1.weight": (512,),
        "blocks.0.gate.0.weight": (1024, 2048),
        "blocks.0.gate.2.weight": (7, 1024),
        "blocks.0.mlp.w1.weight": (2730, 1024),
        "blocks.0.mlp.ffn_ln.weight": (2730,),
        "blocks.0.mlp.w3.weight": (1024, 2730),
        "downsample.0.b1.conv2.conv.weight": (1024, 1, 3, 3),
        "downsample.0.b1.se.fc1.weight": (256, 1024, 1, 1),
        "downsample.2.b1.se.fc2.bias": (1024,),
        "downsample.2.b1.conv3.bn.weight": (1024,),
        "mlp.0.weight": (4096, 1024),
        "mlp.2.weight": (4096, 4096),
    }
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key
    params = sum(p.numel() for p in module.parameters())
    print(f"full adapter: {params / 1e6:.3f} M parameters without BERT")
    assert 145e6 <= params <= 158e6


def test_rope_tables_are_optional_checkpoint_buffers():
    cfg = SMALL_GRID.with_overrides(arch_overrides={"adapter": {"rope_in_checkpoint": False}})
    module = SPEC.build(cfg)
    assert sorted(module.state_dict()) == sorted(_expected_keys(cfg, rope=False))
    head_dim = cfg.mm_hidden_size // arch(cfg, "adapter")["num_heads"]
    assert module.blocks[0].self_attn.rope.freqs_cos.shape == (256, head_dim)   # still there, just not persistent


def test_tiny_adapter_is_small(tiny):
    nbytes = sum(t.numel() * t.element_size() for t in tiny.state_dict().values())
    assert nbytes < 8 * 2**20


# ---- numerics against written-out upstream formulas ------------------------------------------------------------
def _upstream_rope(dim: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionRotaryEmbeddingFast(dim, pt_seq_len=seq, ft_seq_len=seq), 'lang' freqs, theta 10000."""
    freqs = 1.0 / (10000 ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    t = torch.arange(seq) / seq * seq
    freqs = torch.einsum("i,f->if", t, freqs).repeat_interleave(2, dim=-1)
    grid = torch.cat([freqs[:, None, :].expand(seq, seq, -1), freqs[None, :, :].expand(seq, seq, -1)], dim=-1)
    return grid.cos().reshape(seq * seq, -1), grid.sin().reshape(seq * seq, -1)


def _upstream_attention(attn, x, value, heads):
    b, n, c = x.shape
    cos, sin = _upstream_rope(c // heads // 2, int(math.isqrt(n)))

    def rope(t):
        pairs = t.reshape(*t.shape[:-1], -1, 2)
        rot = torch.stack((-pairs[..., 1], pairs[..., 0]), -1).reshape(t.shape)
        return t * cos + rot * sin

    q = F.linear(x, attn.q_proj.weight).reshape(b, n, heads, -1).permute(0, 2, 1, 3)
    k = F.linear(value, attn.k_proj.weight).reshape(b, n, heads, -1).permute(0, 2, 1, 3)
    v = F.linear(value, attn.v_proj.weight).reshape(b, n, heads, -1).permute(0, 2, 1, 3)
    q, k = rope(q), rope(k)
    a = ((q * (c // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
    out = (a @ v).transpose(1, 2).reshape(b, n, -1)
    return attn.proj(F.layer_norm(out, (c,), attn.inner_attn_ln.weight, attn.inner_attn_ln.bias, 1e-5))


def test_attention_and_regstage_match_upstream_formulas(tiny):
    gen = torch.Generator().manual_seed(5)
    x, value = torch.randn(1, 2304, 32, generator=gen), torch.randn(1, 2304, 16, generator=gen)
    attn = tiny.blocks[1].cross_attn[2]
    cos, _ = _upstream_rope(32 // attn.num_heads // 2, 48)
    assert torch.allclose(attn.rope.freqs_cos, cos, atol=1e-6)
    with torch.inference_mode():
        assert float((attn(x, value) - _upstream_attention(attn, x, value, attn.num_heads)).abs().max()) <= 1e-5

        # timm RegStage(depth 1, linear_out): ConvNormAct(SiLU) x2, SE, ConvNormAct(no act), identity, no final act
        b1 = tiny.downsample[2].b1
        img = torch.randn(1, 32, 24, 24, generator=gen)

        def norm_act(t, bn, act):
            t = F.layer_norm(t.permute(0, 2, 3, 1), (32,), bn.weight, bn.bias, 1e-5).permute(0, 3, 1, 2)
            return F.silu(t) if act else t

        h = norm_act(F.conv2d(img, b1.conv1.conv.weight), b1.conv1.bn, True)
        h = norm_act(F.conv2d(h, b1.conv2.conv.weight, padding=1, groups=32), b1.conv2.bn, True)
        se = F.conv2d(F.silu(F.conv2d(h.mean((2, 3), keepdim=True), b1.se.fc1.weight, b1.se.fc1.bias)),
                      b1.se.fc2.weight, b1.se.fc2.bias)
        h = norm_act(F.conv2d(h * se.sigmoid(), b1.conv3.conv.weight), b1.conv3.bn, False)
        assert float((tiny.downsample[2](img) - (h + img)).abs().max()) <= 1e-5
        assert b1.se.fc1.out_channels == 8 and b1.conv2.conv.groups == 32   # rd = round(0.25 * 32); depthwise


# ---- static ONNX export ----------------------------------------------------------------------------------------
def test_onnx_export_is_static_and_matches_torch(tiny, tmp_path):
    import onnx
    import onnxruntime as ort

    start = time.perf_counter()
    path = tmp_path / "adapter.onnx"
    onnx_from_component(SPEC, tiny, TINY, path, feed=_feed(TINY, 0, zero_unrouted=False))
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert not ops & (DYNAMIC_OPS | {"If", "Loop", "NonZero"}), ops
    assert "TopK" in ops
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [t.name for t in SPEC.inputs(TINY)]
    assert [i.name for i in session.get_inputs()] == names
    figures = []
    for mask, zero in ((ABC, False), ((0, 0, 0, 1, 0, 0, 1), True)):
        feed = _feed(TINY, 21, mask, zero_unrouted=zero)
        with torch.inference_mode():
            want = tiny(*_args(TINY, feed))
        got = session.run(["image_tokens", "routing_tokens"], {n: feed[n].numpy() for n in names})
        for w, g in zip(want, got):
            w, g = w.numpy().ravel().astype(np.float64), g.ravel().astype(np.float64)
            cosine = float(w @ g / (np.linalg.norm(w) * np.linalg.norm(g)))
            assert cosine >= 0.99999, (mask_label(mask), cosine)
            assert float(np.abs(w - g).max()) <= 1e-3
            figures.append((cosine, float(np.abs(w - g).max())))
    print(f"onnx export + 2 ORT runs in {time.perf_counter() - start:.1f} s: worst cosine "
          f"{min(c for c, _ in figures):.8f}, max abs {max(d for _, d in figures):.3g}; ops {sorted(ops)}")


# ---- routing form and static top-K slot forms --------------------------------------------------------------------
SLOT_ARGS = ("base", *SLOT_INPUTS[:3], "text_features", "routing_mask")   # SlotAdapter.forward's order
EMPTY = (0,) * 7


@pytest.fixture(scope="module")
def slots3(small):
    return SlotAdapter(small, 3).eval()


@pytest.fixture(scope="module")
def slots7(small):
    return SlotAdapter(small, 7).eval()


def _slots(feed: dict[str, torch.Tensor], mask, num_slots: int) -> dict[str, torch.Tensor]:
    """The slot form's feed, filled by the runtime helper from the dense feed's expert features."""
    experts = {j: feed[f"expert_{c}"].numpy() for j, c in enumerate("ABCDEFG")}
    filled = fill_slots(mask, experts, num_slots, SMALL_GRID.expert_channels, SMALL_GRID.grid_tokens)
    return {"base": feed["base"], "text_features": feed["text_features"],
            **{name: torch.from_numpy(value) for name, value in filled.items()}}


def _slot_args(slots: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return tuple(slots[name] for name in SLOT_ARGS)


def test_form_specs_declare_static_inputs_and_the_dense_outputs():
    spec3, routing = slot_spec(3), routing_spec()
    assert (spec3.name, slot_spec(7).name, routing.name) == ("adapter_slots3", "adapter_slots7", "adapter_routing")
    assert [(t.name, t.shape, t.dtype) for t in spec3.inputs(FULL)] == [
        ("base", (1, 2304, 1024), "float32"), ("slot_features", (3, 2304, 1536), "float32"),
        ("slot_expert", (3,), "int64"), ("slot_valid", (3,), "float32"), ("text_features", (1, 1024), "float32"),
        ("routing_mask", (1, 7), "float32")]
    assert [t.name for t in spec3.inputs(FULL)] == list(SLOT_ARGS)
    assert [(t.name, t.shape) for t in routing.inputs(FULL)] == [("base", (1, 2304, 1024))]
    assert spec3.outputs(FULL) == routing.outputs(FULL) == SPEC.outputs(FULL)
    assert isinstance(routing.build(SMALL_GRID), RoutingAdapter)
    assert isinstance(spec3.build(SMALL_GRID), SlotAdapter) and spec3.build(SMALL_GRID).num_slots == 3
    with pytest.raises(ComponentError, match="unknown component 'adapter_slots3'"):
        get_spec("adapter_slots3")                                   # forms are not registered: keys stay with adapter


def test_fill_slots_builds_the_documented_contract():
    channels, tokens = SMALL_GRID.expert_channels, SMALL_GRID.grid_tokens
    rng = np.random.default_rng(0)
    feats = {j: rng.standard_normal((1, tokens, c)).astype(np.float32) for j, c in enumerate(channels)}
    b_and_g = (0, 1, 0, 0, 0, 0, 1)
    out = fill_slots(b_and_g, feats, 3, channels, tokens)
    assert list(out) == list(SLOT_INPUTS)
    features = out["slot_features"]
    assert features.shape == (3, tokens, 48) and features.dtype == np.float32
    assert out["slot_expert"].dtype == np.int64 and out["slot_expert"].tolist() == [1, 6, 0]
    assert out["slot_valid"].dtype == np.float32 and out["slot_valid"].tolist() == [1, 1, 0]
    assert out["routing_mask"].dtype == np.float32 and out["routing_mask"].tolist() == [list(b_and_g)]
    np.testing.assert_array_equal(features[0, :, :32], feats[1][0])
    np.testing.assert_array_equal(features[1, :, :16], feats[6][0])
    assert not features[0, :, 32:].any() and not features[1, :, 16:].any() and not features[2].any()
    two_d = fill_slots(b_and_g, {1: feats[1][0], 6: feats[6][0]}, 3, channels, tokens)  # [N, C_j] works too
    np.testing.assert_array_equal(two_d["slot_features"], features)
    empty = fill_slots(EMPTY, {}, 3, channels, tokens)
    assert not empty["slot_valid"].any() and not empty["slot_features"].any()
    assert [num_slots_for(m, 3) for m in (EMPTY, b_and_g, ABC, parse_routing("A B C D"), (1,) * 7)] == [0, 3, 3, 7, 7]

    with pytest.raises(RuntimeInputError, match="4 experts routed but the slot graph has 3 slots"):
        fill_slots((1, 1, 1, 1, 0, 0, 0), feats, 3, channels, tokens)
    with pytest.raises(RuntimeInputError, match="expert G is routed but has no features"):
        fill_slots(b_and_g, {1: feats[1]}, 3, channels, tokens)
    with pytest.raises(RuntimeInputError, match=r"expert B features have shape \[1, 256, 16\], the slot needs "
                                                r"\[1, 256, 32\]"):
        fill_slots(b_and_g, {1: feats[6], 6: feats[6]}, 3, channels, tokens)
    for bad in ((0, 2, 0, 0, 0, 0, 0), (1, 0, 1)):
        with pytest.raises(RuntimeInputError, match="is not a multi-hot of 7"):
            fill_slots(bad, feats, 3, channels, tokens)


def test_slot_helpers_import_without_torch():
    code = "import sys, mova_export.core.slots; print('torch' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert run.stdout.strip() == "False"


def test_routing_form_equals_the_reference_with_no_expert(small, slots3):
    feed = _feed(SMALL_GRID, 31, EMPTY, zero_unrouted=False)
    empty = torch.zeros(1, 7)
    with torch.inference_mode():
        got = RoutingAdapter(small)(feed["base"])
        ref = small.forward_reference(feed["base"], [None] * 7, feed["text_features"], empty)
        assert all(torch.equal(g, r) for g, r in zip(got, ref))
        # the text cannot matter with binary = 0: the routing pass needs no BERT feature
        other = small.forward_reference(feed["base"], None, torch.randn(feed["text_features"].shape), empty)
        assert all(torch.equal(g, o) for g, o in zip(got, other))
        # the same answer from the dense graph (real features everywhere) and from a slot graph with no valid slot
        assert _max_diff(got, small(*_args(SMALL_GRID, feed))) <= 1e-6
        assert _max_diff(got, slots3(*_slot_args(_slots(feed, EMPTY, 3)))) <= 1e-6


def test_slot_form_k3_equals_skipping_reference_for_all_64_masks(small, slots3):
    worst = 0.0
    with torch.inference_mode():
        for i, mask in enumerate(routing_masks(7, 3)):
            feed = _feed(SMALL_GRID, 100 + i, mask, zero_unrouted=False)
            d = _max_diff(_reference(small, feed, mask), slots3(*_slot_args(_slots(feed, mask, 3))))
            assert d <= 1e-5, (mask_label(mask), d)
            worst = max(worst, d)
    print(f"64 masks: max |slots(K=3) - reference| = {worst:.3g}")


def test_slot_form_k7_equals_reference_when_more_than_three_experts_are_routed(small, slots3, slots7):
    masks = (tuple(parse_routing("A B C D")), (0, 0, 1, 1, 1, 0, 1), (1, 0, 1, 1, 1, 1, 0), (0, 1, 1, 1, 1, 1, 1),
             (1,) * 7)
    worst, winners = 0.0, {}
    with torch.inference_mode():
        for i, mask in enumerate(masks):
            feed = _feed(SMALL_GRID, 300 + i, mask, zero_unrouted=False)
            ref = _reference(small, feed, mask)
            d = _max_diff(ref, slots7(*_slot_args(_slots(feed, mask, 7))))
            assert d <= 1e-5, (mask_label(mask), d)
            worst = max(worst, d)
            w = _gates(small, feed, mask)[:, 0]
            assert ((w != 0).sum(-1) == 3).all()                      # top-3 per block of the routed experts
            winners[mask] = [tuple(int(j) for j in torch.nonzero(wb).flatten()) for wb in w]
        # each block picks its own three: three slots holding block 0's winners miss another block's expert
        mask = max(winners, key=lambda m: len(set().union(*winners[m])))
        assert len(set().union(*winners[mask])) > 3, winners
        feed = _feed(SMALL_GRID, 300 + masks.index(mask), mask, zero_unrouted=False)
        first = [int(j in winners[mask][0]) for j in range(7)]
        three = _slots(feed, first, 3)
        three["routing_mask"] = torch.tensor([mask], dtype=torch.float32)
        assert _max_diff(_reference(small, feed, mask), slots3(*_slot_args(three))) > 1e-3
        assert _max_diff(_reference(small, feed, ABC), slots7(*_slot_args(_slots(feed, ABC, 7)))) <= 1e-5
    print(f"K=7 slots, 4..7 experts: max |slots - reference| = {worst:.3g}; per-block winners {winners}")


def test_unused_slots_and_padded_channels_cannot_leak(slots3):
    gen = torch.Generator().manual_seed(41)
    widths = torch.tensor(SMALL_GRID.expert_channels)
    with torch.inference_mode():
        for i, mask in enumerate((EMPTY, (0, 0, 1, 0, 0, 0, 0), (1, 0, 0, 0, 0, 0, 1))):
            slots = _slots(_feed(SMALL_GRID, 40 + i, mask, zero_unrouted=False), mask, 3)
            clean = slots3(*_slot_args(slots))
            garbage = 100 * torch.randn(slots["slot_features"].shape, generator=gen)
            unused = slots["slot_valid"] == 0
            assert int(unused.sum()) == 3 - sum(mask)
            dirty = dict(slots, slot_features=torch.where(unused[:, None, None], garbage, slots["slot_features"]),
                         slot_expert=torch.where(unused, torch.randint(0, 7, (3,), generator=gen),
                                                 slots["slot_expert"]))
            assert all(torch.equal(c, d) for c, d in zip(clean, slots3(*_slot_args(dirty))))
            # beyond the contract (zeros): norm2 and the zero K/V rows ignore a real slot's padded channels too
            padding = torch.arange(48)[None, None, :] >= widths[slots["slot_expert"]][:, None, None]
            assert bool(padding[~unused].any()) == any(SMALL_GRID.expert_channels[j] < 48
                                                       for j, on in enumerate(mask) if on)
            dirty = dict(slots, slot_features=torch.where(padding, garbage, slots["slot_features"]))
            assert all(torch.equal(c, d) for c, d in zip(clean, slots3(*_slot_args(dirty))))


def test_slot_form_gate_weights_match_the_dense_gate(small, slots3, slots7):
    with torch.inference_mode():
        for form, mask in ((slots3, ABC), (slots3, (0, 0, 0, 0, 1, 0, 0)), (slots7, (1, 1, 0, 1, 0, 1, 1))):
            feed = _feed(SMALL_GRID, 51, mask, zero_unrouted=False)
            want = _gates(small, feed, mask)
            got = form.gate_weights(*_slot_args(_slots(feed, mask, form.num_slots)))
            assert got.shape == want.shape == (3, 1, 7)
            assert torch.equal(got != 0, want != 0), (mask_label(mask), got, want)
            assert float((got - want).abs().max()) <= 1e-6


def test_stacked_layernorm_normalises_each_expert_over_its_own_channels(small):
    norms = small.blocks[0].norm2
    stacked = StackedLayerNorm(norms, 48)
    x = 3 * torch.randn(7, 64, 48, generator=torch.Generator().manual_seed(61)) + 1
    with torch.inference_mode():
        out = stacked(x, torch.arange(7))
        for j, c in enumerate(SMALL_GRID.expert_channels):
            assert float((out[j, :, :c] - norms[j](x[j, :, :c])).abs().max()) <= 1e-5
            assert not out[j, :, c:].any()


def test_slot_constants_are_the_loaded_adapters_own_weights(small):
    adapter = copy.deepcopy(small)
    gen = torch.Generator().manual_seed(71)
    with torch.no_grad():                                # a checkpoint carries one RoPE pair per cross-attention
        for blk in adapter.blocks:
            for attn in blk.cross_attn:
                attn.rope.freqs_cos.add_(0.1 * torch.randn(attn.rope.freqs_cos.shape, generator=gen))
                attn.rope.freqs_sin.add_(0.1 * torch.randn(attn.rope.freqs_sin.shape, generator=gen))
    slots = SlotAdapter(adapter, 3).eval()
    assert slots.adapter is adapter                      # gate, self-attention, MLP, downsample: the same modules
    blk, stacked = adapter.blocks[1], slots.cross_attn[1]
    assert stacked.norm2.padded and not stacked.norm1.padded and not stacked.inner_attn_ln.padded
    for j, c in enumerate(SMALL_GRID.expert_channels):
        attn = blk.cross_attn[j]
        for name in ("k_proj", "v_proj"):
            weight = getattr(stacked, name).weight[j]
            assert torch.equal(weight[:c], getattr(attn, name).weight.t()) and not weight[c:].any()
        assert torch.equal(stacked.q_proj.weight[j], attn.q_proj.weight.t())
        assert torch.equal(stacked.proj.weight[j], attn.proj.weight.t())
        assert torch.equal(stacked.proj.bias[j], attn.proj.bias)
        assert torch.equal(stacked.norm2.weight[j, :c], blk.norm2[j].weight) and not stacked.norm2.weight[j, c:].any()
        assert torch.equal(stacked.norm2.bias[j, :c], blk.norm2[j].bias) and not stacked.norm2.bias[j, c:].any()
        assert torch.equal(stacked.norm1.bias[j], blk.norm1[j].bias)
        assert torch.equal(stacked.inner_attn_ln.weight[j], attn.inner_attn_ln.weight)
        assert torch.equal(stacked.rope_cos[j], attn.rope.freqs_cos) and torch.equal(stacked.rope_sin[j],
                                                                                     attn.rope.freqs_sin)
    mask = (0, 1, 1, 0, 0, 0, 1)
    feed = _feed(SMALL_GRID, 72, mask, zero_unrouted=False)
    with torch.inference_mode():
        ref = _reference(adapter, feed, mask)
        assert _max_diff(ref, slots(*_slot_args(_slots(feed, mask, 3)))) <= 1e-5
        assert _max_diff(ref, _reference(small, feed, mask)) > 1e-3   # the per-expert tables do matter


def test_slot_adapter_rejects_a_bad_slot_count(small):
    for bad in (0, 8):
        with pytest.raises(ComponentError, match=f"num_slots={bad}; a slot graph has 1 to 7 slots"):
            SlotAdapter(small, bad)


@pytest.mark.parametrize("num_slots", [0, 3, 7])
def test_routing_and_slot_forms_export_static_and_match_onnxruntime(small, num_slots, tmp_path):
    import onnx
    import onnxruntime as ort

    spec = routing_spec() if num_slots == 0 else slot_spec(num_slots)
    module = (RoutingAdapter(small) if num_slots == 0 else SlotAdapter(small, num_slots)).eval()
    path = tmp_path / f"{spec.name}.onnx"
    onnx_from_component(spec, module, SMALL_GRID, path)              # checks the declared inputs and outputs
    ops = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    assert not set(ops) & (DYNAMIC_OPS | {"If", "Loop", "NonZero"}), ops
    # per block: the self-attention, plus the gate and ONE cross-attention batched over the K slots (dense: 7)
    blocks = SMALL_GRID.num_projector_layers
    assert ops["Softmax"] == blocks * (1 if num_slots == 0 else 3), ops
    assert ("TopK" in ops) == (num_slots > 0)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [t.name for t in spec.inputs(SMALL_GRID)]
    assert [i.name for i in session.get_inputs()] == names
    masks = {0: [EMPTY], 3: [ABC, (0, 0, 0, 0, 0, 1, 0)], 7: [(1, 0, 1, 1, 0, 1, 1), ABC]}[num_slots]
    worst = 0.0
    for i, mask in enumerate(masks):
        feed = _feed(SMALL_GRID, 81 + i, mask, zero_unrouted=False)
        inputs = {"base": feed["base"]} if num_slots == 0 else _slots(feed, mask, num_slots)
        if num_slots:                                              # garbage in the unused slots
            unused = inputs["slot_valid"] == 0
            inputs["slot_features"][unused] = 50 * torch.randn(int(unused.sum()), *inputs["slot_features"].shape[1:])
        with torch.inference_mode():
            want = module(*(inputs[n] for n in names))
        got = session.run(["image_tokens", "routing_tokens"], {n: inputs[n].numpy() for n in names})
        d = max(float(np.abs(w.numpy() - g).max()) for w, g in zip(want, got))
        assert d <= 1e-5, (mask_label(mask), d)
        worst = max(worst, d)
    print(f"{spec.name}: ops {dict(ops)}; max |ORT - torch| = {worst:.3g}")

"""The MoV-Adapter component: shapes, the gate (routing, top-k, renormalisation), the dense export path against the
skipping reference for all 64 masks, the K=0 `binary` behaviour, the checkpoint key layout and full-scale size,
numerics of the attention / RegStage against written-out upstream formulas, and a static ONNX export."""
from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mova_export import components
from mova_export.components import get_spec
from mova_export.config import FULL_LLM, MoVAConfig
from mova_export.export import DYNAMIC_OPS, mask_label, onnx_from_component, routing_masks
from mova_export.prompts import parse_routing
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
        assert SPEC.inputs(TINY)[-2].shape == (1, int(TINY.arch("text_encoder")["hidden_size"]))
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
    from mova_export.errors import ComponentError

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
    head_dim = cfg.mm_hidden_size // cfg.arch("adapter")["num_heads"]
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

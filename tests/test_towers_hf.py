"""Base (CLIP) and experts A (DINOv2), D/E (Pix2Struct, Deplot) and F (BiomedCLIP), plus preprocessing: shapes,
checkpoint keys, full-scale parameter counts, numerics against independent references (transformers' own models
with the same weights, a written-out timm ViT), static ONNX exports that ONNX Runtime reproduces, and the
preprocessing contract (shapes, pad colours, normalisation, input errors)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import randomize
from torch import nn

from mova_export.components import arch, expert_index, get_spec
from mova_export.core.errors import ComponentError, RuntimeInputError
from mova_export.source.config import FULL_LLM, MoVAConfig

NAMES = ("base", "expert_A", "expert_D", "expert_E", "expert_F")
TOWER = {"base": "vision_tower_0", "expert_A": "vision_tower_1", "expert_D": "vision_tower_4",
         "expert_E": "vision_tower_5", "expert_F": "vision_tower_6"}
KIND = {"base": "clip672", "expert_A": "dino672", "expert_D": "pix2struct", "expert_E": "pix2struct",
        "expert_F": "clip672"}
FULL_CHANNELS = {"base": 1024, "expert_A": 1536, "expert_D": 1536, "expert_E": 768, "expert_F": 768}
PARAMS_M = {"base": (300, 310), "expert_A": (1100, 1150), "expert_D": (500, 530), "expert_E": (85, 100),
            "expert_F": (85, 90)}


def _cfg(scale: str, **fields) -> MoVAConfig:
    return MoVAConfig(llm=dict(FULL_LLM), scale=scale).with_overrides(**fields)


TINY = _cfg("tiny")
FULL = _cfg("full")


def _randomize(module: nn.Module, seed: int) -> nn.Module:
    """Every parameter away from its init (layer scales, pos-embeds and biases included), so every path counts."""
    return randomize(module, seed, keep_scale=lambda name: "embed" in name, unit=lambda name: name.endswith("lambda1"))


def _args(name: str, cfg: MoVAConfig = TINY, seed: int = 0) -> tuple[torch.Tensor, ...]:
    spec = get_spec(name)
    feed = spec.sample_inputs(cfg, seed)
    return tuple(feed[t.name] for t in spec.inputs(cfg))


@pytest.fixture(scope="module")
def tiny():
    """name -> (randomized tiny module, sample inputs, output)."""
    out = {}
    for i, name in enumerate(NAMES):
        module = _randomize(get_spec(name).build(TINY), seed=10 + i)
        args = _args(name)
        with torch.no_grad():
            out[name] = (module, args, module(*args))
    return out


@pytest.fixture(scope="module")
def full_meta():
    out = {}
    for name in NAMES:
        with torch.device("meta"):
            out[name] = get_spec(name).build(FULL)
    return out


# ---- specs and shapes --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_spec_declares_the_upstream_tower(name):
    spec = get_spec(name)
    assert spec.prefix == f"model.vision_tower.{TOWER[name]}."
    if name == "base":
        assert spec.expert is None
        assert spec.out_channels(arch(FULL, name)) == FULL.mm_hidden_size == 1024
    else:
        assert spec.expert.letter == name[-1] and [r.kind for r in spec.image_inputs] == [KIND[name]]
        assert spec.out_channels(arch(FULL, name)) == FULL.expert_channels[expert_index(name)] == FULL_CHANNELS[name]
    if KIND[name] == "pix2struct":
        want = [("flattened_patches", (1, 2025, 770), "float32"), ("attention_mask", (1, 2025), "float32")]
    else:
        want = [("pixel_values", (1, 3, 672, 672), "float32")]
    assert [(t.name, t.shape, t.dtype) for t in spec.inputs(FULL)] == want
    assert [(t.name, t.shape) for t in spec.outputs(FULL)] == [("features", (1, 2304, FULL_CHANNELS[name]))]
    assert spec.exclude_prefixes == ()


@pytest.mark.parametrize("name", NAMES)
def test_tiny_output_shape_and_token_grid(name, tiny):
    spec = get_spec(name)
    module, args, y = tiny[name]
    assert not module.training
    assert [tuple(a.shape) for a in args] == [t.shape for t in spec.inputs(TINY)] == \
        [t.shape for t in spec.inputs(FULL)]                              # tiny keeps the real input sizes
    assert y.shape == spec.outputs(TINY)[0].shape == (1, 2304, spec.out_channels(arch(TINY, name)))
    assert y.dtype == torch.float32 and torch.isfinite(y).all() and y.std() > 1e-2
    assert sum(p.numel() for p in module.parameters()) * 4 < 4 << 20     # a few MB at most


def test_tiny_keeps_the_native_token_counts(tiny):
    clip, dino, pix, deplot, biomed = (tiny[n][0] for n in NAMES)
    assert clip.vision_model.embeddings.position_embedding.weight.shape[0] == 48 * 48 + 1
    assert dino.embeddings.position_embeddings.shape[1] == 37 * 37 + 1
    assert biomed.trunk.pos_embed.shape[1] == 14 * 14 + 1
    for m in (pix, deplot):
        with torch.no_grad():
            assert m.last_hidden_state(*tiny["expert_D"][1]).shape[1] == 2025
    with torch.no_grad():
        x = F.interpolate(tiny["expert_A"][1][0], size=(518, 518), mode="bilinear", align_corners=False)
        assert dino.hidden_state(x).shape[1] == 1370


# ---- checkpoint keys ----------------------------------------------------------------------------------------------
def _clip_keys(depth: int) -> set[str]:
    """transformers 4.x CLIPVisionModel.state_dict() (what upstream saved), written out."""
    p = "vision_model."
    keys = {p + k for k in ("embeddings.class_embedding", "embeddings.patch_embedding.weight",
                            "embeddings.position_embedding.weight", "pre_layrnorm.weight", "pre_layrnorm.bias",
                            "post_layernorm.weight", "post_layernorm.bias")}
    for i in range(depth):
        for k in ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj", "layer_norm1",
                  "mlp.fc1", "mlp.fc2", "layer_norm2"):
            keys |= {f"{p}encoder.layers.{i}.{k}.weight", f"{p}encoder.layers.{i}.{k}.bias"}
    return keys


def _dinov2_keys(depth: int) -> set[str]:
    """MoVA's repo copy of transformers 4.x Dinov2Model (use_swiglu_ffn), written out."""
    keys = {"embeddings.cls_token", "embeddings.mask_token", "embeddings.position_embeddings",
            "embeddings.patch_embeddings.projection.weight", "embeddings.patch_embeddings.projection.bias",
            "layernorm.weight", "layernorm.bias"}
    for i in range(depth):
        keys |= {f"encoder.layer.{i}.{k}" for k in ("layer_scale1.lambda1", "layer_scale2.lambda1")}
        for k in ("norm1", "attention.attention.query", "attention.attention.key", "attention.attention.value",
                  "attention.output.dense", "norm2", "mlp.weights_in", "mlp.weights_out"):
            keys |= {f"encoder.layer.{i}.{k}.weight", f"encoder.layer.{i}.{k}.bias"}
    return keys


def _pix2struct_keys(depth: int) -> set[str]:
    keys = {"embeddings.patch_projection.weight", "embeddings.patch_projection.bias",
            "embeddings.row_embedder.weight", "embeddings.column_embedder.weight", "layernorm.weight"}
    for i in range(depth):
        keys |= {f"encoder.layer.{i}.{k}.weight" for k in (
            "attention.query", "attention.key", "attention.value", "attention.output", "mlp.wi_0", "mlp.wi_1",
            "mlp.wo", "pre_mlp_layer_norm", "pre_attention_layer_norm")}
    return keys


def _biomedclip_keys(depth: int) -> set[str]:
    """open_clip TimmModel(vit_base_patch16_224, pool '', proj 'linear') state_dict, written out."""
    keys = {"trunk.cls_token", "trunk.pos_embed", "trunk.patch_embed.proj.weight", "trunk.patch_embed.proj.bias",
            "trunk.norm.weight", "trunk.norm.bias", "head.proj.weight"}
    for i in range(depth):
        for k in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys |= {f"trunk.blocks.{i}.{k}.weight", f"trunk.blocks.{i}.{k}.bias"}
    return keys


EXPECTED_KEYS = {"base": lambda: _clip_keys(24), "expert_A": lambda: _dinov2_keys(40),
                 "expert_D": lambda: _pix2struct_keys(18), "expert_E": lambda: _pix2struct_keys(12),
                 "expert_F": lambda: _biomedclip_keys(12)}
FULL_SHAPES = {
    "base": {"vision_model.embeddings.position_embedding.weight": (2305, 1024),
             "vision_model.embeddings.patch_embedding.weight": (1024, 3, 14, 14),
             "vision_model.embeddings.class_embedding": (1024,),
             "vision_model.encoder.layers.23.mlp.fc1.weight": (4096, 1024),
             "vision_model.encoder.layers.0.self_attn.q_proj.weight": (1024, 1024),
             "vision_model.post_layernorm.weight": (1024,)},
    "expert_A": {"embeddings.position_embeddings": (1, 1370, 1536), "embeddings.cls_token": (1, 1, 1536),
                 "embeddings.mask_token": (1, 1536), "embeddings.patch_embeddings.projection.weight": (1536, 3, 14, 14),
                 "encoder.layer.39.mlp.weights_in.weight": (8192, 1536),
                 "encoder.layer.0.mlp.weights_out.weight": (1536, 4096),
                 "encoder.layer.0.attention.attention.query.weight": (1536, 1536),
                 "encoder.layer.12.layer_scale1.lambda1": (1536,)},
    "expert_D": {"embeddings.patch_projection.weight": (1536, 768), "embeddings.row_embedder.weight": (4096, 1536),
                 "encoder.layer.17.mlp.wi_0.weight": (3968, 1536), "encoder.layer.0.mlp.wo.weight": (1536, 3968),
                 "encoder.layer.0.attention.query.weight": (1536, 1536), "layernorm.weight": (1536,)},
    "expert_E": {"embeddings.patch_projection.weight": (768, 768), "embeddings.column_embedder.weight": (4096, 768),
                 "encoder.layer.11.mlp.wi_1.weight": (2048, 768),
                 "encoder.layer.0.attention.output.weight": (768, 768)},
    "expert_F": {"trunk.pos_embed": (1, 197, 768), "trunk.cls_token": (1, 1, 768),
                 "trunk.patch_embed.proj.weight": (768, 3, 16, 16), "trunk.blocks.11.attn.qkv.weight": (2304, 768),
                 "trunk.blocks.11.attn.qkv.bias": (2304,), "trunk.blocks.0.mlp.fc1.weight": (3072, 768),
                 "head.proj.weight": (512, 768)},
}


@pytest.mark.parametrize("name", NAMES)
def test_full_state_dict_is_the_checkpoint_layout(name, full_meta):
    state = full_meta[name].state_dict()
    assert set(state) == EXPECTED_KEYS[name]()
    for key, shape in FULL_SHAPES[name].items():
        assert tuple(state[key].shape) == shape, key
    params = sum(p.numel() for p in full_meta[name].parameters()) / 1e6
    low, high = PARAMS_M[name]
    assert low <= params <= high, f"{name}: {params:.1f} M parameters"


def test_unused_keys_and_meta_builds_for_synthetic_checkpoints():
    from mova_export.source.checkpoint import build_on_meta
    from mova_export.synth import plan_tensors

    biomed = get_spec("expert_F")
    assert biomed.is_unused("head.proj.weight") and not biomed.is_unused("trunk.norm.weight")
    assert get_spec("base").is_unused("vision_model.embeddings.position_ids")   # older checkpoints may carry it
    clip = build_on_meta(get_spec("base"), TINY)
    assert clip.vision_model.embeddings.position_ids.device.type == "cpu"     # real buffer, not part of the keys
    plan = {e.key: e for e in plan_tensors(TINY, components=list(NAMES))}
    assert "model.vision_tower.vision_tower_6.head.proj.weight" in plan       # synthetic checkpoints carry it
    assert plan["model.vision_tower.vision_tower_1.encoder.layer.0.norm1.weight"].norm_weight
    assert plan["model.vision_tower.vision_tower_4.encoder.layer.0.pre_mlp_layer_norm.weight"].norm_weight
    assert all(e.buffer is None for e in plan.values())                     # every key is a parameter


def test_checkpoint_build_loads_every_tower_strictly(tiny, tmp_path):
    """A checkpoint in the upstream layout (with the stale CLIP position_ids some carry) builds each tower from meta
    parameters and reproduces the module it was saved from."""
    import json

    from safetensors.torch import save_file

    from mova_export.source.checkpoint import Checkpoint

    state = {get_spec(n).prefix + k: v.contiguous() for n in NAMES for k, v in tiny[n][0].state_dict().items()}
    state["model.vision_tower.vision_tower_0.vision_model.embeddings.position_ids"] = torch.arange(2305)[None]
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(TINY.to_dict()))
    ckpt = Checkpoint.open(tmp_path)
    for name in NAMES:
        module, args, y = tiny[name]
        built = ckpt.build(name)
        assert not any(p.device.type == "meta" for p in built.parameters())
        with torch.no_grad():
            assert torch.equal(built(*args), y), name


def test_select_layer_controls_how_many_layers_run():
    assert get_spec("base").build(TINY).run_layers == 2                      # -2 of 3 layers
    assert get_spec("base").build(_cfg("tiny", mm_vision_select_layer=-1)).run_layers == 3
    assert get_spec("expert_A").build(_cfg("tiny", mm_vision_select_layer=1)).run_layers == 1
    with pytest.raises(ComponentError, match="mm_vision_select_layer=-5"):
        get_spec("base").build(_cfg("tiny", mm_vision_select_layer=-5))


# ---- numerics against independent references ------------------------------------------------------------------------
def _align(tokens: torch.Tensor, side: int) -> torch.Tensor:
    b, _, c = tokens.shape
    x = tokens.transpose(1, 2).reshape(b, c, side, side)
    x = F.interpolate(x.float(), size=(48, 48), mode="bilinear", align_corners=False)
    return x.reshape(b, c, -1).transpose(1, 2)


def test_clip_matches_transformers_hidden_states(tiny):
    from transformers import CLIPVisionModel

    module, (x,), y = tiny["base"]
    config = copy.deepcopy(module.vision_model.config)                     # not shared with the module under test
    config._attn_implementation = "sdpa"                                    # a second model, transformers' default
    hf = CLIPVisionModel(config).eval()
    hf.load_state_dict({k.removeprefix("vision_model."): v for k, v in module.state_dict().items()}, strict=True)
    with torch.no_grad():
        states = hf(pixel_values=x, output_hidden_states=True).hidden_states
    assert len(states) == 4
    ref = states[-2][:, 1:]
    assert ref.shape == y.shape == (1, 2304, 32)
    assert (y - ref).abs().max() < 1e-5
    assert (y - states[-1][:, 1:]).abs().max() > 1e-2                        # the layer choice is visible
    assert module.vision_model.config._attn_implementation == "eager"        # the export keeps MatMul + Softmax


def _hf_dinov2(module: nn.Module, arch: dict) -> nn.Module:
    """transformers 5 Dinov2Model with the module's weights (4.x names -> 5.x names, weights_in split in two)."""
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(hidden_size=arch["hidden_size"], num_hidden_layers=arch["num_hidden_layers"],
                          num_attention_heads=arch["num_attention_heads"], image_size=518, patch_size=14,
                          use_swiglu_ffn=True, layer_norm_eps=1e-6, mlp_ratio=4)
    hf = Dinov2Model(config).eval()
    rename = [(".attention.attention.query.", ".attention.q_proj."),
              (".attention.attention.key.", ".attention.k_proj."),
              (".attention.attention.value.", ".attention.v_proj."), (".attention.output.dense.", ".attention.o_proj."),
              (".mlp.weights_out.", ".mlp.down_proj.")]
    state = {}
    for key, value in module.state_dict().items():
        if ".mlp.weights_in." in key:
            gate, up = value.chunk(2, dim=0)
            state[key.replace("weights_in", "gate_proj")] = gate
            state[key.replace("weights_in", "up_proj")] = up
            continue
        for old, new in rename:
            key = key.replace(old, new)
        state[key] = value
    hf.load_state_dict(state, strict=True)
    return hf


def test_dinov2_matches_transformers_dinov2(tiny):
    module, (x,), y = tiny["expert_A"]
    hf = _hf_dinov2(module, arch(TINY, "expert_A"))
    with torch.no_grad():
        x518 = F.interpolate(x, size=(518, 518), mode="bilinear")           # upstream's call (align_corners unset)
        out = hf(pixel_values=x518, output_hidden_states=True)
    assert len(out.hidden_states) == 4
    ref = _align(out.hidden_states[-2][:, 1:], 37)
    assert (y - ref).abs().max() < 1e-5
    assert (y - _align(out.hidden_states[-1][:, 1:], 37)).abs().max() > 1e-2
    assert module.encoder.layer[0].mlp.weights_out.in_features == 88       # (int(128 * 2 / 3) + 7) // 8 * 8


def _hf_pix2struct(module: nn.Module, arch: dict) -> nn.Module:
    from transformers import Pix2StructVisionConfig, Pix2StructVisionModel

    config = Pix2StructVisionConfig(hidden_size=arch["hidden_size"], d_ff=arch["d_ff"], d_kv=arch["d_kv"],
                                    num_hidden_layers=arch["num_hidden_layers"],
                                    num_attention_heads=arch["num_attention_heads"], seq_len=arch["seq_len"],
                                    dense_act_fn="gelu_new", layer_norm_eps=1e-6)
    hf = Pix2StructVisionModel(config).eval()
    hf.load_state_dict(module.state_dict(), strict=True)
    return hf


@pytest.mark.parametrize("name", ["expert_D", "expert_E"])
def test_pix2struct_matches_transformers_without_a_mask(name, tiny):
    """Upstream calls the encoder without attention_mask; the explicit mask input must give the same result, also
    when the picture leaves padding rows (sample inputs come from an unpadded 3:2 picture)."""
    module, (patches, mask), y = tiny[name]
    assert 0 < (mask == 0).sum() < 2025                                      # padding rows present
    assert torch.equal(mask, (patches.abs().sum(-1) != 0).float())
    hf = _hf_pix2struct(module, arch(TINY, name))
    with torch.no_grad():
        ref = hf(flattened_patches=patches).last_hidden_state
        assert ref.shape == (1, 2025, arch(TINY, name)["hidden_size"])
        assert (y - _align(ref, 45)).abs().max() < 1e-5
        unmasked = module(patches, torch.ones_like(mask))                    # the mask matters
    assert (unmasked - y).abs().max() > 1e-3


def _vit_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm VisionTransformer.forward_features (no fused attention) written out, on the module's weights."""
    t = module.trunk
    x = F.conv2d(x, t.patch_embed.proj.weight, t.patch_embed.proj.bias, stride=16).flatten(2).transpose(1, 2)
    x = torch.cat([t.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + t.pos_embed
    for blk in t.blocks:
        b, n, c = x.shape
        heads = blk.attn.heads
        y = F.layer_norm(x, (c,), blk.norm1.weight, blk.norm1.bias, 1e-6)
        qkv = F.linear(y, blk.attn.qkv.weight, blk.attn.qkv.bias).reshape(b, n, 3, heads, c // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1) * (c // heads) ** -0.5).softmax(-1)
        y = (attn @ v).transpose(1, 2).reshape(b, n, c)
        x = x + F.linear(y, blk.attn.proj.weight, blk.attn.proj.bias)
        y = F.layer_norm(x, (c,), blk.norm2.weight, blk.norm2.bias, 1e-6)
        y = F.gelu(F.linear(y, blk.mlp.fc1.weight, blk.mlp.fc1.bias))
        x = x + F.linear(y, blk.mlp.fc2.weight, blk.mlp.fc2.bias)
    return F.layer_norm(x, (x.shape[-1],), t.norm.weight, t.norm.bias, 1e-6)


def test_biomedclip_matches_written_out_vit(tiny):
    module, (x,), y = tiny["expert_F"]
    with torch.no_grad():
        x224 = F.interpolate(x.float(), size=(224, 224), mode="bilinear")
        ref = _vit_forward(module, x224)
    assert ref.shape == (1, 197, 32)
    assert (y - _align(ref[:, 1:], 14)).abs().max() < 1e-5
    assert module.trunk.blocks[0].norm1.eps == module.trunk.norm.eps == 1e-6


# ---- ONNX: static export, ONNX Runtime parity ----------------------------------------------------------------------
RESIZES = {"base": 0, "expert_A": 2, "expert_D": 1, "expert_E": 1, "expert_F": 2}   # input resize + grid align


@pytest.mark.parametrize("name", NAMES)
def test_onnx_export_is_static_and_matches_torch(name, tiny, tmp_path):
    import onnx
    import onnxruntime as ort

    from mova_export.export import onnx_from_component

    spec = get_spec(name)
    module, args, y = tiny[name]
    feed = {t.name: a for t, a in zip(spec.inputs(TINY), args)}
    path = tmp_path / f"{name}.onnx"
    onnx_from_component(spec, module, TINY, path, feed=feed)               # checker + declared static shapes
    model = onnx.load(str(path))
    resizes = [n for n in model.graph.node if n.op_type == "Resize"]
    assert len(resizes) == RESIZES[name]                                    # no position-embedding interpolation
    for node in resizes:
        attrs = {a.name: a for a in node.attribute}
        assert attrs["mode"].s == b"linear" and attrs["coordinate_transformation_mode"].s == b"half_pixel"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {k: v.numpy() for k, v in feed.items()})
    ref = y.numpy()
    cos = float((out * ref).sum() / (np.linalg.norm(out) * np.linalg.norm(ref)))
    assert out.shape == ref.shape and cos >= 0.99999
    assert np.abs(out - ref).max() <= 2e-5 * max(1.0, float(np.abs(ref).max()))   # fp32 summation order only


# ---- preprocessing -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pictures():
    from skimage import data

    return {"astronaut": data.astronaut(), "coffee": data.coffee()}          # 512x512, 400x600


def _rows():
    from mova_export.components import image_input_table

    return image_input_table()


def pixel_values(image, kind, cfg):
    from mova_export.core.image_inputs import preprocess_input

    return preprocess_input(image, _rows()[kind], cfg)[0]


@pytest.fixture(scope="module")
def coffee_inputs(pictures):
    from mova_export.core.image_inputs import preprocess

    return preprocess(pictures["coffee"], _rows().values(), TINY)


def test_preprocess_shapes_and_dtypes(coffee_inputs):
    shapes = {"clip672": (1, 3, 672, 672), "dino672": (1, 3, 672, 672), "sam1024": (1, 3, 1024, 1024),
              "pix2struct": (1, 2025, 770), "pix2struct_mask": (1, 2025)}
    assert set(coffee_inputs) == set(shapes)
    for kind, shape in shapes.items():
        a = coffee_inputs[kind]
        assert a.shape == shape and a.dtype == np.float32 and np.isfinite(a).all(), kind
        assert a.flags["C_CONTIGUOUS"]
    # every row a tower declares is produced, and feeds its declared inputs in order
    for name in NAMES:
        spec = get_spec(name)
        arrays = [coffee_inputs[out] for row in spec.image_inputs for out in row.outputs]
        assert [a.shape for a in arrays] == [t.shape for t in spec.inputs(FULL)]


def test_pad_to_square_keeps_the_aspect_ratio(coffee_inputs):
    """A 600x400 picture is centred on a 600x600 canvas: 100 of 600 rows above and below are the pad colour
    (processor mean -> ~0 after normalisation), the picture itself fills the full width."""
    for kind, side in (("clip672", 672), ("dino672", 672), ("sam1024", 1024)):
        a = coffee_inputs[kind][0]
        band = int(side * 100 / 600)
        assert np.abs(a[:, : band - 3]).max() < 0.02, kind                   # top pad band
        assert np.abs(a[:, side - band + 3:]).max() < 0.02, kind             # bottom pad band
        middle = a[:, band + 3: side - band - 3]
        assert middle.std() > 0.3 and np.abs(middle[:, :, :3]).max() > 0.05, kind   # content edge to edge
    patches, mask = coffee_inputs["pix2struct"], coffee_inputs["pix2struct_mask"]
    assert mask.sum() == 2025                                                # square canvas: 45 x 45 patches
    assert patches[0, :, 0].max() == 45 and patches[0, :, 1].max() == 45 and patches[0, :, :2].min() == 1


def test_normalisation_means_map_to_zero():
    from mova_export.components.dinov2 import IMAGENET_MEAN
    from mova_export.components.layers import CLIP_MEAN
    from mova_export.core.image_inputs import pad_color

    clip_grey = np.full((300, 200, 3), pad_color(CLIP_MEAN), dtype=np.uint8)
    for kind in ("clip672", "sam1024"):
        assert np.abs(pixel_values(clip_grey, kind, TINY)).max() < 0.02      # int(255 * m) / 255 vs m
    dino_grey = np.full((64, 64, 3), pad_color(IMAGENET_MEAN), dtype=np.uint8)
    assert np.abs(pixel_values(dino_grey, "dino672", TINY)).max() < 0.02
    # and the scales: white is (1 - mean) / std per channel
    white = pixel_values(np.full((32, 32, 3), 255, np.uint8), "clip672", TINY)[0, :, 0, 0]
    assert np.allclose(white, [(1 - 0.48145466) / 0.26862954, (1 - 0.4578275) / 0.26130258,
                               (1 - 0.40821073) / 0.27577711], atol=1e-4)


def test_pix2struct_patches_without_pad_leave_masked_rows(pictures):
    from mova_export.core.image_inputs import preprocess_input

    patches, mask = preprocess_input(pictures["coffee"], _rows()["pix2struct"], _cfg("tiny", image_aspect_ratio="none"))
    rows, cols = int(patches[0, :, 0].max()), int(patches[0, :, 1].max())
    assert rows < cols and rows * cols == mask.sum() <= 2025                # 3:2 layout, padded with zero rows
    assert np.all(patches[0, mask[0] == 0] == 0)
    valid = patches[0, mask[0] == 1, 2:]
    assert abs(valid.mean()) < 0.05 and abs(valid.std() - 1) < 0.05       # per-image standardisation


def test_load_image_accepts_paths_pil_and_arrays(pictures, tmp_path):
    from PIL import Image

    from mova_export.core.image_inputs import load_image

    rgb = pictures["astronaut"][:40, :60]
    Image.fromarray(rgb).save(tmp_path / "a.png")
    for source in (tmp_path / "a.png", str(tmp_path / "a.png"), Image.fromarray(rgb), rgb):
        out = load_image(source)
        assert out.dtype == np.uint8 and out.shape == (40, 60, 3) and np.array_equal(out, rgb)
    gray = rgb[:, :, 0]
    assert np.array_equal(load_image(gray), np.stack([gray] * 3, axis=-1))
    assert np.array_equal(load_image(gray[:, :, None]), np.stack([gray] * 3, axis=-1))
    rgba = np.concatenate([rgb, np.full((40, 60, 1), 7, np.uint8)], axis=-1)
    assert np.array_equal(load_image(rgba), rgb)
    assert np.array_equal(load_image(Image.fromarray(rgba)), rgb)


@pytest.mark.parametrize("bad, message", [
    ("missing", r"image file .*missing.png does not exist"),
    ("text", r"not an image PIL can read"),
    (np.zeros((8, 8, 3), np.float32), r"dtype float32; pass uint8"),
    (np.zeros((8, 8, 2), np.uint8), r"shape \[8, 8, 2\]"),
    (np.zeros((2, 8, 8, 3), np.uint8), r"shape \[2, 8, 8, 3\]"),
    (np.zeros((0, 8, 3), np.uint8), r"holds no pixels"),
    ([[0, 0], [0, 0]], r"cannot read an image from a list"),
])
def test_load_image_errors_name_the_problem(bad, message, tmp_path):
    from mova_export.core.image_inputs import load_image, preprocess

    if isinstance(bad, str) and bad == "missing":
        bad = tmp_path / "missing.png"
    elif isinstance(bad, str) and bad == "text":
        bad = tmp_path / "notes.png"
        bad.write_text("not a picture")
    for call in (load_image, lambda x: preprocess(x, _rows().values(), TINY)):
        with pytest.raises(RuntimeInputError, match=message) as info:
            call(bad)
        assert "\n" not in str(info.value)

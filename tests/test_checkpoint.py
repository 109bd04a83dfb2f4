"""Checkpoint reading: per-component, memory-mapped, strict; every error names component, key, file and fix.

Round trips run for every registered component on a tiny synthetic checkpoint (written once per session per
format); the error paths run on a KB-sized checkpoint of two fake components registered only for those tests.
"""
import json
import shutil

import pytest
import safetensors.torch
import torch
from torch import nn

from mova_export.components import (
    ComponentSpec,
    MemoryFigures,
    arch,
    component_names,
    get_spec,
    owner_of,
    register,
    unregister,
)
from mova_export.core.errors import CheckpointError, ComponentError
from mova_export.core.progress import NULL
from mova_export.source import checkpoint as checkpoint_module
from mova_export.source.checkpoint import Checkpoint, build_on_meta, describe, describe_config
from mova_export.source.config import FULL_LLM, MoVAConfig
from mova_export.synth import synthetic_config, write_synthetic_checkpoint

REAL_COMPONENTS = component_names()  # captured before any fake spec is registered
FORMATS = ("bin", "safetensors")


def tiny_checkpoint(tmp_path_factory, fmt):
    """The session's tiny synthetic checkpoint (same path from any test module, written once)."""
    path = tmp_path_factory.getbasetemp() / f"mova-tiny-{fmt}"
    if not (path / "config.json").exists():
        write_synthetic_checkpoint(path, scale="tiny", fmt=fmt, console=NULL, components=REAL_COMPONENTS)
    return path


@pytest.fixture(scope="session", params=FORMATS)
def tiny(request, tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory, request.param)


_WRITTEN = {}


def written_tensors(path):
    """Every tensor of a checkpoint, read straight from its files (not through Checkpoint)."""
    if path not in _WRITTEN:
        out = {}
        for f in sorted(path.iterdir()):
            if f.suffix == ".bin":
                out.update(torch.load(f, weights_only=True))
            elif f.suffix == ".safetensors":
                out.update(safetensors.torch.load_file(f))
        _WRITTEN[path] = out
    return _WRITTEN[path]


# ---- every registered component ---------------------------------------------------------------------------------
def test_components_are_registered():
    assert REAL_COMPONENTS, "no component registered: mova_export/components/*.py register themselves on import"


@pytest.mark.parametrize("name", REAL_COMPONENTS)
def test_build_loads_exactly_the_written_tensors(tiny, name):
    ckpt = Checkpoint.open(tiny)
    spec = get_spec(name)
    written = written_tensors(tiny)
    module = ckpt.build(name)
    state = module.state_dict()
    keys = ckpt.component_keys(name)
    assert keys and sorted(state) == sorted(k[len(spec.prefix):] for k in keys)
    assert not module.training
    for rel, value in state.items():
        raw = written[spec.prefix + rel]
        assert value.device.type == "cpu" and value.shape == raw.shape, rel
        if raw.is_floating_point():
            assert value.dtype == torch.float32, rel
            assert torch.equal(value, raw.float()), rel
        else:
            assert torch.equal(value, raw), rel
    loaded = ckpt.load_state_dict(name, dtype=torch.bfloat16)
    assert all(torch.equal(t, written[spec.prefix + rel]) for rel, t in loaded.items())


@pytest.mark.parametrize("name", REAL_COMPONENTS)
def test_build_opens_only_the_component_shards(tiny, name, monkeypatch):
    ckpt = Checkpoint.open(tiny)
    opened = []
    real_open = checkpoint_module._open_shard
    monkeypatch.setattr(checkpoint_module, "_open_shard", lambda path: opened.append(path.name) or real_open(path))
    ckpt.build(name)
    needed = {ckpt.shard_of(k) for k in ckpt.component_keys(name)}
    assert sorted(opened) == sorted(needed)  # each needed shard opened once, no other shard touched
    assert len(ckpt.shards) > 1  # the tiny checkpoint is sharded, so the assertion above can fail


def test_every_synthetic_key_has_exactly_one_owner(tiny):
    ckpt = Checkpoint.open(tiny)
    assert ckpt.unowned_keys() == []
    owners = {k: owner_of(k).name for k in ckpt.keys()}  # owner_of raises on a double claim
    assert set(owners.values()) == set(REAL_COMPONENTS)
    assert sum(len(ckpt.component_keys(n)) for n in REAL_COMPONENTS) == len(ckpt.keys())


def test_describe_matches_the_meta_build(tiny):
    info = describe(tiny)
    cfg = Checkpoint.open(tiny).config
    arch = describe_config(cfg)
    written = written_tensors(tiny)
    assert set(info["components"]) == set(REAL_COMPONENTS) and info["missing_components"] == []
    for name, comp in info["components"].items():
        assert comp["params"] == arch["components"][name]["params"], name
        assert comp["tensors"] == arch["components"][name]["tensors"], name
        assert comp["bytes"] == arch["components"][name]["bytes"], name
        assert comp["dtypes"].keys() <= {"bfloat16", "int64", "int32", "bool", "float32"}
    assert info["totals"]["params"] == sum(t.numel() for t in written.values())
    assert info["totals"]["bytes"] == sum(t.numel() * t.element_size() for t in written.values())
    assert info["totals"]["bytes"] < info["disk_bytes"] < info["totals"]["bytes"] + 20 * 2**20
    assert info["config"]["scale"] == "tiny" and info["config"]["defaulted"] == []
    assert info["unowned_keys"] == [] and info["format"] in FORMATS


def test_text_tokenizer_dir_is_relative_to_the_checkpoint(tiny):
    ckpt = Checkpoint.open(tiny)
    assert ckpt.text_tokenizer_dir == tiny / "text_encoder"


# ---- full-scale architecture without weights ----------------------------------------------------------------------
# Parameter counts from the reference (Table 12 / §2.2 / §4.3): (low, high) in millions, for whatever is registered.
FULL_PARAMS_M = {
    "llm": (8030.26, 8030.27),          # Llama-3-8B, untied lm_head: 8,030,261,248
    "base": (300, 310),                 # CLIP ViT-L/14 with a 2305-row position table
    "expert_A": (1100, 1150),           # DINOv2-giant
    "expert_B": (85, 100),              # SAM-B + net_2
    "expert_C": (300, 320),             # Co-DETR ViT-L
    "expert_D": (500, 530),             # Pix2Struct-large encoder
    "expert_E": (85, 100),              # Deplot encoder
    "expert_F": (85, 90),               # BiomedCLIP ViT-B/16
    "expert_G": (625, 645),             # SAM-H
    "text_encoder": (330, 340),         # BERT-large
    "adapter": (156, 160),              # MoV-Adapter without BERT: 151.5M parameters + 7.1M of RoPE table buffers
}


@pytest.fixture(scope="module")
def full_arch():
    return describe_config(synthetic_config("full"))


def test_full_scale_parameter_counts(full_arch):
    comps = full_arch["components"]
    assert set(comps) == set(REAL_COMPONENTS)
    for name, comp in comps.items():
        low, high = FULL_PARAMS_M.get(name, (0, float("inf")))
        assert low <= comp["params"] / 1e6 <= high, (name, comp["params"])
    if set(FULL_PARAMS_M) <= set(comps):
        assert 11.5e9 < full_arch["totals"]["params"] < 11.9e9  # ~23.4 GB of bf16
        assert 23.0e9 < full_arch["totals"]["bytes"] < 23.8e9


# ---- fake components: error paths on a KB-sized checkpoint ----------------------------------------------------------
class _Fake(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.proj = nn.Linear(width, 3)
        self.norm = nn.LayerNorm(3)
        self.register_buffer("table", torch.arange(6.0).reshape(2, 3))
        self.register_buffer("scratch", torch.ones(2), persistent=False)


def _fake_spec(name, tiny_width=4):
    return ComponentSpec(name=name, kind="tower", prefix=f"model.{name}.", memory=MemoryFigures(0, (1, 1)),
                         presets={"full": {"width": 8}, "tiny": {"width": tiny_width}},
                         build=lambda cfg: _Fake(arch(cfg, name)["width"]), inputs=lambda cfg: (),
                         outputs=lambda cfg: (), unused_keys=("head.*",))


FAKES = ("fake_a", "fake_b")


@pytest.fixture
def fakes():
    for name in FAKES:
        register(_fake_spec(name))
    yield
    for name in FAKES:
        unregister(name)


@pytest.fixture(params=FORMATS)
def fake_ckpt(request, fakes, tmp_path):
    cfg = MoVAConfig(llm=dict(FULL_LLM), scale="tiny")
    return write_synthetic_checkpoint(tmp_path / "ckpt", config=cfg, fmt=request.param, shard_size=40,
                                      components=FAKES, console=NULL)


def _index_path(path):
    return next(p for p in path.glob("*.index.json"))


def _edit_shard(path, key_in_shard, edit):
    """Apply edit(state_dict) to the shard holding key_in_shard and keep the index in step."""
    index_path = _index_path(path)
    index = json.loads(index_path.read_text())
    shard = path / index["weight_map"][key_in_shard]
    if shard.suffix == ".bin":
        state = dict(torch.load(shard, weights_only=True))
    else:
        state = safetensors.torch.load_file(shard)
    edit(state)
    if shard.suffix == ".bin":
        torch.save(state, shard)
    else:
        safetensors.torch.save_file(state, shard)
    weight_map = {k: v for k, v in index["weight_map"].items() if v != shard.name}
    weight_map.update({k: shard.name for k in state})
    index_path.write_text(json.dumps({**index, "weight_map": weight_map}))
    return shard.name


def test_fake_round_trip_and_layout(fake_ckpt):
    ckpt = Checkpoint.open(fake_ckpt)
    assert len(ckpt.shards) > 2 and ckpt.keys() == sorted(ckpt.keys())
    module = ckpt.build("fake_a")
    assert torch.equal(module.table, torch.arange(6.0).reshape(2, 3))  # buffer kept its real value
    assert torch.equal(module.scratch, torch.ones(2))  # non-persistent buffer built for real, not meta
    assert 0.9 < module.norm.weight.mean() < 1.1 and module.norm.bias.abs().max() > 0
    assert all(p.device.type == "cpu" for p in module.parameters())
    got = dict(ckpt.tensors(ckpt.component_keys("fake_b"), dtype=torch.float16))
    assert got["model.fake_b.table"].dtype == torch.float16 and len(got) == 5
    bf16 = ckpt.build("fake_b", dtype=torch.bfloat16)
    assert bf16.proj.weight.dtype == torch.bfloat16 and torch.equal(bf16.proj.weight, got["model.fake_b.proj.weight"]
                                                                    .to(torch.bfloat16))


def test_fake_build_opens_only_its_shards(fake_ckpt, monkeypatch):
    ckpt = Checkpoint.open(fake_ckpt)
    opened = []
    real_open = checkpoint_module._open_shard
    monkeypatch.setattr(checkpoint_module, "_open_shard", lambda path: opened.append(path.name) or real_open(path))
    ckpt.build("fake_a")
    only_b = {ckpt.shard_of(k) for k in ckpt.component_keys("fake_b")} - {ckpt.shard_of(k) for k in
                                                                          ckpt.component_keys("fake_a")}
    assert only_b and not only_b & set(opened)
    assert sorted(opened) == sorted({ckpt.shard_of(k) for k in ckpt.component_keys("fake_a")})


BIG_WIDTH = 20_000_000  # fake_big.proj.weight: 3 x 20M bf16 = 120 MB

_RSS_CHILD = """
import sys
sys.path.insert(0, sys.argv[2])
from test_checkpoint import _fake_spec, BIG_WIDTH
from mova_export.source.checkpoint import Checkpoint
from mova_export.components import register
register(_fake_spec("fake_a"))
register(_fake_spec("fake_big", BIG_WIDTH))
def status(field):
    line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
    return int(line.split()[1])
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
before = status("VmRSS")
Checkpoint.open(sys.argv[1]).build("fake_a")
print(status("VmHWM") - before)
"""


@pytest.mark.parametrize("fmt", FORMATS)
def test_building_a_small_component_reads_nothing_else(fmt, tmp_path):
    """One file holds fake_a (bytes) and fake_big (120 MB): building fake_a must not raise the peak RSS."""
    import subprocess
    import sys
    from pathlib import Path

    register(_fake_spec("fake_a"))
    register(_fake_spec("fake_big", BIG_WIDTH))
    try:
        path = write_synthetic_checkpoint(tmp_path / "ckpt", config=MoVAConfig(llm=dict(FULL_LLM), scale="tiny"),
                                          fmt=fmt, components=["fake_a", "fake_big"], shard_size=2**30,
                                          console=NULL)
    finally:
        unregister("fake_a")
        unregister("fake_big")
    assert len(list(path.glob("*model*"))) == 1  # a single file holds both components
    out = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(path), str(Path(__file__).parent)],
                         capture_output=True, text=True, check=True)
    grown_kib = int(out.stdout.split()[-1])
    assert grown_kib < 30 * 1024, f"building fake_a raised the peak RSS by {grown_kib / 1024:.0f} MiB"


def test_single_file_checkpoints(fakes, tmp_path):
    cfg = MoVAConfig(llm=dict(FULL_LLM), scale="tiny")
    for fmt, name in (("bin", "pytorch_model.bin"), ("safetensors", "model.safetensors")):
        path = write_synthetic_checkpoint(tmp_path / fmt, config=cfg, fmt=fmt, components=FAKES, console=NULL)
        assert (path / name).is_file() and not list(path.glob("*.index.json"))
        ckpt = Checkpoint.open(path)
        assert ckpt.shards == [name] and len(ckpt.keys()) == 10
        assert torch.equal(ckpt.build("fake_a").table, torch.arange(6.0).reshape(2, 3))


def test_unused_keys_are_skipped(fake_ckpt):
    _edit_shard(fake_ckpt, "model.fake_a.proj.weight", lambda s: s.update({"model.fake_a.head.weight": torch.ones(2)}))
    ckpt = Checkpoint.open(fake_ckpt)
    assert "model.fake_a.head.weight" in ckpt.component_keys("fake_a")
    assert "head.weight" not in ckpt.build("fake_a").state_dict()
    assert describe(fake_ckpt)["components"]["fake_a"]["unused_keys"] == 1


def test_wrong_path(tmp_path):
    with pytest.raises(CheckpointError, match=r"checkpoint directory .*nope does not exist; pass the folder"):
        Checkpoint.open(tmp_path / "nope")


def test_missing_config(fake_ckpt):
    (fake_ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config.json not found; a MoVA checkpoint folder holds config.json"):
        Checkpoint.open(fake_ckpt)


def test_missing_index(fake_ckpt):
    index = _index_path(fake_ckpt)
    index.unlink()
    with pytest.raises(CheckpointError, match=rf"holds shards .* but no {index.name}; download the index"):
        Checkpoint.open(fake_ckpt)
    for shard in fake_ckpt.glob("*model-*"):
        shard.unlink()
    with pytest.raises(CheckpointError, match=r"no weights in .*: expected pytorch_model.bin.index.json"):
        Checkpoint.open(fake_ckpt)


def test_corrupt_index(fake_ckpt):
    _index_path(fake_ckpt).write_text("{")
    with pytest.raises(CheckpointError, match=r"index.json is not a shard index .*re-download it"):
        Checkpoint.open(fake_ckpt)


def test_index_points_at_missing_shard(fake_ckpt):
    ckpt = Checkpoint.open(fake_ckpt)
    key = ckpt.component_keys("fake_b")[0]
    shard = ckpt.shard_of(key)
    (fake_ckpt / shard).unlink()
    with pytest.raises(CheckpointError, match=rf"maps \d+ key\(s\) \(e.g. model\.fake_\w+\.\S+ of component fake_\w\) "
                                              rf"to {shard}, which is missing from .*; download it"):
        Checkpoint.open(fake_ckpt)


@pytest.mark.parametrize("keep", [0.5, 0.98])
def test_truncated_shard(fake_ckpt, keep):
    ckpt = Checkpoint.open(fake_ckpt)
    key = ckpt.component_keys("fake_a")[0]
    shard = fake_ckpt / ckpt.shard_of(key)
    data = shard.read_bytes()
    shard.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=rf"cannot read .*{shard.name} \(needed for key model\.fake_a\.\S+ of "
                                              r"component fake_a\): .*truncated or corrupt, re-download it"):
        Checkpoint.open(fake_ckpt).build("fake_a")


def test_truncated_real_shard(tiny, tmp_path):
    """Truncate a copy of one real shard of the tiny checkpoint (the others are linked, not copied)."""
    name = REAL_COMPONENTS[0]
    ckpt = Checkpoint.open(tiny)
    key = ckpt.component_keys(name)[0]
    target = ckpt.shard_of(key)
    copy = tmp_path / "ckpt"
    copy.mkdir()
    for f in tiny.iterdir():
        if f.name == target:
            (copy / f.name).write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        else:
            (copy / f.name).symlink_to(f)
    with pytest.raises(CheckpointError, match=rf"cannot read .*{target} \(needed for key \S+ of component {name}\)"):
        Checkpoint.open(copy).build(name)
    others = [n for n in REAL_COMPONENTS if target not in {ckpt.shard_of(k) for k in ckpt.component_keys(n)}]
    if others:  # a component whose shards are intact still builds
        Checkpoint.open(copy).build(others[-1])


def test_missing_key(fake_ckpt):
    shard = _edit_shard(fake_ckpt, "model.fake_a.norm.bias", lambda s: s.pop("model.fake_a.norm.bias"))
    assert shard
    with pytest.raises(CheckpointError, match=r"component fake_a: key model\.fake_a\.norm\.bias is missing from "
                                              r".*index\.json \(1 of 5 missing\).*re-download"):
        Checkpoint.open(fake_ckpt).build("fake_a")
    Checkpoint.open(fake_ckpt).build("fake_b")  # the other component is unaffected


def test_unexpected_key_inside_prefix(fake_ckpt):
    shard = _edit_shard(fake_ckpt, "model.fake_a.proj.weight",
                        lambda s: s.update({"model.fake_a.proj.extra": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=rf"component fake_a: unexpected key model\.fake_a\.proj\.extra in "
                                              rf"{shard} .*add the pattern to the fake_a spec's unused_keys"):
        Checkpoint.open(fake_ckpt).build("fake_a")


def test_mis_shaped_key(fake_ckpt):
    shard = _edit_shard(fake_ckpt, "model.fake_a.proj.weight",
                        lambda s: s.update({"model.fake_a.proj.weight": torch.zeros(3, 5, dtype=torch.bfloat16)}))
    with pytest.raises(CheckpointError, match=rf"component fake_a: key model\.fake_a\.proj\.weight in {shard} .*has "
                                              r"shape \[3, 5\], the module built from config.json expects \[3, 4\]"):
        Checkpoint.open(fake_ckpt).build("fake_a")


def test_key_in_index_but_not_in_shard(fake_ckpt):
    index_path = _index_path(fake_ckpt)
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    key = "model.fake_a.proj.weight"
    wrong = next(s for s in shards if s != index["weight_map"][key])
    index["weight_map"][key] = wrong
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"key {key} \(fake_a\) is listed in .* under {wrong}, but .* does "
                                              "not hold it; re-download"):
        Checkpoint.open(fake_ckpt).build("fake_a")


def test_keys_no_component_owns(fake_ckpt):
    shard = _edit_shard(fake_ckpt, "model.fake_a.proj.weight", lambda s: s.update({"model.nobody.weight": torch.ones(1)}))
    with pytest.raises(CheckpointError, match=rf"1 checkpoint key\(s\) belong to no component, e.g. model\.nobody\."
                                              rf"weight in {shard} .*register a component"):
        Checkpoint.open(fake_ckpt)
    ckpt = Checkpoint.open(fake_ckpt, check_owners=False)
    assert ckpt.unowned_keys() == ["model.nobody.weight"]
    assert describe(fake_ckpt)["unowned_keys"] == ["model.nobody.weight"]
    ckpt.build("fake_a")


def test_unknown_component_and_key(fake_ckpt):
    ckpt = Checkpoint.open(fake_ckpt)
    with pytest.raises(ComponentError, match="unknown component 'nope'"):
        ckpt.build("nope")
    with pytest.raises(CheckpointError, match=r"key model\.fake_a\.nope \(fake_a\) is not in .*index\.json"):
        ckpt.shard_of("model.fake_a.nope")


def test_missing_text_encoder_folder(fake_ckpt):
    shutil.rmtree(fake_ckpt / "text_encoder", ignore_errors=True)
    ckpt = Checkpoint.open(fake_ckpt)
    with pytest.raises(CheckpointError, match=r"BERT vocab folder for component text_encoder not found"):
        _ = ckpt.text_tokenizer_dir


def test_meta_build_keeps_buffers_real(fakes):
    module = build_on_meta(get_spec("fake_a"), MoVAConfig(llm=dict(FULL_LLM), scale="full"))
    assert module.proj.weight.device.type == "meta" and module.proj.weight.shape == (3, 8)
    assert module.table.device.type == "cpu" and module.scratch.device.type == "cpu"
    assert nn.Linear(2, 2).weight.device.type == "cpu"  # the patch is undone

"""Synthetic checkpoints: official layout, same bytes for a seed, sane values, streamed shard by shard, atomic."""
import json
import re
from collections import namedtuple

import pytest
import safetensors.torch
import torch

from mova_export import synth
from mova_export.components import arch, component_names, expert_index, expert_specs, get_spec
from mova_export.core.errors import CheckpointError
from mova_export.core.progress import NULL
from mova_export.source.checkpoint import Checkpoint, build_on_meta
from mova_export.source.config import MoVAConfig
from mova_export.synth import DEFAULT_SHARD_SIZE, plan_tensors, synthetic_config, write_synthetic_checkpoint

REAL_COMPONENTS = component_names()


def tiny_checkpoint(tmp_path_factory, fmt):
    """The session's tiny synthetic checkpoint (same path as in test_checkpoint, so it is written once)."""
    path = tmp_path_factory.getbasetemp() / f"mova-tiny-{fmt}"
    if not (path / "config.json").exists():
        write_synthetic_checkpoint(path, scale="tiny", fmt=fmt, console=NULL, components=REAL_COMPONENTS)
    return path


@pytest.fixture(scope="module")
def tiny_bin(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory, "bin")


@pytest.fixture(scope="module")
def tiny_st(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory, "safetensors")


def _smallest_component():
    plan = plan_tensors(synthetic_config("tiny"))
    sizes = {n: sum(e.nbytes for e in plan if get_spec(n).owns(e.key)) for n in REAL_COMPONENTS}
    return min(sizes, key=sizes.get)


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _tensors(root):
    out = {}
    for f in sorted(root.iterdir()):
        if f.suffix == ".bin":
            out.update(torch.load(f, weights_only=True))
        elif f.suffix == ".safetensors":
            out.update(safetensors.torch.load_file(f))
    return out


def test_same_seed_same_bytes(tiny_bin, tmp_path):
    again = write_synthetic_checkpoint(tmp_path / "again", scale="tiny", seed=0, console=NULL,
                                       components=REAL_COMPONENTS)
    assert _files(again) == _files(tiny_bin)
    for name in _files(again):
        assert (again / name).read_bytes() == (tiny_bin / name).read_bytes(), name


def test_seed_changes_parameters_not_buffers():
    plan = plan_tensors(synthetic_config("tiny"))
    buffers = [e for e in plan if e.buffer is not None]
    params = [e for e in plan if e.buffer is None]
    assert params
    assert all(torch.equal(synth.make_tensor(e, 0), synth.make_tensor(e, 1)) for e in buffers)
    assert all(not torch.equal(synth.make_tensor(e, 0), synth.make_tensor(e, 1)) for e in params if
               e.nbytes > 8)


def test_bin_and_safetensors_hold_the_same_tensors(tiny_bin, tiny_st):
    a, b = _tensors(tiny_bin), _tensors(tiny_st)
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_layout_config_and_index(tiny_bin):
    raw = json.loads((tiny_bin / "config.json").read_text())
    cfg = MoVAConfig.from_checkpoint(tiny_bin)
    assert cfg == synthetic_config("tiny") and cfg.defaulted == ()
    assert raw["model_type"] == "mova_llama" and raw["mova_export"]["scale"] == "tiny"
    assert raw["torch_dtype"] == "bfloat16" and raw["mm_projector_text_encoder"] == "text_encoder"
    for spec in expert_specs():
        assert cfg.expert_channels[expert_index(spec.name)] == spec.out_channels(arch(cfg, spec.name)), spec.name
    if "base" in REAL_COMPONENTS and get_spec("base").out_channels:
        assert cfg.mm_hidden_size == get_spec("base").out_channels(arch(cfg, "base"))
    generation = json.loads((tiny_bin / "generation_config.json").read_text())
    assert generation == {"bos_token_id": cfg.llm["bos_token_id"], "eos_token_id": cfg.llm["eos_token_id"]}

    index = json.loads((tiny_bin / "pytorch_model.bin.index.json").read_text())
    tensors = _tensors(tiny_bin)
    assert index["weight_map"].keys() == tensors.keys()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all(re.fullmatch(rf"pytorch_model-\d{{5}}-of-{len(shards):05d}\.bin", s) for s in shards)
    assert all((tiny_bin / s).stat().st_size < DEFAULT_SHARD_SIZE["tiny"] + 2**20 for s in shards)
    assert sum((tiny_bin / f).stat().st_size for f in _files(tiny_bin)) < 50 * 2**20
    assert not list(tiny_bin.parent.glob(".mova-tiny-bin.*"))  # no temp folder left beside it


def test_tokenizer_files(tiny_bin):
    pytest.importorskip("mova_export.tokenizers", reason="mova_export/tokenizers.py not landed yet")
    files = _files(tiny_bin)
    assert "tokenizer.json" in files and any(f.startswith("text_encoder/") for f in files)
    assert Checkpoint.open(tiny_bin).text_tokenizer_dir == tiny_bin / "text_encoder"


def test_values_are_sane(tiny_bin):
    tensors = _tensors(tiny_bin)
    cfg = synthetic_config("tiny")
    for name in REAL_COMPONENTS:
        spec = get_spec(name)
        module = build_on_meta(spec, cfg)
        params = {n for n, _ in module.named_parameters(remove_duplicate=False)}
        norms = {f"{m}.weight" for m, sub in module.named_modules() if "norm" in type(sub).__name__.lower()}
        for rel, ref in module.state_dict().items():
            t = tensors[spec.prefix + rel]
            assert torch.isfinite(t.float()).all(), rel
            if rel not in params:  # buffers carry their real values
                want = ref.to(torch.bfloat16) if ref.is_floating_point() else ref
                assert torch.equal(t, want), (name, rel)
            elif rel in norms:
                assert abs(t.float().mean() - 1) < 0.05, (name, rel)
            else:
                assert t.abs().max() > 0 and t.float().std() < 0.05, (name, rel)  # nothing left at zero


def test_streams_shard_by_shard(tmp_path, monkeypatch):
    """Each shard's tensors are generated right before it is saved and dropped after: one shard in RAM."""
    events = []
    make, save = synth.make_tensor, synth._save_shard
    monkeypatch.setattr(synth, "make_tensor", lambda e, seed, *trained: events.append(("make", e.key, e.nbytes)) or
                        make(e, seed, *trained))
    monkeypatch.setattr(synth, "_save_shard", lambda tensors, path, fmt: events.append(("save", set(tensors))) or
                        save(tensors, path, fmt))
    size = DEFAULT_SHARD_SIZE["tiny"] // 4
    write_synthetic_checkpoint(tmp_path / "ckpt", scale="tiny", shard_size=size, console=NULL,
                               components=REAL_COMPONENTS)
    saves = [i for i, e in enumerate(events) if e[0] == "save"]
    assert len(saves) > 4
    start = 0
    for i in saves:
        made = events[start:i]
        assert events[i][1] == {e[1] for e in made}
        assert sum(e[2] for e in made) <= size or len(made) == 1
        start = i + 1
    assert start == len(events)


def test_full_scale_plan_fits_shards():
    plan = plan_tensors(synthetic_config("full"))
    shards = synth._shard_plan(plan, DEFAULT_SHARD_SIZE["full"])
    total = sum(e.nbytes for e in plan)
    assert 23.0e9 < total < 23.8e9 if set(REAL_COMPONENTS) >= {"llm", "base", "adapter"} else total > 0
    assert all(sum(e.nbytes for e in s) <= DEFAULT_SHARD_SIZE["full"] for s in shards)
    assert all(e.dtype in (torch.bfloat16, torch.int64, torch.int32, torch.bool) for e in plan)


def test_refuses_a_non_empty_folder_and_overwrites_atomically(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    name = _smallest_component()
    with pytest.raises(CheckpointError, match=r"out exists and is not empty; .*overwrite=True \(CLI: --overwrite\)"):
        write_synthetic_checkpoint(out, components=[name], console=NULL)
    assert (out / "keep.txt").read_text() == "mine"
    write_synthetic_checkpoint(out, components=[name], console=NULL, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    Checkpoint.open(out).build(name)


def test_failure_leaves_no_half_written_checkpoint(tmp_path, monkeypatch):
    name = _smallest_component()
    out = tmp_path / "out"
    write_synthetic_checkpoint(out, components=[name], console=NULL)
    before = {f: (out / f).read_bytes() for f in _files(out)}

    def broken(tensors, path, fmt):
        raise OSError("disk full")

    monkeypatch.setattr(synth, "_save_shard", broken)
    with pytest.raises(OSError, match="disk full"):
        write_synthetic_checkpoint(out, components=[name], console=NULL, overwrite=True, seed=1)
    with pytest.raises(OSError, match="disk full"):
        write_synthetic_checkpoint(tmp_path / "new", components=[name], console=NULL)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert {f: (out / f).read_bytes() for f in _files(out)} == before


def test_disk_space_and_argument_errors(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="unknown synthetic scale 'huge'"):
        write_synthetic_checkpoint(tmp_path / "a", scale="huge", console=NULL)
    with pytest.raises(CheckpointError, match="unknown checkpoint format 'gguf'"):
        write_synthetic_checkpoint(tmp_path / "a", fmt="gguf", console=NULL)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(synth.shutil, "disk_usage", lambda p: usage(10, 10, 1000))
    with pytest.raises(CheckpointError, match=r"not enough disk space in .*: the checkpoint needs .* GB are free"):
        write_synthetic_checkpoint(tmp_path / "a", scale="tiny", console=NULL)
    assert not list(tmp_path.iterdir())

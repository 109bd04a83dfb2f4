"""The bundle: manifest and hashes, refusal of tampered or corrupted files, one-line errors for bad arguments, and
the vision side run from the bundle in ONNX Runtime against the PyTorch reference."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from mova_export.bundle import FORMAT_VERSION, describe_bundle, export_bundle, load_bundle, sha256_file
from mova_export.errors import BundleError, CheckpointError, ComponentError
from mova_export.validate import compare
from test_export import tiny_bundle


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_bundle(tmp_path_factory)


@pytest.fixture()
def bundle_copy(tiny, tmp_path):
    return Path(shutil.copytree(tiny[1], tmp_path / "bundle"))


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


# ---- manifest ---------------------------------------------------------------------------------------------------

def test_manifest_lists_every_file_with_its_sha256(tiny):
    checkpoint, bundle = tiny
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION
    on_disk = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file())
    assert sorted([*manifest["files"], "manifest.json"]) == sorted(on_disk)
    for rel, meta in manifest["files"].items():
        assert sha256_file(bundle / rel) == meta["sha256"] and (bundle / rel).stat().st_size == meta["bytes"], rel
    for name, graph in manifest["graphs"].items():
        assert graph["inputs"] and graph["outputs"]
        for precision, variant in graph["variants"].items():
            assert variant["graph"] == f"graphs/{name}.{precision}.onnx" and variant["graph"] in manifest["files"]
    assert "tokenizer/text/vocab.txt" in manifest["files"]
    assert any(f.startswith("tokenizer/llm/tokenizer") for f in manifest["files"])
    source = manifest["source_checkpoint"]
    assert source["config_sha256"] == sha256_file(Path(checkpoint) / "config.json") and source["shards"]
    assert all(s["bytes"] == (Path(checkpoint) / s["name"]).stat().st_size for s in source["shards"])
    assert {"torch", "onnx", "onnxruntime", "mova_export"} <= set(manifest["tools"])
    assert manifest["export"]["opset"] >= 18 and "dynamo=False" in manifest["export"]["exporter"]
    adapter = {t["name"]: t for t in manifest["graphs"]["adapter"]["inputs"]}
    assert adapter["routing_mask"]["shape"] == [1, 7]
    text = manifest["graphs"]["text_encoder"]["inputs"]
    assert [t["shape"][1] for t in text] == [manifest["config"]["text_max_length"]] * len(text)


def test_describe_bundle_summarises_graphs(tiny):
    info = describe_bundle(tiny[1])
    assert info["kind"] == "bundle" and info["verified"] and len(info["graphs"]) == 2 * len(info["components"])
    row = next(g for g in info["graphs"] if g["component"] == "adapter" and g["precision"] == "fp32")
    assert row["parity_samples"] >= 64 and row["min_cosine"] >= 0.99999
    json.dumps(info)  # JSON-friendly for `inspect --json`


# ---- refusal of modified bundles ----------------------------------------------------------------------------------

def test_tampered_graph_is_refused_naming_the_file(bundle_copy):
    graph = bundle_copy / "graphs" / "adapter.fp32.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes
    graph.write_bytes(bytes(data))
    with pytest.raises(BundleError) as info:
        load_bundle(bundle_copy)
    assert "graphs/adapter.fp32.onnx does not match its sha256" in _one_line(info)


def test_truncated_missing_and_unlisted_files_are_refused(bundle_copy):
    graph = bundle_copy / "graphs" / "base.fp16.onnx"
    graph.write_bytes(graph.read_bytes()[:100])
    with pytest.raises(BundleError, match="file graphs/base.fp16.onnx has 100 bytes"):
        load_bundle(bundle_copy)
    graph.unlink()
    with pytest.raises(BundleError, match="file graphs/base.fp16.onnx listed in the manifest is missing"):
        load_bundle(bundle_copy)
    load_bundle(bundle_copy, verify=False)  # an explicit opt-out still reads the manifest
    shutil.copy(bundle_copy / "graphs" / "base.fp32.onnx", bundle_copy / "graphs" / "base.fp16.onnx")
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["files"]["graphs/base.fp16.onnx"] = manifest["files"]["graphs/base.fp32.onnx"]
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    (bundle_copy / "graphs" / "extra.onnx").write_bytes(b"not a graph")
    with pytest.raises(BundleError, match="graphs/extra.onnx are not in the manifest"):
        load_bundle(bundle_copy)


def test_not_a_bundle_is_refused(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nope")
    with pytest.raises(BundleError, match="has no manifest.json"):
        load_bundle(tmp_path)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(BundleError, match="is not valid JSON"):
        load_bundle(tmp_path)


# ---- bad arguments: one-line typed errors, before any slow work, nothing left behind ------------------------------

def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError) as info:
        export_bundle(tmp_path / "no-such-checkpoint", tmp_path / "out", progress=False)
    assert f"checkpoint directory {tmp_path / 'no-such-checkpoint'} does not exist" in _one_line(info)
    assert not (tmp_path / "out").exists()


def test_unknown_component(tiny, tmp_path):
    with pytest.raises(ComponentError) as info:
        export_bundle(tiny[0], tmp_path / "out", components=["base", "expert_Z"], progress=False)
    assert "unknown component 'expert_Z'; known: base, expert_A" in _one_line(info)
    with pytest.raises(ComponentError, match="'llm' is not exported to ONNX"):
        export_bundle(tiny[0], tmp_path / "out", components=["llm"], progress=False)
    assert list(tmp_path.iterdir()) == []


def test_output_dir_not_writable(tiny, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(BundleError) as info:
        export_bundle(tiny[0], blocker / "bundle", components=["base"], progress=False)
    assert f"output folder {blocker} is not writable" in _one_line(info)
    if os.geteuid() != 0:  # root ignores permission bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(BundleError, match="is not writable"):
            export_bundle(tiny[0], locked / "bundle", components=["base"], progress=False)


def test_existing_bundle_needs_overwrite(tiny, tmp_path):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(BundleError, match="exists and is not empty; pass --overwrite"):
        export_bundle(tiny[0], out, components=["base"], progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    export_bundle(tiny[0], out, components=["text_encoder"], progress=False, overwrite=True, random_samples=0)
    assert load_bundle(out).components == ["text_encoder"] and not (out / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no temp or old dirs left


# ---- the vision side from the bundle ------------------------------------------------------------------------------

def test_vision_side_matches_the_reference(tiny):
    import torch

    from mova_export.reference import ReferencePipeline, sample_images
    from mova_export.vision import VisionSession

    checkpoint, bundle = tiny
    image, question = sample_images()["chelsea"], "What animal is this?"
    mask = [1, 0, 0, 1, 0, 1, 0]  # A, D, F: a top-3 routing
    session = VisionSession(bundle)
    state = session.routing_pass(image, question)
    image_tokens = session.answer_pass(state, mask)
    assert sorted(state.experts) == ["expert_A", "expert_D", "expert_F"]  # only the routed experts ran

    ref = ReferencePipeline(checkpoint)
    from mova_export.preprocess import load_image, preprocess

    with torch.inference_mode():
        inputs = preprocess(load_image(image), ref.cfg)
        base = ref.module("base")(torch.from_numpy(inputs["clip672"]))
        text = ref.text_features(question)
        _, routing_tokens = ref.adapter(base, [None] * 7, text, [0] * 7)
        experts = ref.expert_features(inputs, mask)
        ref_tokens, _ = ref.adapter(base, experts, text, mask)
    compare({"routing_tokens": routing_tokens.numpy()}, {"routing_tokens": state.routing_tokens},
            component="vision routing pass")
    compare({"image_tokens": ref_tokens.numpy()}, {"image_tokens": image_tokens}, component="vision answer pass")
    assert np.array_equal(session.answer_pass(state, [0] * 7), state.image_tokens)

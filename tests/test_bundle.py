"""The bundle: manifest and hashes, refusal of tampered or corrupted files, one-line errors for bad arguments,
`mova-export inspect` on every kind of bundle the recipes produce, and the vision side run from the bundle in ONNX
Runtime against the PyTorch reference."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from helpers import cli_error, one_line

from mova_export.bundle import FORMAT_VERSION, load_bundle, sha256_file
from mova_export.cli import main
from mova_export.cli.inspect import describe_bundle
from mova_export.core.errors import BuildError, BundleError, CheckpointError, ComponentError, RuntimeInputError
from mova_export.core.tolerance import compare_outputs
from mova_export.pipeline import BuildRequest, export_bundle

GRAPHS = ["base", *(f"expert_{c}" for c in "ABCDEFG"), "text_encoder", "adapter_routing", "adapter_slots3", "adapter"]


@pytest.fixture()
def bundle_copy(export_only, tmp_path):
    """A private copy (real copies, not the export's hard links into the work folder) to tamper with."""
    return Path(shutil.copytree(export_only, tmp_path / "bundle"))


def _files_on_disk(bundle: Path) -> list[str]:
    return sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file())


# ---- manifest ---------------------------------------------------------------------------------------------------

def test_manifest_lists_every_file_with_its_sha256(tiny_checkpoint, export_only):
    bundle = export_only
    raw = json.loads((bundle / "manifest.json").read_text())
    assert raw["format_version"] == FORMAT_VERSION == 2
    m = load_bundle(bundle).manifest
    # build.log is appended to until the build ends, so it is the one file outside the table (with the manifest)
    assert sorted([*m.files, "manifest.json", "build.log"]) == _files_on_disk(bundle)
    for rel, meta in m.files.items():
        assert sha256_file(bundle / rel) == meta["sha256"] and (bundle / rel).stat().st_size == meta["bytes"], rel
    for name, graph in m.graphs.items():
        assert graph.inputs and graph.outputs
        for precision, variant in graph.variants.items():
            assert variant.graph == f"graphs/{name}.{precision}.onnx" and variant.graph in m.files
            assert variant.files == [variant.graph]
            opset = next(o.version for o in onnx.load(str(bundle / variant.graph), load_external_data=False)
                         .opset_import if o.domain in ("", "ai.onnx"))
            assert opset >= 18, (name, precision)
    assert "tokenizer/text/vocab.txt" in m.files
    assert any(f.startswith("tokenizer/llm/tokenizer") for f in m.files)
    source = m.source_checkpoint
    assert source["config_sha256"] == sha256_file(tiny_checkpoint / "config.json") and source["shards"]
    assert all(s["bytes"] == (tiny_checkpoint / s["name"]).stat().st_size for s in source["shards"])
    assert {"torch", "onnx", "onnxruntime", "mova_export"} <= set(m.tools)
    adapter = {t.name: t for t in m.graphs["adapter"].inputs}
    assert adapter["routing_mask"].shape == (1, 7)
    text = m.graphs["text_encoder"]
    assert [t.shape[1] for t in text.inputs] == ["text_length"] * len(text.inputs)
    assert text.axes == {"text_length": list(m.model.text_buckets)} and m.model.text_buckets == (64, 128, 512)
    assert m.llm is None and m.runtime.precision == {name: "fp32" for name in GRAPHS}


def test_describe_bundle_summarises_graphs(export_only):
    info = describe_bundle(export_only)
    assert info["kind"] == "bundle" and info["verified"] and len(info["graphs"]) == 2 * len(GRAPHS)
    row = next(g for g in info["graphs"] if g["graph"] == "adapter_slots3" and g["precision"] == "fp32")
    assert row["parity_samples"] >= 63 and row["min_cosine"] >= 0.99999 and row["shipped"]
    json.dumps(info)  # JSON-friendly for `inspect --json`


def test_bundle_folder_has_normal_permissions(export_only, cpu_build):
    umask = os.umask(0)
    os.umask(umask)
    for bundle in (export_only, cpu_build.bundle):
        assert bundle.stat().st_mode & 0o777 == 0o777 & ~umask, oct(bundle.stat().st_mode)   # not drwx------
        for p in bundle.rglob("*"):   # every file and folder as readable as the umask allows (no 0600 temp files)
            assert p.stat().st_mode & 0o044 == 0o044 & ~umask, p


def test_a_shipped_graph_is_linked_and_its_external_data_copied_so_onnx_still_reads_both(tmp_path):
    # onnx refuses external data with several hard links; linking it into a bundle broke the next build reusing it
    from onnx import TensorProto, helper, numpy_helper

    from mova_export.bundle import Variant
    from mova_export.pipeline.assemble import ship_variant

    unit = tmp_path / "unit" / "graphs"
    unit.mkdir(parents=True)
    weight = numpy_helper.from_array(np.arange(4096, dtype=np.float32).reshape(64, 64), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [weight])
    onnx.save_model(helper.make_model(graph), str(unit / "g.onnx"), save_as_external_data=True,
                    location="g.onnx.data", size_threshold=0)
    source = Variant(graph="graphs/g.onnx", files=["graphs/g.onnx", "graphs/g.onnx.data"], bytes=0)

    shipped = ship_variant(tmp_path / "bundle", source, tmp_path / "unit")

    assert shipped.files == ["graphs/g.onnx", "graphs/g.onnx.data"]
    bundle = tmp_path / "bundle" / "graphs"
    assert (bundle / "g.onnx").stat().st_ino == (unit / "g.onnx").stat().st_ino       # the graph: one inode
    assert (bundle / "g.onnx.data").stat().st_nlink == (unit / "g.onnx.data").stat().st_nlink == 1
    for folder in (unit, bundle):
        w = numpy_helper.to_array(onnx.load(str(folder / "g.onnx")).graph.initializer[0])
        assert w[63, 63] == 4095.0


def test_tiny_cpu_bundle_is_small(cpu_build):
    m = cpu_build.manifest
    total = sum(f["bytes"] for f in m.files.values())
    assert total < 60 * 2**20, f"{total / 2**20:.1f} MiB"
    # it ships what the recipe runs, nothing else: one variant per graph, one GGUF
    assert all(list(g.variants) == [m.runtime.precision[n]] for n, g in m.graphs.items())
    assert list(m.llms) == ["q4_k_m"] and not (cpu_build.bundle / "checks").exists()


# ---- refusal of modified bundles ----------------------------------------------------------------------------------

def test_tampered_graph_is_refused_naming_the_file(bundle_copy):
    graph = bundle_copy / "graphs" / "adapter.fp32.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes
    graph.write_bytes(bytes(data))
    with pytest.raises(BundleError) as info:
        load_bundle(bundle_copy)
    assert "graphs/adapter.fp32.onnx does not match its sha256" in one_line(info)
    result = CliRunner().invoke(main, ["inspect", str(bundle_copy)])
    assert "graphs/adapter.fp32.onnx does not match its sha256" in cli_error(result)


def test_truncated_missing_and_unlisted_files_are_refused(bundle_copy):
    graph = bundle_copy / "graphs" / "base.fp16.onnx"
    graph.write_bytes(graph.read_bytes()[:100])
    with pytest.raises(BundleError, match="file graphs/base.fp16.onnx has 100 bytes") as info:
        load_bundle(bundle_copy)
    one_line(info)
    graph.unlink()
    with pytest.raises(BundleError, match="file graphs/base.fp16.onnx listed in the manifest is missing") as info:
        load_bundle(bundle_copy)
    one_line(info)
    load_bundle(bundle_copy, verify=False)  # an explicit opt-out still reads the manifest
    shutil.copy(bundle_copy / "graphs" / "base.fp32.onnx", bundle_copy / "graphs" / "base.fp16.onnx")
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["files"]["graphs/base.fp16.onnx"] = manifest["files"]["graphs/base.fp32.onnx"]
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    load_bundle(bundle_copy)
    (bundle_copy / "graphs" / "extra.onnx").write_bytes(b"not a graph")
    with pytest.raises(BundleError, match="graphs/extra.onnx are not in the manifest") as info:
        load_bundle(bundle_copy)
    one_line(info)


def test_not_a_bundle_is_refused(tmp_path):
    with pytest.raises(BundleError, match="does not exist") as info:
        load_bundle(tmp_path / "nope")
    one_line(info)
    with pytest.raises(BundleError, match="has no manifest.json") as info:
        load_bundle(tmp_path)
    one_line(info)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(BundleError, match="is not valid JSON") as info:
        load_bundle(tmp_path)
    one_line(info)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "mova-export-bundle", "format_version": 1}))
    with pytest.raises(BundleError, match="format version 1; this mova-export reads version 2") as info:
        load_bundle(tmp_path)
    one_line(info)


# ---- bad arguments: one-line typed errors, before any slow work, nothing left behind ------------------------------

def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError) as info:
        export_bundle(BuildRequest(checkpoint=tmp_path / "no-such-checkpoint", out=tmp_path / "out",
                                   work_dir=tmp_path / "work", quiet=True))
    assert f"checkpoint directory {tmp_path / 'no-such-checkpoint'} does not exist" in one_line(info)
    assert list(tmp_path.iterdir()) == []


def test_unknown_component_and_precision(tiny_checkpoint, tmp_path):
    work = tmp_path / "work"
    with pytest.raises(ComponentError) as info:
        export_bundle(BuildRequest(checkpoint=tiny_checkpoint, out=tmp_path / "out", components=["base", "expert_Z"],
                                   work_dir=work, quiet=True))
    assert "unknown component 'expert_Z'; known: base, expert_A" in one_line(info)
    with pytest.raises(ComponentError, match="'llm' is not exported to ONNX") as info:
        export_bundle(BuildRequest(checkpoint=tiny_checkpoint, out=tmp_path / "out", components=["llm"], work_dir=work,
                                   quiet=True))
    one_line(info)
    with pytest.raises(BuildError, match=r"unknown export precision\(s\) \['int8'\]") as info:
        export_bundle(BuildRequest(checkpoint=tiny_checkpoint, out=tmp_path / "out", export_precisions=("int8",),
                                   work_dir=work, quiet=True))
    one_line(info)
    assert list(tmp_path.iterdir()) == []


def test_output_dir_not_writable(tiny_checkpoint, calib_dir, work_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(BundleError) as info:
        export_bundle(BuildRequest(checkpoint=tiny_checkpoint, out=blocker / "bundle", components=["base"],
                                   calib=calib_dir, work_dir=work_dir, quiet=True))
    assert f"folder {blocker} is not writable" in one_line(info)
    with pytest.raises(BundleError, match=f"output path {blocker} is a file") as info:
        export_bundle(BuildRequest(checkpoint=tiny_checkpoint, out=blocker, components=["base"], calib=calib_dir,
                                   work_dir=work_dir, quiet=True))
    one_line(info)
    if os.geteuid() != 0:  # root ignores permission bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(BundleError, match="is not writable"):
            export_bundle(BuildRequest(checkpoint=tiny_checkpoint, out=locked / "bundle", components=["base"],
                                       calib=calib_dir, work_dir=work_dir, quiet=True))
        locked.chmod(0o700)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"] + (["locked"] if os.geteuid() else [])
    assert blocker.read_text() == "x"


def test_existing_bundle_needs_overwrite(tiny_checkpoint, calib_dir, work_dir, export_only, tmp_path):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(BundleError, match="exists and is not empty; pass --overwrite") as info:
        export_bundle(BuildRequest(checkpoint=tiny_checkpoint, out=out, components=["base"], calib=calib_dir,
                                   work_dir=work_dir, quiet=True))
    one_line(info)
    assert (out / "keep.txt").read_text() == "mine" and [p.name for p in out.iterdir()] == ["keep.txt"]
    # the text encoder's unit is the session's (export_only made it): reused, nothing recomputed
    manifest = export_bundle(BuildRequest(checkpoint=tiny_checkpoint, out=out, components=["text_encoder"],
                                          calib=calib_dir, work_dir=work_dir, overwrite=True, quiet=True))
    assert {k: v["status"] for k, v in manifest.stages.items()} == {"features/text_encoder": "reused",
                                                                   "export/text_encoder": "reused"}
    assert list(load_bundle(out).manifest.graphs) == ["text_encoder"] and not (out / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no temp or old dirs left


# ---- inspect on every kind of bundle ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["export_only", "cpu_build", "parity_build", "orin_build", "rtx4090_build"])
def test_inspect_every_kind_of_bundle(kind, request):
    """`inspect` and `inspect --json` on export-only, cpu (int8), cpu + fp32/f32, Orin (int8, checks/) and RTX 4090
    (fp8, TensorRT-RTX engines where the bindings import) bundles (it once crashed on quantized variants)."""
    fixture = request.getfixturevalue(kind)
    bundle = fixture if isinstance(fixture, Path) else fixture.bundle
    m = load_bundle(bundle).manifest
    runner = CliRunner(env={"COLUMNS": "250"})   # wide enough that no table cell wraps
    as_json = runner.invoke(main, ["inspect", str(bundle), "--json"])
    assert as_json.exit_code == 0, as_json.output
    info = json.loads(as_json.stdout)
    assert info["kind"] == "bundle" and info["verified"] and info["num_files"] == len(m.files)
    rows = {(g["graph"], g["precision"]): g for g in info["graphs"]}
    assert set(rows) == {(n, p) for n, g in m.graphs.items() for p in g.variants}
    for (name, precision), row in rows.items():
        assert row["shipped"] == (m.runtime.precision[name] == precision)
        assert row["min_cosine"] is not None and row["min_cosine"] > 0.99, (name, precision)
        if precision in ("int8", "fp8"):
            assert row["decision"] in (precision, f"{precision}-partial") and row["reference"] == "fp32 graph"
    text = runner.invoke(main, ["inspect", str(bundle)])
    assert text.exit_code == 0, text.output
    assert "bundle" in text.stdout and "adapter" in text.stdout and "experts A, B, C, D, E, F, G" in text.stdout
    for precision in {p for g in m.graphs.values() for p in g.variants}:
        assert precision in text.stdout
    if m.llm is not None:
        assert f"{m.llm.qtype} {m.llm.gguf} (default)" in text.stdout
    assert len(info["engines"]) == len(m.engines)
    lines = text.stdout.splitlines()
    if info["engines"]:
        title = next(i for i, ln in enumerate(lines) if ln.startswith("TensorRT engines ("))
        assert f"tensorrt-rtx {info['engines'][0]['tensorrt_version']}" in lines[title]
    for engine in info["engines"]:
        assert engine["flavor"] == "tensorrt-rtx" and engine["compute_capability"] == "8.9"
        assert engine["tensorrt_version"] and engine["verified"] in (True, False)
        assert engine["bytes"] > 0 and engine["build_s"] > 0 and 0 < engine["fp32_layer_share"] < 1, engine
        line = next(ln for ln in lines[title:] if ln.split()[:1] == [engine["graph"]])
        assert "8.9" in line and line.split()[-1] == ("yes" if engine["verified"] else "no"), line


def test_rtx4090_engines_where_tensorrt_rtx_imports(rtx4090_build):
    from mova_export.compile import installed_flavors

    m = rtx4090_build.manifest
    if "tensorrt-rtx" not in installed_flavors():
        assert not m.engines and m.stages["compile"]["status"] == "skipped"
        pytest.skip("TensorRT-RTX is not importable: no engines to inspect")
    import tensorrt_rtx_bindings as trt

    assert m.stages["compile"]["status"] == "compiled" and m.stages["compile"]["flavor"] == "tensorrt-rtx"
    assert set(m.engines) == set(m.graphs)
    for name, engine in m.engines.items():
        assert engine["flavor"] == "tensorrt-rtx" and engine["tensorrt_version"] == trt.__version__
        assert engine["compute_capability"] == "8.9" and engine["engine"] in m.files
        assert engine["precision"] == m.runtime.precision[name]
    info = describe_bundle(rtx4090_build.bundle)
    assert {e["graph"] for e in info["engines"]} == set(m.graphs)


# ---- the vision side from the bundle ------------------------------------------------------------------------------

def test_vision_side_matches_the_reference(export_only, reference, images):
    from mova_export.runtime.vision import BundleVision

    image, question = images["chelsea"], "What animal is this?"
    mask = [1, 0, 0, 1, 0, 1, 0]  # A, D, F: a top-3 routing (the slot graph)
    wide = [1, 1, 0, 1, 0, 1, 0]  # four experts: the dense graph, each block's gate keeps its own top 3
    vision = BundleVision(load_bundle(export_only), "fp32", expert_policy="lazy", max_resident_experts=4)
    vision.load()
    assert not [n for n in vision.loaded if n.startswith("expert_")]
    assert vision.num_slots == 3 and vision.fallback_graph.name not in vision.loaded

    def run(side):
        facts = side.facts
        arrays = {kind: side.preprocess(image, kind) for kind in facts.image_inputs}
        feed = lambda tower: [a for kind in tower.image_inputs for a in arrays[kind]]  # noqa: E731
        base = side.base(feed(facts.base))
        image_tokens, routing_tokens = side.adapter_routing(base)
        text = side.text(question)
        experts = {i: side.expert(t.component, feed(t)) for i, (t, on) in enumerate(zip(facts.experts, wide)) if on}
        answer = side.adapter_answer(base, text, mask, {i: f for i, f in experts.items() if mask[i]})
        answer_wide = side.adapter_answer(base, text, wide, experts)
        return {"base": base, "text_features": text, "no_expert_tokens": image_tokens,
                "routing_tokens": routing_tokens, **{f"expert_{i}": f for i, f in experts.items()},
                "image_tokens": answer, "image_tokens_4_experts": answer_wide}

    got = run(vision)
    assert sorted(n for n in vision.loaded if n.startswith("expert_")) == ["expert_A", "expert_B", "expert_D",
                                                                            "expert_F"]
    assert vision.fallback_graph.name not in vision.loaded   # the dense graph served one request, then left
    want = run(reference.vision)   # transformers' preprocessing, the torch modules, the skipping adapter
    assert set(got) == set(want)
    compare_outputs(want, got, component="vision side (bundle vs PyTorch)")
    # an empty mask answers with the routing pass's tokens exactly (no second adapter graph runs)
    np.testing.assert_array_equal(vision.adapter_answer(got["base"], got["text_features"], [0] * 7, {}),
                                  got["no_expert_tokens"])
    # the dense graph agrees with the slot graph on a top-3 mask and with the routing graph on the empty one
    experts = {i: got[f"expert_{i}"] for i in (0, 3, 5)}
    dense = vision.adapter_answer(got["base"], got["text_features"], mask, experts, form="dense")
    np.testing.assert_allclose(dense, got["image_tokens"], rtol=0, atol=1e-4)
    dense_none = vision.adapter_answer(got["base"], got["text_features"], [0] * 7, {}, form="dense")
    np.testing.assert_allclose(dense_none, got["no_expert_tokens"], rtol=0, atol=1e-4)
    with pytest.raises(RuntimeInputError, match="4 experts routed but the slot graph has 3 slots"):
        vision.adapter_answer(got["base"], got["text_features"], wide, {i: got[f"expert_{i}"] for i in (0, 1, 3, 5)},
                              form="slots")
    vision.close()

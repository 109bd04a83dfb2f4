"""TensorRT compile decisions, tested on CPU: recipe -> builder settings, engine-metadata refusals, whether this
machine can compile, and the bundle loop with a stand-in builder. Tests that need TensorRT are marked and skip."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from mova_export.errors import CompileError
from mova_export.compile import (BuilderSettings, DeviceInfo, EngineMetadata, GraphInfo,
                                 builder_settings, can_compile_here, check_engine_metadata, compile_bundle,
                                 current_device, inspect_graph, read_engine_metadata, select_variant)
from mova_export.errors import BundleError, RecipeError
from mova_export.recipe import load_recipe

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
ORIN = DeviceInfo("10.3.0", "Orin", "8.7")
RTX4090 = DeviceInfo("10.7.0", "NVIDIA GeForce RTX 4090", "8.9")


# ---- builder settings --------------------------------------------------------------------------------------------
def test_int8_qdq_over_fp32_is_weakly_typed_with_int8_and_fp16_fallback():
    agx = load_recipe("jetson-orin-agx-64gb")
    s = builder_settings(agx, "base", GraphInfo("x", ("int8",), ("fp32",)))
    assert isinstance(s, BuilderSettings)
    assert not s.strongly_typed and s.flags == ("INT8", "FP16") and s.dla_core is None
    assert s.optimization_level == 3 and s.workspace_bytes == 4096 << 20 and s.timing_cache and s.static_shapes


def test_fp8_graph_is_strongly_typed_without_precision_flags():
    s = builder_settings(load_recipe("rtx-4090"), "expert_A", GraphInfo("x", ("fp8",), ("fp16", "fp32")))
    assert s.strongly_typed and s.flags == () and s.precision == "fp8"
    h100 = builder_settings(load_recipe("h100"), "base")
    assert h100.strongly_typed and h100.optimization_level == 4 and h100.workspace_bytes == 16384 << 20


def test_fp16_graph_is_strongly_typed_so_fp32_norms_stay_fp32():
    s = builder_settings(load_recipe("rtx-3090"), "text_encoder", GraphInfo("x", (), ("fp16", "fp32")))
    assert s.precision == "fp16" and s.strongly_typed and s.flags == ()


def test_fp32_graph_clears_tf32():
    s = builder_settings(load_recipe("rtx-3090"), "adapter", GraphInfo("x", (), ("fp32",)), precision="fp32")
    assert not s.strongly_typed and s.flags == () and s.clear_flags == ("TF32",)


def test_dla_component_gets_device_type_core_and_gpu_fallback():
    agx = load_recipe("jetson-orin-agx-64gb")
    assert agx.on_dla("expert_F")
    s = builder_settings(agx, "expert_F", GraphInfo("x", ("int8",), ("fp32",)))
    assert s.dla_core == 0 and not s.strongly_typed
    assert set(s.flags) == {"FP16", "INT8", "GPU_FALLBACK"}
    assert builder_settings(agx, "expert_A").dla_core is None
    nano = load_recipe("jetson-orin-nano-8gb")
    assert all(builder_settings(nano, c).dla_core is None for c in nano.precision)


def test_fp8_graph_on_orin_and_cpu_recipe_refused():
    with pytest.raises(RecipeError, match="has no FP8.*--target jetson-orin-agx-64gb"):
        builder_settings(load_recipe("jetson-orin-agx-64gb"), "base", GraphInfo("x", ("fp8",), ("fp16",)))
    with pytest.raises(RecipeError, match="nothing to compile"):
        builder_settings(load_recipe("cpu"), "base")
    with pytest.raises(RecipeError, match="'llm' is not compiled"):
        builder_settings(load_recipe("h100"), "llm")


def test_select_variant_falls_back_to_what_the_bundle_has():
    entry = {"variants": {"fp32": {}, "fp16": {}}}
    assert select_variant(entry, "int8", "base") == "fp16"
    assert select_variant({"variants": {"int8": {}, "fp32": {}}}, "int8", "base") == "int8"
    with pytest.raises(BundleError, match="no int8, fp16 or fp32 graph for base"):
        select_variant({"variants": {}}, "int8", "base")


def test_inspect_graph_finds_qdq_and_float_types(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    scale = helper.make_tensor("s", TensorProto.FLOAT, [], [0.1])
    zp = helper.make_tensor("z", TensorProto.INT8, [], [0])
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [scale, zp]),
                              opset_imports=[helper.make_opsetid("", 18)])
    path = tmp_path / "q.onnx"
    onnx.save(model, str(path))
    info = inspect_graph(path)
    assert info.qdq == ("int8",) and info.float_types == ("fp32",) and len(info.sha256) == 64
    s = builder_settings(load_recipe("rtx-3090"), "base", info)
    assert s.flags == ("INT8", "FP16")


# ---- engine metadata ----------------------------------------------------------------------------------------------
def _meta(**kw) -> EngineMetadata:
    base = dict(tensorrt_version="10.3.0", gpu_name="Orin", compute_capability="8.7",
                source_graph="graphs/base.int8.onnx", source_graph_sha256="a" * 64, component="base",
                precision="int8", dla_core=None, builder={}, recipe="jetson-orin-agx-64gb", compile_key="k")
    return EngineMetadata(**{**base, **kw})


def _refusal(meta, current, graph_sha=None) -> str:
    with pytest.raises(BundleError) as exc:
        check_engine_metadata(meta, current, graph_sha, bundle="out/bundle")
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_matching_engine_passes():
    check_engine_metadata(_meta(), ORIN, "a" * 64)


def test_tensorrt_version_mismatch_refused_naming_both_sides():
    m = _refusal(_meta(), DeviceInfo("10.7.0", "Orin", "8.7"))
    assert "TensorRT version 10.3.0" in m and "10.7.0" in m
    assert "run `mova-export compile out/bundle` on this device" in m


def test_gpu_name_mismatch_refused():
    m = _refusal(_meta(gpu_name="NVIDIA GeForce RTX 4090", compute_capability="8.9"),
                 DeviceInfo("10.3.0", "NVIDIA GeForce RTX 3090", "8.9"))
    assert "GPU NVIDIA GeForce RTX 4090" in m and "NVIDIA GeForce RTX 3090" in m and "mova-export compile" in m


def test_compute_capability_mismatch_refused():
    m = _refusal(_meta(), DeviceInfo("10.3.0", "Orin", "8.6"))
    assert "compute capability 8.7" in m and "8.6" in m and "mova-export compile" in m


def test_graph_hash_mismatch_refused():
    m = _refusal(_meta(), ORIN, "b" * 64)
    assert "aaaaaaaaaaaa" in m and "bbbbbbbbbbbb" in m and "stale" in m and "mova-export compile" in m


def test_no_tensorrt_or_no_gpu_refused():
    assert "not importable" in _refusal(_meta(), DeviceInfo(None, None, None))
    assert "no CUDA GPU" in _refusal(_meta(), DeviceInfo("10.3.0", None, None))


def test_metadata_round_trip(tmp_path):
    engine = tmp_path / "base.int8.engine"
    engine.write_bytes(b"x")
    Path(str(engine) + ".json").write_text(json.dumps(_meta().to_json()))
    assert read_engine_metadata(engine) == _meta()
    Path(str(engine) + ".json").write_text(json.dumps({"gpu_name": "Orin"}))
    with pytest.raises(BundleError, match="lacks tensorrt_version"):
        read_engine_metadata(engine)
    with pytest.raises(BundleError, match="no metadata file"):
        read_engine_metadata(tmp_path / "other.engine")


# ---- can we compile here? -----------------------------------------------------------------------------------------
def test_this_cpu_box_cannot_compile_and_says_what_to_run():
    recipe = load_recipe("jetson-orin")
    check = can_compile_here(recipe, "out/bundle")
    if current_device().gpu_name is None:
        assert not check.ok
        assert check.command == "mova-export compile out/bundle --target jetson-orin-agx-64gb"
        assert check.command in check.reason and "Jetson AGX Orin 64GB" in check.reason


def test_can_compile_decisions_with_given_devices():
    agx = load_recipe("jetson-orin-agx-64gb")
    assert can_compile_here(agx, device=ORIN).ok
    wrong = can_compile_here(agx, device=RTX4090)
    assert not wrong.ok and "8.9" in wrong.reason and "8.7" in wrong.reason and "mova-export compile" in wrong.reason
    no_trt = can_compile_here(agx, device=DeviceInfo(None, "Orin", "8.7"))
    assert not no_trt.ok and "mova-export[tensorrt]" in no_trt.reason
    old = can_compile_here(agx, device=DeviceInfo("8.6.1", "Orin", "8.7"))
    assert not old.ok and "TensorRT 10" in old.reason
    cpu = can_compile_here(load_recipe("cpu"), device=ORIN)
    assert not cpu.ok and "no TensorRT engines" in cpu.reason and cpu.command == ""


# ---- the bundle loop with a stand-in builder ---------------------------------------------------------------------
def _fake_bundle(root: Path) -> Path:
    from mova_export.bundle import FORMAT, FORMAT_VERSION, _file_table

    (root / "graphs").mkdir(parents=True)
    graphs = {}
    for comp, precision in (("base", "int8"), ("expert_F", "int8"), ("adapter", "fp16")):
        rel = f"graphs/{comp}.{precision}.onnx"
        (root / rel).write_bytes(np.random.default_rng(0).bytes(64))
        graphs[comp] = {"variants": {precision: {"graph": rel, "files": [rel]}}}
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "components": list(graphs), "graphs": graphs,
                "files": _file_table(root)}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_compile_bundle_writes_engines_metadata_and_manifest(tmp_path, monkeypatch):
    import mova_export.compile as comp

    monkeypatch.setattr(comp, "inspect_graph", lambda path, sha: GraphInfo(sha, ("int8",) if "int8" in str(path)
                                                                         else (), ("fp32",)))
    calls = []

    def fake_build(onnx_path, engine_path, settings, cache):
        calls.append((Path(onnx_path).name, settings))
        Path(engine_path).parent.mkdir(parents=True, exist_ok=True)
        Path(engine_path).write_bytes(b"engine:" + Path(onnx_path).read_bytes())
        Path(cache).write_bytes(b"cache")
        return 0.5

    bundle = _fake_bundle(tmp_path / "b")
    agx = load_recipe("jetson-orin-agx-64gb")
    metas = compile_bundle(bundle, agx, device=ORIN, build=fake_build)
    assert [m.component for m in metas] == ["base", "expert_F", "adapter"]
    assert {c[0] for c in calls} == {"base.int8.onnx", "expert_F.int8.onnx", "adapter.fp16.onnx"}
    settings = {c[0]: c[1] for c in calls}
    assert settings["expert_F.int8.onnx"].dla_core == 0 and settings["adapter.fp16.onnx"].strongly_typed
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["engines"]["base"]["engine"] == "engines/base.int8.engine"
    assert "engines/base.int8.engine.json" in manifest["files"] and "engines/timing.cache" in manifest["files"]
    meta = read_engine_metadata(bundle / "engines/base.int8.engine")
    assert meta.gpu_name == "Orin" and meta.tensorrt_version == "10.3.0" and meta.dla_core is None
    assert meta.source_graph_sha256 == manifest["files"]["graphs/base.int8.onnx"]["sha256"]
    from mova_export.bundle import load_bundle

    load_bundle(bundle)  # the refreshed file table verifies
    calls.clear()
    compile_bundle(bundle, agx, device=ORIN, build=fake_build)
    assert calls == []   # stage reuse: nothing changed
    compile_bundle(bundle, agx, device=DeviceInfo("10.3.1", "Orin", "8.7"), build=fake_build)
    assert len(calls) == 3   # another TensorRT version rebuilds every engine


def test_compile_bundle_refuses_on_this_cpu_box(tmp_path):
    bundle = _fake_bundle(tmp_path / "b")
    with pytest.raises(CompileError, match="mova-export compile .* --target rtx-4090"):
        compile_bundle(bundle, load_recipe("rtx-4090"), device=DeviceInfo(None, None, None))


# ---- real TensorRT (skipped where it is not importable) ------------------------------------------------------------
@pytest.mark.tensorrt
@pytest.mark.skipif(not HAS_TRT, reason="tensorrt is not importable here (install it on the target device)")
def test_engine_from_onnx_builds_a_tiny_graph(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from mova_export.compile import engine_from_onnx

    dev = current_device()
    if dev.gpu_name is None:
        pytest.skip("no CUDA GPU")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, str(tmp_path / "g.onnx"))
    settings = BuilderSettings("base", "fp32", False, (), ("TF32",), 0, 64 << 20, True, None)
    engine_from_onnx(tmp_path / "g.onnx", tmp_path / "g.engine", settings, tmp_path / "timing.cache")
    assert (tmp_path / "g.engine").stat().st_size > 0 and (tmp_path / "timing.cache").stat().st_size > 0


@pytest.mark.tensorrt
@pytest.mark.skipif(not HAS_TRT, reason="tensorrt is not importable here (install it on the target device)")
def test_parser_errors_are_all_reported(tmp_path):
    from mova_export.compile import engine_from_onnx

    (tmp_path / "bad.onnx").write_bytes(b"not onnx")
    settings = BuilderSettings("base", "fp32", False, (), (), 0, 64 << 20, False, None)
    with pytest.raises(CompileError, match="cannot parse"):
        engine_from_onnx(tmp_path / "bad.onnx", tmp_path / "bad.engine", settings)

"""TensorRT compile: flavor choice, builder settings (checked against the real enums of whatever TensorRT flavor is
installed), engine-metadata refusals, the bundle loop with stand-in builders, and - where TensorRT-RTX imports -
real engines built ahead of time from tiny MoVA transformer graphs, with the fp32-layer share of each."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mova_export.compile import (
    FLAVORS,
    RTX_COMPUTE_CAPABILITIES,
    BuilderSettings,
    BuildResult,
    DeviceInfo,
    EngineMetadata,
    EngineParity,
    EngineTools,
    GraphInfo,
    LayerProfile,
    builder_settings,
    can_compile_here,
    check_engine_metadata,
    compile_bundle,
    current_device,
    engine_from_onnx,
    engine_parity,
    inspect_graph,
    installed_flavors,
    profile_onnx,
    read_engine_metadata,
    resolve_settings,
)
from mova_export.core.errors import BundleError, CompileError, RecipeError
from mova_export.core.tensorrt_flavors import import_flavor, tensorrt_flavor
from mova_export.recipe import load_recipe

INSTALLED = installed_flavors()
HAS_RTX = "tensorrt-rtx" in INSTALLED
ORIN = DeviceInfo.of("Orin", "8.7", {"tensorrt-10": "10.3.0"})
RTX4090_TRT11 = DeviceInfo.of("NVIDIA GeForce RTX 4090", "8.9", {"tensorrt": "11.1.0"})
CI_RTX = DeviceInfo.of(None, None, {"tensorrt-rtx": "1.7.1.116"})
AGX, R3090, R4090, H100 = (load_recipe(n) for n in ("jetson-orin-agx-64gb", "rtx-3090", "rtx-4090", "h100"))
INT8_FP32_BASE = GraphInfo("x", ("int8",), ("fp32",))
INT8_FP16_BASE = GraphInfo("x", ("int8",), ("fp16", "fp32"))
FP8 = GraphInfo("x", ("fp8",), ("fp16", "fp32"))


# ---- flavors and builder settings ---------------------------------------------------------------------------------
def test_tensorrt_version_decides_the_flavor():
    assert tensorrt_flavor("10.3.0") == "tensorrt-10" and tensorrt_flavor("10.11.0.33") == "tensorrt-10"
    assert tensorrt_flavor("10.12.0") == "tensorrt" and tensorrt_flavor("11.1.0") == "tensorrt"
    with pytest.raises(CompileError, match="TensorRT 8.6.1 is installed.*10.x or 11.x"):
        tensorrt_flavor("8.6.1")


def test_int8_on_fp32_base_is_weakly_typed_only_where_weak_typing_exists():
    weak = builder_settings(AGX, "base", INT8_FP32_BASE)
    assert weak.flavor == "tensorrt-10" and not weak.strongly_typed and weak.flags == ("INT8", "FP16")
    assert weak.network_flags == () and weak.dla_core is None and weak.compute_capability is None
    assert weak.optimization_level == 3 and weak.workspace_bytes == 4096 << 20 and weak.timing_cache
    strong = builder_settings(AGX, "base", INT8_FP32_BASE, flavor="tensorrt")   # TensorRT >= 10.12 / 11.x
    assert strong.strongly_typed and strong.flags == () and strong.network_flags == ("STRONGLY_TYPED",)


def test_fp16_base_and_fp8_graphs_are_strongly_typed_in_every_flavor():
    for flavor in FLAVORS:
        recipe = R4090 if flavor == "tensorrt-rtx" else H100
        for info in (INT8_FP16_BASE, FP8, GraphInfo("x", (), ("fp16", "fp32"))):
            s = builder_settings(recipe, "expert_A", info, flavor=flavor)
            assert s.strongly_typed and s.flags == () and s.clear_flags == (), (flavor, info)


def test_rtx_builds_ahead_of_time_for_the_recipes_compute_capability():
    s = builder_settings(R4090, "expert_A", FP8)
    assert s.flavor == "tensorrt-rtx" and s.compute_capability == "8.9" and s.precision == "fp8"
    assert s.network_flags == () and not s.timing_cache          # RTX: strongly typed by default, no timing cache
    assert builder_settings(R3090, "base", INT8_FP16_BASE).compute_capability == "8.6"
    h100 = builder_settings(H100, "base")
    assert h100.flavor == "tensorrt" and h100.compute_capability is None and h100.optimization_level == 4
    with pytest.raises(RecipeError, match="TensorRT-RTX builds for compute capability .* not 9.0"):
        builder_settings(H100, "base", flavor="tensorrt-rtx")


def test_fp32_graph_clears_tf32():
    assert builder_settings(R3090, "adapter", GraphInfo("x"), precision="fp32").clear_flags == ("TF32",)
    weak = builder_settings(AGX, "adapter", GraphInfo("x"), precision="fp32")
    assert not weak.strongly_typed and weak.clear_flags == ("TF32",)


def test_dla_settings_per_flavor():
    assert AGX.on_dla("expert_F")
    weak = builder_settings(AGX, "expert_F", INT8_FP32_BASE)
    assert weak.dla_core == 0 and not weak.strongly_typed and set(weak.flags) == {"FP16", "INT8", "GPU_FALLBACK"}
    strong = builder_settings(AGX, "expert_F", INT8_FP16_BASE, flavor="tensorrt")
    assert strong.dla_core == 0 and strong.strongly_typed and strong.flags == ("GPU_FALLBACK",)
    with pytest.raises(RecipeError, match="takes DLA precision from the graph's types"):
        builder_settings(AGX, "expert_F", INT8_FP32_BASE, flavor="tensorrt")
    with pytest.raises(RecipeError, match="TensorRT-RTX builds for compute capability .* not 8.7"):
        builder_settings(AGX, "expert_F", INT8_FP16_BASE, flavor="tensorrt-rtx")
    assert builder_settings(AGX, "expert_A").dla_core is None
    nano = load_recipe("jetson-orin-nano-8gb")
    assert all(builder_settings(nano, c).dla_core is None for c in nano.precision)


def test_fp8_where_the_target_has_none_is_one_line_refused():
    for recipe in (AGX, R3090):
        with pytest.raises(RecipeError, match=f"has no FP8 .needs 8.9.*--target {recipe.name}") as info:
            builder_settings(recipe, "base", FP8)
        assert "\n" not in str(info.value)
    with pytest.raises(RecipeError, match="nothing to compile"):
        builder_settings(load_recipe("cpu"), "base")
    with pytest.raises(RecipeError, match="'llm' is not compiled"):
        builder_settings(H100, "llm")


# ---- settings against the installed bindings' real enums ------------------------------------------------------------
needs_trt = pytest.mark.skipif(not INSTALLED, reason="no TensorRT flavor is importable here")


@pytest.mark.tensorrt
@needs_trt
def test_every_flavors_settings_resolve_against_the_installed_enums():
    """Whatever flavor is installed, the other flavors' settings are checked against its real enums: the names all
    flavors share resolve, the weak-typing flags (FP16, INT8) fail with a one-line CompileError where the module
    lacks them (11.x, RTX) instead of an AttributeError mid-build."""
    name, _version = next(iter(INSTALLED.items()))
    trt = import_flavor(name)
    has_weak = hasattr(trt.BuilderFlag, "FP16")
    cases = [builder_settings(r, c, g, p, flavor=f) for f, r, c, g, p in (
        ("tensorrt", H100, "base", FP8, None), ("tensorrt", AGX, "expert_F", INT8_FP16_BASE, None),
        ("tensorrt", R3090, "adapter", GraphInfo("x"), "fp32"), ("tensorrt-10", AGX, "adapter", GraphInfo("x"), "fp32"),
        ("tensorrt-rtx", R4090, "base", FP8, None), ("tensorrt-rtx", R3090, "base", INT8_FP16_BASE, None))]
    for settings in cases:
        if settings.compute_capability is not None and not hasattr(trt, "ComputeCapability"):
            continue   # full TensorRT has no ahead-of-time compute capability
        resolved = resolve_settings(settings, trt)
        assert len(resolved.flags) == len(settings.flags) and resolved.workspace_pool == trt.MemoryPoolType.WORKSPACE
        if settings.dla_core is not None:
            assert resolved.dla_device == trt.DeviceType.DLA and resolved.flags == (trt.BuilderFlag.GPU_FALLBACK,)
        if settings.network_flags:
            assert resolved.network_flags == 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        if settings.clear_flags:
            assert resolved.clear_flags == (trt.BuilderFlag.TF32,)
    rtx = resolve_settings(builder_settings(R4090, "base", FP8), trt) if hasattr(trt, "ComputeCapability") else None
    assert rtx is None or rtx.compute_capability == trt.ComputeCapability.SM89
    weak = builder_settings(AGX, "base", INT8_FP32_BASE)
    if has_weak:
        assert resolve_settings(weak, trt).flags == (trt.BuilderFlag.INT8, trt.BuilderFlag.FP16)
    else:
        with pytest.raises(CompileError, match="has no BuilderFlag.INT8") as info:
            resolve_settings(weak, trt)
        assert "\n" not in str(info.value)


def test_nothing_breaks_when_no_flavor_imports(tmp_path):
    """A machine with no TensorRT at all: the package, the CLI and the compile decisions still work and say what to
    install (every TensorRT module blocked in a fresh interpreter)."""
    script = """
import sys
for m in ("tensorrt", "tensorrt_rtx", "tensorrt_rtx_bindings"):
    sys.modules[m] = None
import mova_export, mova_export.compile as c
from mova_export.recipe import load_recipe
from click.testing import CliRunner
from mova_export.cli import main
assert c.installed_flavors() == {}
print(CliRunner().invoke(main, ["--help"]).exit_code)
print(c.can_compile_here(load_recipe("rtx-4090"), "B", c.DeviceInfo()).reason)
try:
    c.import_flavor("tensorrt-rtx")
except c.CompileError as exc:
    print(exc)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).parent.parent)
    assert out.returncode == 0, out.stderr
    code, reason, missing = out.stdout.strip().splitlines()
    assert code == "0"
    assert "pip install 'mova-export[tensorrt-rtx]'" in reason and "pip install tensorrt" in reason
    assert "tensorrt-rtx is not importable here" in missing


# ---- which flavor builds what, where ------------------------------------------------------------------------------
def test_flavor_choice_with_given_devices():
    ci = can_compile_here(R4090, "out/b", CI_RTX)
    assert ci.ok and ci.flavor.flavor == "tensorrt-rtx" and ci.flavor.ahead_of_time and "8.9" in ci.reason
    desktop = can_compile_here(R4090, "out/b", RTX4090_TRT11)
    assert desktop.ok and desktop.flavor.flavor == "tensorrt" and not desktop.flavor.ahead_of_time
    both = DeviceInfo.of("NVIDIA GeForce RTX 4090", "8.9", {"tensorrt": "11.1.0", "tensorrt-rtx": "1.7.1.116"})
    assert can_compile_here(R4090, device=both).flavor.flavor == "tensorrt"   # tuned on the GPU itself
    assert can_compile_here(AGX, device=ORIN).flavor.flavor == "tensorrt-10"
    jetson = can_compile_here(AGX, "out/b", CI_RTX)     # RTX never builds for a Jetson
    assert not jetson.ok and "sudo apt install python3-libnvinfer" in jetson.reason
    assert jetson.command == "mova-export compile out/b --target jetson-orin-agx-64gb" in jetson.reason
    hopper = can_compile_here(H100, device=CI_RTX)
    assert not hopper.ok and "pip install tensorrt" in hopper.reason and "H100" in hopper.reason
    wrong = can_compile_here(AGX, device=RTX4090_TRT11)
    assert not wrong.ok and "8.9" in wrong.reason and "8.7" in wrong.reason
    cpu = can_compile_here(load_recipe("cpu"), device=ORIN)
    assert not cpu.ok and "no TensorRT engines" in cpu.reason and cpu.command == ""


def test_this_machine_is_described():
    dev = current_device()
    assert dict(dev.flavors) == dict(INSTALLED)
    check = can_compile_here(load_recipe("jetson-orin"), "out/bundle")
    if dev.gpu_name is None:
        assert not check.ok and check.command in check.reason and "Jetson AGX Orin 64GB" in check.reason


def _qdq_graph(path: Path, zero_point_type: int | None) -> Path:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    inits = [helper.make_tensor("s", TensorProto.FLOAT, [], [0.1])]
    qin = ["x", "s"]
    if zero_point_type is not None:
        inits.append(helper.make_tensor("z", zero_point_type, [], [0]))
        qin.append("z")
    nodes = [helper.make_node("QuantizeLinear", qin, ["q"]), helper.make_node("DequantizeLinear", ["q", *qin[1:]],
                                                                              ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, str(path))
    return path


def test_inspect_graph_finds_qdq_and_refuses_uint8(tmp_path):
    from onnx import TensorProto

    info = inspect_graph(_qdq_graph(tmp_path / "q.onnx", TensorProto.INT8))
    assert info.qdq == ("int8",) and info.float_types == ("fp32",) and len(info.sha256) == 64
    assert builder_settings(AGX, "base", info).flags == ("INT8", "FP16")
    for zp, label in ((TensorProto.UINT8, "explicit"), (None, "default")):
        with pytest.raises(CompileError, match="UINT8 .asymmetric.*signed symmetric") as exc:
            inspect_graph(_qdq_graph(tmp_path / f"u8-{label}.onnx", zp))
        assert "\n" not in str(exc.value)


# ---- engine metadata ----------------------------------------------------------------------------------------------
def _meta(**kw) -> EngineMetadata:
    base = dict(flavor="tensorrt-10", tensorrt_version="10.3.0", gpu_name="Orin", compute_capability="8.7",
                source_graph="graphs/base.int8.onnx", source_graph_sha256="a" * 64, component="base",
                precision="int8", recipe="jetson-orin-agx-64gb", compile_key="k")
    return EngineMetadata(**{**base, **kw})


def _refusal(meta, current, graph_sha=None) -> str:
    with pytest.raises(BundleError) as exc:
        check_engine_metadata(meta, current, graph_sha, bundle="out/bundle")
    assert "\n" not in str(exc.value)
    return str(exc.value)


def test_engine_metadata_refusals_name_both_sides_and_the_fix():
    check_engine_metadata(_meta(), ORIN, "a" * 64)
    m = _refusal(_meta(), DeviceInfo.of("Orin", "8.7", {"tensorrt-10": "10.3.1"}))
    assert "tensorrt-10 version 10.3.0" in m and "10.3.1" in m and "mova-export compile out/bundle" in m
    m = _refusal(_meta(), DeviceInfo.of("Orin", "8.7", {"tensorrt": "11.1.0"}))
    assert "built with tensorrt-10 10.3.0, which is not importable" in m and "JetPack" in m
    m = _refusal(_meta(gpu_name="NVIDIA GeForce RTX 4090", compute_capability="8.9"),
                 DeviceInfo.of("NVIDIA GeForce RTX 4060", "8.9", {"tensorrt-10": "10.3.0"}))
    assert "GPU NVIDIA GeForce RTX 4090" in m and "RTX 4060" in m
    assert "compute capability 8.7" in _refusal(_meta(), DeviceInfo.of("Orin", "8.6", {"tensorrt-10": "10.3.0"}))
    m = _refusal(_meta(), ORIN, "b" * 64)
    assert "aaaaaaaaaaaa" in m and "bbbbbbbbbbbb" in m and "stale" in m
    assert "no CUDA GPU" in _refusal(_meta(), DeviceInfo.of(None, None, {"tensorrt-10": "10.3.0"}))


def test_rtx_engine_runs_on_any_gpu_of_its_compute_capability():
    aot = _meta(flavor="tensorrt-rtx", tensorrt_version="1.7.1.116", gpu_name=None, compute_capability="8.9")
    check_engine_metadata(aot, DeviceInfo.of("NVIDIA GeForce RTX 4060", "8.9", {"tensorrt-rtx": "1.7.1.116"}))
    assert "compute capability 8.9" in _refusal(aot, DeviceInfo.of("NVIDIA GeForce RTX 3090", "8.6",
                                                                   {"tensorrt-rtx": "1.7.1.116"}))


def test_metadata_round_trip(tmp_path):
    engine = tmp_path / "base.int8.engine"
    engine.write_bytes(b"x")
    Path(str(engine) + ".json").write_text(json.dumps(_meta().to_json()))
    assert read_engine_metadata(engine) == _meta()
    Path(str(engine) + ".json").write_text(json.dumps({k: v for k, v in _meta().to_json().items() if k != "flavor"}))
    with pytest.raises(BundleError, match="lacks flavor"):
        read_engine_metadata(engine)
    with pytest.raises(BundleError, match="no metadata file"):
        read_engine_metadata(tmp_path / "other.engine")


def test_engine_parity_without_a_gpu_is_unverified(tmp_path):
    result = engine_parity(tmp_path / "e.engine", tmp_path / "g.onnx", [{"x": np.zeros(1)}], compute_capability="8.9",
                           device=CI_RTX, flavor="tensorrt-rtx")
    assert result.status == "unverified" and "no CUDA GPU" in result.reason and result.cosine is None


# ---- the bundle loop with stand-in builders ----------------------------------------------------------------------
def _bundle(root: Path, graphs: dict[str, tuple[str, Path]]) -> Path:
    """A bundle holding the given (component -> (shipped precision, ONNX file)) graphs."""
    import shutil

    import onnx

    from mova_export.bundle import GraphEntry, Manifest, RuntimeDefaults, Variant
    from mova_export.components import facts_from_config
    from mova_export.core.bert_inputs import TEXT_BUCKETS
    from mova_export.core.spec import TensorSpec
    from mova_export.synth import synthetic_config

    (root / "graphs").mkdir(parents=True)
    entries = {}
    for comp, (precision, src) in graphs.items():
        rel = f"graphs/{comp}.{precision}.onnx"
        shutil.copy(src, root / rel)
        inputs = [TensorSpec(v.name, tuple(d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim))
                  for v in onnx.load(str(src), load_external_data=False).graph.input]
        axes = {d: list(TEXT_BUCKETS) for t in inputs for d in t.shape if isinstance(d, str)}
        entries[comp] = GraphEntry(comp, comp, "tower", inputs, [], {precision: Variant(rel, [rel], src.stat().st_size)},
                                   axes=axes)
    cfg = synthetic_config("tiny")
    Manifest(model=facts_from_config(cfg), config=cfg.to_dict(), graphs=entries, tokenizers={}, source_checkpoint={},
             tools={}, created_utc="", runtime=RuntimeDefaults({c: p for c, (p, _) in graphs.items()})).write(root)
    return root


def _stand_in(calls):
    def build(onnx_path, engine_path, settings, cache, log=None):
        calls.append((Path(onnx_path).name, settings, cache))
        Path(engine_path).parent.mkdir(parents=True, exist_ok=True)
        Path(engine_path).write_bytes(b"engine:" + Path(onnx_path).read_bytes())
        if cache is not None:
            Path(cache).parent.mkdir(parents=True, exist_ok=True)
            Path(cache).write_bytes(b"cache")
        return BuildResult(0.5, 8, LayerProfile(10, 1, 9, 2, 0), "new")
    return build


def _verified(cosine):
    return lambda *a, **k: EngineParity("verified", cosine, 1e-3, 3)


def test_compile_bundle_writes_engines_metadata_and_manifest(tmp_path):
    from onnx import TensorProto

    q = _qdq_graph(tmp_path / "q.onnx", TensorProto.INT8)
    bundle = _bundle(tmp_path / "b", {"base": ("int8", q), "expert_F": ("int8", q), "adapter": ("fp16", q)})
    calls: list = []
    metas = compile_bundle(bundle, AGX, device=ORIN,
                           tools=EngineTools(build=_stand_in(calls), verify=_verified(0.9999)))
    assert [m.component for m in metas] == ["base", "expert_F", "adapter"]
    settings = {name: s for name, s, _ in calls}
    assert settings["expert_F.int8.onnx"].dla_core == 0 and settings["base.int8.onnx"].flags == ("INT8", "FP16")
    cache = {c.relative_to(c.parents[2]).as_posix() for *_, c in calls}    # built in a staged copy of the bundle
    assert cache == {"engines/timing/orin.tensorrt-10-10.3.0.cache"}   # one per (GPU, flavor + version)
    manifest = json.loads((bundle / "manifest.json").read_text())
    entry = manifest["engines"]["base"]
    assert {k: entry[k] for k in ("engine", "metadata", "precision", "flavor", "tensorrt_version",
                                  "compute_capability", "dla_core", "verified")} == {
        "engine": "engines/base.int8.engine", "metadata": "engines/base.int8.engine.json", "precision": "int8",
        "flavor": "tensorrt-10", "tensorrt_version": "10.3.0", "compute_capability": "8.7", "dla_core": None,
        "verified": True}
    assert manifest["engines"]["expert_F"]["dla_core"] == 0 and entry["parity"]["cosine"] == 0.9999
    assert "engines/timing/orin.tensorrt-10-10.3.0.cache" in manifest["files"]
    meta = read_engine_metadata(bundle / "engines/base.int8.engine")
    assert (meta.flavor, meta.tensorrt_version, meta.compute_capability, meta.gpu_name) == \
        ("tensorrt-10", "10.3.0", "8.7", "Orin")
    assert meta.source_graph_sha256 == manifest["files"]["graphs/base.int8.onnx"]["sha256"]
    assert meta.builder == json.loads(json.dumps(settings["base.int8.onnx"].to_json()))
    assert meta.parity["cosine"] == 0.9999
    assert meta.layers["fp32_share"] == 0.1 and meta.timing_cache == "new"
    from mova_export.bundle import load_bundle

    load_bundle(bundle)  # the refreshed file table verifies
    calls.clear()
    compile_bundle(bundle, AGX, device=ORIN, tools=EngineTools(build=_stand_in(calls), verify=_verified(0.9999)))
    assert calls == []   # stage reuse: nothing changed
    compile_bundle(bundle, AGX, device=DeviceInfo.of("Orin", "8.7", {"tensorrt-10": "10.3.1"}),
                   tools=EngineTools(build=_stand_in(calls), verify=_verified(0.9999)))
    assert len(calls) == 3 and {c.name for *_, c in calls} == {"orin.tensorrt-10-10.3.1.cache"}


def test_ahead_of_time_engines_are_verified_once_their_gpu_is_there(tmp_path):
    from onnx import TensorProto

    bundle = _bundle(tmp_path / "b", {"base": ("fp8", _qdq_graph(tmp_path / "q.onnx", TensorProto.INT8))})
    calls: list = []
    unverified = lambda *a, **k: EngineParity("unverified", reason="no CUDA GPU here")  # noqa: E731
    [ci] = compile_bundle(bundle, R4090, device=CI_RTX, tools=EngineTools(build=_stand_in(calls), verify=unverified))
    assert ci.gpu_name is None and ci.parity["status"] == "unverified" and calls[0][2] is None  # no timing cache
    gpu = DeviceInfo.of("NVIDIA GeForce RTX 4070", "8.9", {"tensorrt-rtx": "1.7.1.116"})
    [there] = compile_bundle(bundle, R4090, device=gpu,
                             tools=EngineTools(build=_stand_in(calls), verify=_verified(0.9991)))
    assert len(calls) == 1 and there.parity["cosine"] == 0.9991 and there.engine_sha256 == ci.engine_sha256
    assert read_engine_metadata(bundle / "engines/base.fp8.engine").parity["status"] == "verified"
    assert json.loads((bundle / "manifest.json").read_text())["engines"]["base"]["verified"] is True


def test_engine_below_budget_is_refused_and_removed(tmp_path):
    from onnx import TensorProto

    bundle = _bundle(tmp_path / "b", {"base": ("int8", _qdq_graph(tmp_path / "q.onnx", TensorProto.INT8))})
    with pytest.raises(CompileError, match=r"cosine 0.950000 < 0.995 \(accuracy.int8.min_cosine\)"):
        compile_bundle(bundle, AGX, device=ORIN, tools=EngineTools(build=_stand_in([]), verify=_verified(0.95)))
    assert not (bundle / "engines/base.int8.engine").exists()


def test_compile_bundle_refuses_where_nothing_builds(tmp_path):
    from onnx import TensorProto

    bundle = _bundle(tmp_path / "b", {"base": ("int8", _qdq_graph(tmp_path / "q.onnx", TensorProto.INT8))})
    with pytest.raises(CompileError, match="mova-export compile .* --target rtx-4090"):
        compile_bundle(bundle, R4090, device=DeviceInfo())


# ---- real TensorRT-RTX engines from tiny MoVA graphs (no GPU needed) ------------------------------------------------
needs_rtx = pytest.mark.skipif(not HAS_RTX, reason="TensorRT-RTX is not importable (pip install "
                                                   "'mova-export[tensorrt-rtx]')")
# A quantized graph may hold this many more fp32 compute layers (as a share) than its fp16 graph: the casts around
# the fp32 islands are not compute layers, so the measured difference is 0 on both tiny graphs; 3 points of slack.
FP32_SHARE_SLACK = 0.03


@pytest.fixture(scope="module")
def tiny_graphs(tmp_path_factory):
    """fp32, fp16, INT8 (fp32 and fp16 base) and FP8 (fp16 base) graphs of the tiny CLIP base tower and the tiny
    BERT text encoder, exported from the project's own components."""
    import torch
    from helpers import randomize

    from mova_export import export as ex
    from mova_export.components import get_spec
    from mova_export.core.tolerance import Tolerance
    from mova_export.quantize import QuantSettings, qdq_from_onnx
    from mova_export.source.config import FULL_LLM, MoVAConfig

    cfg = MoVAConfig(llm=dict(FULL_LLM), scale="tiny")
    root = tmp_path_factory.mktemp("tiny-graphs")
    graphs: dict[str, dict[str, Path]] = {}
    for i, name in enumerate(("base", "text_encoder")):
        spec = get_spec(name)
        module = randomize(spec.build(cfg), 10 + i, keep_scale=lambda n: "embed" in n).eval()
        feeds = [{k: np.asarray(v) for k, v in spec.sample_inputs(cfg, s).items()} for s in range(3)]
        paths = {"fp32": root / f"{name}.fp32.onnx", "fp16": root / f"{name}.fp16.onnx"}
        with torch.no_grad():
            ex.onnx_from_component(spec, module, cfg, paths["fp32"])
        ex.fp16_from_onnx(paths["fp32"], paths["fp16"], spec.inputs(cfg), spec.outputs(cfg), name)
        for precision, base in (("int8", "fp32"), ("int8", "fp16"), ("fp8", "fp16")):
            key = precision if base == "fp16" else f"{precision}-fp32-base"
            settings = QuantSettings(precision, "minmax", base, "onnxruntime", "float", Tolerance(-1.0))
            paths[key] = qdq_from_onnx(paths["fp32"], root / f"{name}.{key}.onnx", settings, feeds).path
        graphs[name] = paths
    return graphs


@pytest.mark.tensorrt
@needs_rtx
@pytest.mark.parametrize("component", ["base", "text_encoder"])
def test_fp32_layer_share_of_quantized_graphs_is_the_fp16_graphs(tiny_graphs, component):
    profiles = {k: profile_onnx(p) for k, p in tiny_graphs[component].items()}
    fp16 = profiles["fp16"]
    assert profiles["fp32"].fp32_share == 1.0 and 0 < fp16.fp32_share < 0.3
    for key in ("int8", "fp8"):
        assert profiles[key].fp32_share <= fp16.fp32_share + FP32_SHARE_SLACK, (key, profiles[key].fp32_layers)
    for key in ("fp16", "int8", "fp8"):   # attention (activation x activation) matrix multiplies are never fp32
        assert profiles[key].attention_matmuls >= 4 and profiles[key].attention_matmuls_fp32 == 0, key
    before = profiles["int8-fp32-base"]       # what an fp32 base leaves to a strongly typed build
    assert before.fp32_share > 0.7 and before.attention_matmuls_fp32 == before.attention_matmuls


@pytest.mark.tensorrt
@needs_rtx
@pytest.mark.parametrize("recipe,precision", [("rtx-3090", "fp32"), ("rtx-3090", "fp16"), ("rtx-3090", "int8"),
                                              ("rtx-4090", "fp32"), ("rtx-4090", "fp16"), ("rtx-4090", "int8"),
                                              ("rtx-4090", "fp8")])
def test_rtx_engine_builds_ahead_of_time(tiny_graphs, tmp_path, recipe, precision):
    graph = tiny_graphs["base"][precision]
    settings = builder_settings(load_recipe(recipe), "base", inspect_graph(graph), precision)
    assert settings.flavor == "tensorrt-rtx" and settings.strongly_typed
    result = engine_from_onnx(graph, tmp_path / "base.engine", settings)
    assert result.engine_bytes > 100_000 and (tmp_path / "base.engine").stat().st_size == result.engine_bytes
    assert result.timing_cache == "" and result.layers.compute_layers > 40


@pytest.mark.tensorrt
@needs_rtx
def test_fp8_for_sm86_is_refused_in_one_line(tiny_graphs, tmp_path):
    graph = tiny_graphs["base"]["fp8"]
    with pytest.raises(RecipeError, match="has no FP8") as info:
        builder_settings(R3090, "base", inspect_graph(graph), "fp8")
    assert "\n" not in str(info.value)
    sm86 = BuilderSettings("base", "fp8", "tensorrt-rtx", True, (), (), (), 3, 1 << 30, False, None, "8.6")
    with pytest.raises(CompileError, match="FP8 needs compute capability 8.9\\+ and the target is 8.6") as info:
        engine_from_onnx(graph, tmp_path / "e.engine", sm86)
    assert "\n" not in str(info.value) and not (tmp_path / "e.engine").exists()


@pytest.mark.tensorrt
@needs_rtx
def test_rtx_compile_bundle_records_flavor_version_target_and_unverified_parity(tiny_graphs, tmp_path):
    import tensorrt_rtx_bindings as trt  # noqa: F401 - the version the engines must record

    bundle = _bundle(tmp_path / "b", {"base": ("fp8", tiny_graphs["base"]["fp8"]),
                                      "text_encoder": ("fp16", tiny_graphs["text_encoder"]["fp16"])})
    logs: list[str] = []
    metas = compile_bundle(bundle, R4090, device=current_device(), log=logs.append)
    manifest = json.loads((bundle / "manifest.json").read_text())
    for meta in metas:
        assert (meta.flavor, meta.tensorrt_version, meta.compute_capability, meta.gpu_name) == \
            ("tensorrt-rtx", trt.__version__, "8.9", None)
        assert meta.source_graph_sha256 == manifest["files"][meta.source_graph]["sha256"]
        assert meta.builder["compute_capability"] == "8.9" and meta.builder["strongly_typed"]
        assert meta.engine_bytes > 100_000 and meta.parity["status"] == "unverified"
        assert meta.layers["attention_matmuls_fp32"] == 0 and meta.timing_cache == ""
    assert not (bundle / "engines/timing").exists()   # TensorRT-RTX has no timing cache
    assert any("for SM89 ahead of time" in line for line in logs)


@pytest.mark.tensorrt
@needs_rtx
def test_dla_cores_are_checked_on_build_and_on_load(tiny_graphs, tmp_path):
    """The builder's and the runtime's real num_DLA_cores (0 here) refuse a DLA engine before any build or load."""
    from mova_export.core.errors import ExportError
    from mova_export.runners.tensorrt import TensorRTRunner

    graph = tiny_graphs["base"]["fp16"]
    on_dla = BuilderSettings("base", "fp16", "tensorrt-rtx", True, (), ("GPU_FALLBACK",), (), 3, 1 << 30, False, 0,
                             "8.9")
    with pytest.raises(CompileError, match=r"DLA core 0 but this device has 0 DLA core\(s\) .builder.num_DLA_cores"):
        engine_from_onnx(graph, tmp_path / "dla.engine", on_dla)
    engine = tmp_path / "base.engine"
    engine_from_onnx(graph, engine, builder_settings(R4090, "base", inspect_graph(graph), "fp16"))
    with pytest.raises(ExportError, match=r"runs on DLA core 1 but this device has 0 DLA core\(s\)"):
        TensorRTRunner(engine, flavor="tensorrt-rtx", dla_core=1)
    if current_device().gpu_name is None:   # no GPU: deserialisation fails and says so in one line
        with pytest.raises(ExportError, match="could not deserialize .*no CUDA GPU") as info:
            TensorRTRunner(engine, flavor="tensorrt-rtx")
        assert "\n" not in str(info.value)


def _rtx_gpu() -> str | None:
    dev = current_device()
    return dev.compute_capability if HAS_RTX and dev.compute_capability in RTX_COMPUTE_CAPABILITIES else None


@pytest.mark.gpu
@pytest.mark.skipif(_rtx_gpu() is None, reason="needs TensorRT-RTX and a GPU it targets (SM75/80/86/89/120/121)")
def test_engine_parity_on_the_gpu(tiny_graphs, tmp_path):
    """On an RTX-class GPU: the engine runs through TensorRTRunner (cuda-python buffers, runtime cache) and matches
    its ONNX graph; the runtime cache is written beside it for the next run."""
    pytest.importorskip("cuda.bindings")
    from mova_export.components import get_spec
    from mova_export.source.config import FULL_LLM, MoVAConfig

    cc = _rtx_gpu()
    cfg = MoVAConfig(llm=dict(FULL_LLM), scale="tiny")
    feeds = [{k: np.asarray(v) for k, v in get_spec("base").sample_inputs(cfg, s).items()} for s in range(2)]
    for precision in ("fp16", "int8"):
        graph = tiny_graphs["base"][precision]
        settings = BuilderSettings("base", precision, "tensorrt-rtx", True, (), (), (), 3, 1 << 30, False, None, cc)
        engine_from_onnx(graph, tmp_path / f"{precision}.engine", settings)
        result = engine_parity(tmp_path / f"{precision}.engine", graph, feeds, compute_capability=cc,
                               device=current_device(), flavor="tensorrt-rtx",
                               runtime_cache=tmp_path / f"{precision}.runtime-cache")
        assert result.status == "verified" and result.samples == 2 and result.cosine > 0.999, result
        assert (tmp_path / f"{precision}.runtime-cache").stat().st_size > 0

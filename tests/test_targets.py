"""The devices robotics teams buy now: Jetson Thor, Orin on JetPack 7.2, RTX 5090, DGX Spark. Their recipes load and
plan at MoVA-8B scale, the JetPack a Jetson recipe names decides its TensorRT flavor, the L4T release read from a
Jetson maps to its JetPack, engines record the platform they were built for and a device of another platform refuses
them in one line naming the command that rebuilds them (metadata written by the real compile path: TensorRT-RTX for
the SM89 engine, the compile bookkeeping with a stand-in builder for the Jetson one, which no machine here can build),
and `mova-export recipes` lists every target in 80 columns."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from mova_export.cli import main
from mova_export.compile import (
    BuildResult,
    DeviceInfo,
    EngineParity,
    EngineTools,
    LayerProfile,
    builder_settings,
    can_compile_here,
    check_engine_metadata,
    compile_bundle,
    installed_flavors,
    read_engine_metadata,
)
from mova_export.compile.graph import GraphInfo
from mova_export.core.errors import BundleError, RecipeError
from mova_export.core.jetpack import (
    JETPACKS,
    jetpack_of_l4t,
    parse_l4t_core_version,
    parse_nv_tegra_release,
    read_l4t,
)
from mova_export.core.platforms import TARGET_OF_CC, EnginePlatform, check_platform
from mova_export.pipeline.plan import full_params, plan_from_params
from mova_export.recipe import ALIASES, list_recipes, load_recipe, parse_recipe, resolve_target

NEW = {"jetson-thor": "jetson-thor-agx-128gb", "rtx-5090": "rtx-5090", "dgx-spark": "dgx-spark"}
INT8_FP32_BASE = GraphInfo("x", ("int8",), ("fp32",))
ORIN_JP62 = DeviceInfo.of("Orin", "8.7", {"tensorrt-10": "10.3.0"}, l4t="36.4.3")
ORIN_JP72 = DeviceInfo.of("Orin", "8.7", {"tensorrt": "10.16.2"}, l4t="39.2.0")
HAS_RTX = "tensorrt-rtx" in installed_flavors()


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message, message
    return message


# ---- the recipes ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target,name", sorted(NEW.items()))
def test_new_recipes_load_and_fit_mova_8b(target, name):
    recipe = load_recipe(target)
    assert recipe.name == name == Path(recipe.source).stem and recipe.runtime == "tensorrt"
    assert recipe.tensorrt.fp8 and recipe.tensorrt.dla_cores == 0 and not recipe.tensorrt.dla.components
    assert {recipe.precision["base"], recipe.precision["expert_A"]} == {"fp8"}
    assert recipe.precision["adapter"] == recipe.precision["text_encoder"] == "fp16"
    assert recipe.calibration.method == "minmax" and recipe.experts.policy == "resident"
    plan = plan_from_params(recipe, full_params(), model="the full-size MoVA-8B")
    assert plan.verdict == "fits" and plan.fix == "", plan.message
    assert plan.memory == ("GPU memory" if target == "rtx-5090" else "unified memory"), plan.memory
    assert plan.memory in plan.message


def test_device_facts_of_the_new_recipes():
    thor, r5090, spark = (load_recipe(t) for t in ("jetson-thor", "rtx-5090", "dgx-spark"))
    assert (thor.device.kind, thor.device.cc_str, thor.device.jetpack) == ("jetson", "11.0", "7.1")
    assert thor.device.unified_memory and thor.tensorrt.version == JETPACKS["7.1"].tensorrt == "10.13"
    assert (r5090.device.kind, r5090.device.cc_str, r5090.device.unified_memory) == ("dgpu", "12.0", False)
    assert (spark.device.kind, spark.device.cc_str, spark.device.unified_memory) == ("igpu", "12.1", True)
    assert r5090.device.jetpack is None and spark.device.jetpack is None
    for recipe in (r5090, spark):   # built ahead of time with TensorRT-RTX, like the 4090
        s = builder_settings(recipe, "base")
        assert s.flavor == "tensorrt-rtx" and s.compute_capability == recipe.device.cc_str and s.strongly_typed
    assert builder_settings(thor, "base").flavor == "tensorrt"   # JetPack 7.1's TensorRT 10.13: strongly typed


def test_target_of_every_compute_capability_is_a_recipe_of_it():
    for cc, target in TARGET_OF_CC.items():
        assert load_recipe(target).device.cc_str == cc, target
    assert {ALIASES.get(t, t) for t in TARGET_OF_CC.values()} <= set(list_recipes())


def test_jetson_recipe_refusals_name_the_field_and_the_fix():
    raw = json.loads(json.dumps(_raw("jetson-orin-agx-64gb")))
    raw["device"]["jetpack"] = "7.0"      # Jetson Linux 38.x is Thor only
    with pytest.raises(RecipeError, match="device.jetpack is 7.0 but JetPack 7.0 does not support Jetson AGX "
                                          "Orin 64GB .compute capability 8.7.; use 6.2 or 7.2") as exc:
        parse_recipe(raw, source="t.yaml")
    _one_line(exc)
    raw["device"]["jetpack"] = "7.2"      # still lists two DLA towers
    with pytest.raises(RecipeError, match="tensorrt.dla.components lists expert_E, expert_F but JetPack 7.2's "
                                          "TensorRT 10.16 has no DLA"):
        parse_recipe(raw, source="t.yaml")
    raw = _raw("jetson-orin-agx-64gb")
    raw["tensorrt"]["version"] = "10.16"
    with pytest.raises(RecipeError, match="tensorrt.version is 10.16 but JetPack 6.2 ships TensorRT 10.3; remove"):
        parse_recipe(raw, source="t.yaml")
    raw = _raw("rtx-5090")
    raw["device"]["jetpack"] = "7.2"
    with pytest.raises(RecipeError, match="device.jetpack is set on a dgpu device"):
        parse_recipe(raw, source="t.yaml")
    for target, needle in (("rtx-5090@jetpack7.2", "rtx-5090 is not a Jetson"),
                           ("jetson-orin@7.2", "write the JetPack as NAME@jetpackX.Y"),
                           ("jetson-thor@jetpack6.2", "JetPack 6.2 does not support Jetson AGX Thor 128GB")):
        with pytest.raises(RecipeError, match=needle) as exc:
            load_recipe(target)
        _one_line(exc)


def _raw(name: str) -> dict:
    import yaml

    return yaml.safe_load(resolve_target(name).read_text())


# ---- the JetPack decides the flavor ------------------------------------------------------------------------------------
def test_jetpack_62_vs_72_flavor_choice():
    jp62, jp72 = load_recipe("jetson-orin"), load_recipe("jetson-orin@jetpack7.2")
    assert (jp62.name, jp62.device.jetpack, jp62.tensorrt.version) == ("jetson-orin-agx-64gb", "6.2", "10.3")
    assert (jp72.name, jp72.device.jetpack, jp72.tensorrt.version) == ("jetson-orin-agx-64gb@jetpack7.2", "7.2",
                                                                       "10.16")
    assert load_recipe("jetson-orin@jetpack6.2") == jp62   # the recipe's own JetPack: the plain recipe
    weak = builder_settings(jp62, "base", INT8_FP32_BASE)
    assert weak.flavor == "tensorrt-10" and not weak.strongly_typed and weak.flags == ("INT8", "FP16")
    strong = builder_settings(jp72, "base", INT8_FP32_BASE)
    assert strong.flavor == "tensorrt" and strong.strongly_typed and strong.network_flags == ("STRONGLY_TYPED",)
    assert builder_settings(jp62, "expert_F").dla_core == 0          # JetPack 6.2: TensorRT 10.3 has DLA
    assert builder_settings(jp72, "expert_F").dla_core is None       # JetPack 7.2: no DLA, the tower runs on the GPU
    assert jp72.precision == jp62.precision and "no DLA" in jp72.description
    # `--target jetson-orin` keeps working and says which JetPack it assumed
    assert jp62.platform_note.startswith("JetPack 6.2 assumed (L4T 36.4.3, CUDA 12.6, TensorRT 10.3)")
    assert "--target jetson-orin-agx-64gb@jetpack7.2" in jp62.platform_note
    out = CliRunner().invoke(main, ["plan", "--target", "jetson-orin"], env={"COLUMNS": "200"})
    assert out.exit_code == 0 and "jetson-orin-agx-64gb: JetPack 6.2 assumed" in out.output
    thor72 = load_recipe("jetson-thor@jetpack7.2")
    assert thor72.tensorrt.version == "10.16" and builder_settings(thor72, "base").flavor == "tensorrt"


def test_the_jetson_decides_which_jetpack_compiles():
    jp62, jp72 = load_recipe("jetson-orin"), load_recipe("jetson-orin@jetpack7.2")
    assert can_compile_here(jp62, "b", ORIN_JP62).flavor.flavor == "tensorrt-10"
    assert can_compile_here(jp72, "b", ORIN_JP72).flavor.flavor == "tensorrt"
    wrong = can_compile_here(jp62, "out/b", ORIN_JP72)
    assert not wrong.ok and "this Jetson runs JetPack 7.2 (L4T 39.2.0) but jetson-orin-agx-64gb assumes JetPack " \
        "6.2" in wrong.reason
    assert "`mova-export compile out/b --target jetson-orin-agx-64gb@jetpack7.2`" in wrong.reason
    assert not can_compile_here(jp72, "out/b", ORIN_JP62).ok


def test_l4t_release_maps_to_its_jetpack(tmp_path):
    orin = "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: Wed Jan  8 " \
           "01:49:37 UTC 2025\n# KERNEL_VARIANT: oot\nTARGET_USERSPACE_LIB_DIR=nvidia\n"
    thor = "# R38 (release), REVISION: 2.0, GCID: 41844464, BOARD: generic, EABI: aarch64, DATE: Fri Aug 22 " \
           "00:55:42 UTC 2025\n"
    assert parse_nv_tegra_release(orin) == "36.4.3" and parse_nv_tegra_release(thor) == "38.2.0"
    assert parse_nv_tegra_release("garbage") is None
    assert parse_l4t_core_version("36.4.3-20250107174145") == "36.4.3" and parse_l4t_core_version("39.2.0") == "39.2.0"
    expected = {"36.4.3": "6.2", "36.4.4": "6.2", "36.4.7": "6.2", "38.2.0": "7.0", "38.2.1": "7.0", "38.4.0": "7.1",
                "39.2.0": "7.2", "39.2.1": "7.2", "36.3.0": None, "36.4.0": None, "35.3.1": None}
    for l4t, jetpack in expected.items():
        found = jetpack_of_l4t(l4t)
        assert (found.version if found else None) == jetpack, l4t
    release = tmp_path / "nv_tegra_release"
    release.write_text(orin)
    assert read_l4t(release) == "36.4.3"
    assert read_l4t(tmp_path / "absent", use_dpkg=False) is None
    assert ORIN_JP72.jetpack.version == "7.2" and ORIN_JP72.cuda_major("tensorrt") == 13   # the JetPack's CUDA 13.2


# ---- platform refusals from metadata the compile path wrote --------------------------------------------------------
def _stand_in(onnx_path, engine_path, settings, cache, log=None):
    Path(engine_path).parent.mkdir(parents=True, exist_ok=True)
    Path(engine_path).write_bytes(b"engine:" + Path(onnx_path).read_bytes())
    return BuildResult(0.1, 8, LayerProfile(10, 1, 9, 2, 0), "")


def _unverified(*a, **k):
    return EngineParity("unverified", reason="no GPU here")


def _tiny_bundle(root: Path, precision: str = "int8") -> Path:
    """A one-graph bundle (a small MatMul as the base tower) in the manifest layout compile_bundle reads."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    from mova_export.bundle import GraphEntry, Manifest, RuntimeDefaults, Variant
    from mova_export.components import facts_from_config
    from mova_export.core.spec import TensorSpec
    from mova_export.synth import synthetic_config

    rel = f"graphs/base.{precision}.onnx"
    (root / "graphs").mkdir(parents=True)
    x = helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, [1, 16, 32])
    y = helper.make_tensor_value_info("features", TensorProto.FLOAT, [1, 16, 64])
    w = helper.make_tensor("w", TensorProto.FLOAT, [32, 64], np.linspace(-1, 1, 32 * 64, dtype=np.float32))
    graph = helper.make_graph([helper.make_node("MatMul", ["pixel_values", "w"], ["features"])], "g", [x], [y], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(root / rel))
    entry = GraphEntry("base", "base", "tower", [TensorSpec("pixel_values", (1, 16, 32))],
                       [TensorSpec("features", (1, 16, 64))],
                       {precision: Variant(rel, [rel], (root / rel).stat().st_size)})
    cfg = synthetic_config("tiny")
    Manifest(model=facts_from_config(cfg), config=cfg.to_dict(), graphs={"base": entry}, tokenizers={},
             source_checkpoint={}, tools={}, created_utc="", runtime=RuntimeDefaults({"base": precision}),
             target={"recipe": "jetson-orin-agx-64gb"}).write(root)
    return root


def test_jetpack_62_engine_is_refused_on_jetpack_72_with_the_rebuild_command(tmp_path):
    from mova_export.bundle import load_bundle
    from mova_export.runners.tensorrt import engine_runner

    bundle = _tiny_bundle(tmp_path / "b")
    [meta] = compile_bundle(bundle, load_recipe("jetson-orin"), device=ORIN_JP62,
                            tools=EngineTools(build=_stand_in, verify=_unverified))
    assert (meta.jetpack, meta.l4t, meta.cuda_major, meta.flavor) == ("6.2", "36.4.3", 12, "tensorrt-10")
    assert read_engine_metadata(bundle / "engines/base.int8.engine").to_json() == json.loads(json.dumps(
        meta.to_json())) and meta.built_on
    check_engine_metadata(meta, ORIN_JP62)                 # where it was built: fine
    rebuild = f"`mova-export compile {bundle} --target jetson-orin-agx-64gb@jetpack7.2`"
    with pytest.raises(BundleError) as exc:
        check_engine_metadata(meta, ORIN_JP72, bundle=bundle)
    message = _one_line(exc)
    assert message.startswith("engine for base (int8) was built on JetPack 6.2 (L4T 36.4.3), SM87, tensorrt-10 "
                              "10.3.0, CUDA 12, tuned on Orin but this Jetson runs JetPack 7.2 (L4T 39.2.0)"), message
    assert rebuild in message
    entry = load_bundle(bundle).manifest.engines["base"]   # the runtime reads the same record from the manifest
    assert entry["platform"]["jetpack"] == "6.2" and entry["recipe"] == "jetson-orin-agx-64gb"
    with pytest.raises(BundleError) as exc:
        engine_runner(bundle, entry, "base", device=ORIN_JP72)
    assert rebuild in _one_line(exc)
    # the command it names works: JetPack 7.2's TensorRT, strongly typed, and the bundle now targets that recipe
    [again] = compile_bundle(bundle, load_recipe("jetson-orin@jetpack7.2"), device=ORIN_JP72,
                             tools=EngineTools(build=_stand_in, verify=_unverified))
    assert (again.jetpack, again.flavor, again.tensorrt_version, again.cuda_major) == ("7.2", "tensorrt", "10.16.2", 13)
    assert again.builder["strongly_typed"] and again.recipe == "jetson-orin-agx-64gb@jetpack7.2"
    assert load_bundle(bundle).manifest.target["recipe"] == "jetson-orin-agx-64gb@jetpack7.2"
    check_engine_metadata(again, ORIN_JP72)


@pytest.mark.tensorrt
@pytest.mark.skipif(not HAS_RTX, reason="TensorRT-RTX is not importable (pip install 'mova-export[tensorrt-rtx]')")
def test_sm89_engine_is_refused_on_sm120_with_the_rebuild_command(tmp_path):
    import tensorrt_rtx_bindings as trt

    from mova_export.bundle import load_bundle
    from mova_export.compile import current_device
    from mova_export.runners.tensorrt import engine_runner

    bundle = _tiny_bundle(tmp_path / "b", "fp16")
    [meta] = compile_bundle(bundle, load_recipe("rtx-4090"), device=current_device())   # the real builder
    assert (meta.flavor, meta.tensorrt_version, meta.compute_capability, meta.gpu_name) == \
        ("tensorrt-rtx", trt.__version__, "8.9", None)
    assert meta.cuda_major == 12 and meta.jetpack is None and meta.engine_bytes > 0
    rtx5090 = DeviceInfo.of("NVIDIA GeForce RTX 5090", "12.0", {"tensorrt-rtx": trt.__version__},
                            cuda={"tensorrt-rtx": 12})
    with pytest.raises(BundleError) as exc:
        check_engine_metadata(meta, rtx5090, bundle="out/b")
    message = _one_line(exc)
    assert message.startswith(f"engine for base (fp16) was built for compute capability 8.9 (SM89, tensorrt-rtx "
                              f"{trt.__version__}, CUDA 12) but this device has 12.0 (NVIDIA GeForce RTX 5090)")
    assert "`mova-export compile out/b --target rtx-5090`" in message
    entry = load_bundle(bundle).manifest.engines["base"]
    with pytest.raises(BundleError, match="--target rtx-5090"):
        engine_runner(bundle, entry, "base", device=rtx5090)
    cu13 = DeviceInfo.of("NVIDIA GeForce RTX 4080", "8.9", {"tensorrt-rtx": trt.__version__},
                         cuda={"tensorrt-rtx": 13})
    with pytest.raises(BundleError, match="for CUDA 12 but this device's tensorrt-rtx runs CUDA 13") as exc:
        check_engine_metadata(meta, cu13)
    _one_line(exc)
    check_engine_metadata(meta, DeviceInfo.of("NVIDIA GeForce RTX 4080", "8.9", {"tensorrt-rtx": trt.__version__},
                                              cuda={"tensorrt-rtx": 12}))   # any SM89 card with the same TensorRT


def test_old_records_without_platform_fields_still_check():
    old = EnginePlatform.from_json({"flavor": "tensorrt-10", "tensorrt_version": "10.3.0",
                                    "compute_capability": "8.7", "engine": "engines/base.int8.engine"})
    check_platform(old, DeviceInfo.of("Orin", "8.7", {"tensorrt-10": "10.3.0"}, l4t="39.2.0"), "engine")
    assert old.jetpack is None and old.describe() == "SM87, tensorrt-10 10.3.0"


# ---- the CLI ---------------------------------------------------------------------------------------------------------
def test_recipes_lists_every_target_in_80_columns():
    result = CliRunner().invoke(main, ["recipes"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    too_wide = [line for line in lines if len(line) > 80]
    assert not too_wide, too_wide
    for name in list_recipes():
        assert any(line.split()[:1] == [name] for line in lines), name
    thor = next(i for i, line in enumerate(lines) if line.split()[:1] == ["jetson-thor-agx-128gb"])
    assert "11.0" in lines[thor] and "tensorrt 10.13" in lines[thor] and "JetPack 7.1" in lines[thor + 1]
    spark = next(i for i, line in enumerate(lines) if line.split()[:1] == ["dgx-spark"])
    assert "tensorrt-rtx" in lines[spark] and "SM121 ahead of time" in lines[spark + 1]
    assert "jetson-thor -> jetson-thor-agx-128gb" in " ".join(lines) and "@jetpackX.Y" in result.output


def test_the_cpu_plan_counts_the_attention_scores_onnx_runtime_keeps():
    # ONNX Runtime on a CPU materialises the scores: after one full-size run SAM-H held 4.4 GB, Co-DETR 3.5 GB,
    # where tokens x width x 8 said 0.2 GB; TensorRT's fused attention keeps none (not counted there)
    cpu = plan_from_params(load_recipe("cpu"), full_params())
    live = next(i for i in cpu.items if i.name == "activations")
    assert live.bytes == 6400 * 1024 * 8 * 4 + 2 * 16 * 6400 ** 2 * 4, live   # Co-DETR's global attention
    assert live.detail.startswith("expert_C: 6400 tokens") and "2 x 16 heads x 6400^2 x 4 B scores" in live.detail
    orin = plan_from_params(load_recipe("jetson-orin"), full_params())
    live = next(i for i in orin.items if i.name == "activations")
    assert live.bytes < 2**30 and "scores" not in live.detail, live


def test_plan_refuses_bad_targets_in_one_line_and_says_the_memory_kind():
    result = CliRunner().invoke(main, ["plan", "--target", "jetson-orin@jetpack7.0"])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "JetPack 7.0 does not support Jetson AGX Orin 64GB" in result.output
    result = CliRunner().invoke(main, ["plan", "--target", "dgx-spark", "--json"])
    plan = json.loads(result.output)
    assert plan["verdict"] == "fits" and plan["memory"] == "unified memory" and plan["platform"] is None


def test_nothing_in_the_recipes_folder_is_unlisted():
    folder = Path(__file__).parents[1] / "recipes"
    assert sorted(p.stem for p in folder.glob("*.yaml")) == list_recipes()

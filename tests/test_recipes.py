"""Recipes: every shipped YAML validates; hardware rules (FP8, DLA), unknown keys and bad values are refused naming
the field and the file; aliases; the settings each stage derives from a recipe (its unit key) change only with the
fields that matter."""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from mova_export.compile import builder_settings
from mova_export.core.errors import RecipeError
from mova_export.quantize import QuantSettings
from mova_export.recipe import (
    ALIASES,
    LLMOptions,
    graph_components,
    list_recipes,
    load_recipe,
    parse_recipe,
    resolve_target,
)

COMPONENTS = graph_components()

SHIPPED = ["jetson-orin-agx-64gb", "jetson-orin-nx-16gb", "jetson-orin-nano-8gb", "rtx-4090", "rtx-3090", "h100",
           "cpu"]


def _raw(name: str) -> dict:
    return yaml.safe_load(resolve_target(name).read_text())


def _refused(raw: dict, *needles: str) -> str:
    with pytest.raises(RecipeError) as exc:
        parse_recipe(raw, source="test.yaml")
    message = str(exc.value)
    assert "\n" not in message and "test.yaml" in message
    for needle in needles:
        assert needle in message, message
    return message


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_recipe_validates(name):
    recipe = load_recipe(name)
    assert recipe.name == name == Path(recipe.source).stem
    assert set(recipe.precision) == set(COMPONENTS)
    for precision in set(recipe.precision.values()):
        assert precision in recipe.accuracy
    if recipe.runtime == "tensorrt":
        assert recipe.tensorrt is not None and recipe.device.compute_capability is not None
        assert 0 <= recipe.tensorrt.builder.optimization_level <= 5


def test_list_recipes_holds_every_target():
    assert set(SHIPPED) <= set(list_recipes())


def test_hardware_facts_of_the_shipped_recipes():
    for name in SHIPPED:
        r = load_recipe(name)
        if r.tensorrt is not None and r.tensorrt.fp8:
            assert r.device.compute_capability >= (8, 9)
    assert not load_recipe("jetson-orin-agx-64gb").tensorrt.fp8
    assert load_recipe("rtx-4090").tensorrt.fp8 and load_recipe("h100").tensorrt.fp8
    assert not load_recipe("rtx-3090").tensorrt.fp8
    assert load_recipe("jetson-orin-agx-64gb").tensorrt.dla.components
    assert load_recipe("jetson-orin-nx-16gb").tensorrt.dla_cores == 2
    assert load_recipe("jetson-orin-nano-8gb").tensorrt.dla_cores == 0
    cpu = load_recipe("cpu")
    assert cpu.runtime == "onnxruntime-cpu" and cpu.tensorrt is None and cpu.llm.gpu_layers == 0
    assert all(cpu.precision[c] == "int8" for c in COMPONENTS if c.startswith(("base", "expert_")))


def test_jetson_orin_alias():
    assert ALIASES["jetson-orin"] == "jetson-orin-agx-64gb"
    assert load_recipe("jetson-orin").name == "jetson-orin-agx-64gb"


def test_unknown_target_names_the_choices():
    with pytest.raises(RecipeError, match="unknown target 'jetson-xavier'.*jetson-orin-agx-64gb"):
        load_recipe("jetson-xavier")


def test_load_by_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({**_raw("rtx-3090"), "name": "mine"}))
    assert load_recipe(path).name == "mine"
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")


def test_fp8_on_orin_is_refused_naming_the_field():
    raw = _raw("jetson-orin-agx-64gb")
    raw["precision"]["expert_A"] = "fp8"
    _refused(raw, "precision.expert_A", "fp8")
    raw = _raw("jetson-orin-agx-64gb")
    raw["tensorrt"]["fp8"] = True
    _refused(raw, "tensorrt.fp8", "8.7", "8.9")


def test_fp8_on_cpu_and_ampere_refused():
    raw = _raw("cpu")
    raw["precision"]["base"] = "fp8"
    _refused(raw, "precision.base")
    raw = _raw("rtx-3090")
    raw["tensorrt"]["fp8"] = True
    _refused(raw, "tensorrt.fp8")


def test_dla_on_nano_refused():
    raw = _raw("jetson-orin-nano-8gb")
    raw["tensorrt"]["dla"] = {"components": ["expert_F"], "core": 0, "gpu_fallback": True}
    _refused(raw, "tensorrt.dla.components", "no DLA")
    raw = _raw("jetson-orin-nano-8gb")
    raw["tensorrt"]["dla_cores"] = 2
    _refused(raw, "tensorrt.dla_cores", "Orin Nano")


def test_dla_on_a_dgpu_and_fp32_on_dla_refused():
    raw = _raw("rtx-4090")
    raw["tensorrt"]["dla_cores"] = 1
    _refused(raw, "tensorrt.dla_cores", "not a Jetson")
    raw = _raw("jetson-orin-agx-64gb")
    raw["precision"]["expert_F"] = "fp32"
    _refused(raw, "precision.expert_F", "DLA")


def test_unknown_key_refused_naming_it():
    raw = _raw("rtx-4090")
    raw["tensorrt"]["builder"]["optimisation_level"] = 3
    _refused(raw, "tensorrt.builder.optimisation_level", "not a known recipe key")
    raw = _raw("rtx-4090")
    raw["colour"] = "green"
    _refused(raw, "colour")


def test_unknown_key_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**_raw("h100"), "extra": 1}))
    with pytest.raises(RecipeError, match=r"bad\.yaml: extra is not a known recipe key"):
        load_recipe(path)


@pytest.mark.parametrize("section,key,value,needle", [
    ("precision", "adapter", "int4", "precision.adapter is 'int4'"),
    ("precision", "experts", None, "precision.expert_A is missing"),
    ("llm", "quant", "q2_k", "llm.quant"),
    ("llm", "gpu_layers", "all", "llm.gpu_layers must be int"),
    ("memory", "budget_mib", 10**9, "memory.budget_mib"),
])
def test_bad_values_name_the_field_path(section, key, value, needle):
    raw = _raw("rtx-3090")
    if value is None:
        del raw[section][key]
    else:
        raw[section][key] = value
    _refused(raw, needle)


def test_builder_optimisation_level_range_and_cc_consistency():
    raw = _raw("h100")
    raw["tensorrt"]["builder"]["optimization_level"] = 6
    _refused(raw, "tensorrt.builder.optimization_level", "0..5")
    raw = _raw("rtx-4090")
    raw["device"]["compute_capability"] = "8.6"
    _refused(raw, "device.compute_capability", "8.9")


def test_cpu_recipe_refuses_gpu_layers_and_tensorrt():
    raw = _raw("cpu")
    raw["llm"]["gpu_layers"] = 10
    _refused(raw, "llm.gpu_layers")
    raw = _raw("cpu")
    raw["tensorrt"] = copy.deepcopy(_raw("rtx-3090")["tensorrt"])
    _refused(raw, "tensorrt")


def test_recipes_are_frozen():
    recipe = load_recipe("h100")
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.name = "x"  # type: ignore[misc]


# ---- what each stage reads of a recipe -------------------------------------------------------------------------------
def _keys(recipe) -> dict[str, str]:
    """What every build stage derives from a recipe (each unit's key hashes it): per component the quantize settings
    (or the shipped float precision) and the TensorRT builder settings, the GGUF type, and the runtime defaults
    (no unit: they go into the manifest)."""
    out = {}
    for c in COMPONENTS:
        p = recipe.precision_of(c)
        out[f"quantize/{c}"] = QuantSettings.from_recipe(recipe, c).to_json() if p in ("int8", "fp8") else p
        if recipe.tensorrt is not None:
            out[f"compile/{c}"] = builder_settings(recipe, c).to_json()
    out["gguf"] = recipe.llm.quant
    out["runtime"] = [recipe.to_dict()[k] for k in ("llm", "experts", "memory", "runtime")]
    return out


def test_stage_settings_change_only_with_the_fields_that_matter():
    base = load_recipe("jetson-orin-agx-64gb")
    keys = _keys(base)
    assert keys == _keys(load_recipe("jetson-orin"))

    def changed(recipe):
        return {k for k, v in _keys(recipe).items() if v != keys[k]}

    # runtime-only LLM options rebuild nothing
    assert changed(replace(base, llm=replace(base.llm, context=2048, gpu_layers=10, threads=4))) == {"runtime"}
    # the LLM quant only the GGUF (and the runtime)
    assert changed(replace(base, llm=replace(base.llm, quant="q4_k_m"))) == {"gguf", "runtime"}
    # one component's precision: that component's quantize and compile, nothing else
    precision = {**base.precision, "expert_A": "fp16"}
    assert changed(replace(base, precision=precision)) == {"quantize/expert_A", "compile/expert_A"}
    # builder options: every compile
    trt = replace(base.tensorrt, builder=replace(base.tensorrt.builder, optimization_level=5))
    assert changed(replace(base, tensorrt=trt)) == {f"compile/{c}" for c in COMPONENTS}
    # moving one component onto the DLA: its compile only
    dla = replace(base.tensorrt, dla=replace(base.tensorrt.dla, components=(*base.tensorrt.dla.components, "base")))
    assert changed(replace(base, tensorrt=dla)) == {"compile/base"}
    # calibration samples, held-out samples, the quantization backend: every quantized component
    quantized = {f"quantize/{c}" for c in COMPONENTS if base.precision[c] == "int8"}
    for change in (dict(samples=64), dict(held_out=16), dict(backend="onnxruntime" if
                                                               base.calibration.backend != "onnxruntime" else "auto")):
        calibration = replace(base.calibration, **change)
        got = changed(replace(base, calibration=calibration))
        assert got == quantized or (change.get("backend") and got == set()), (change, got)
    # the int8 budget: the int8 components' quantize only (the adapter is fp16 here)
    accuracy = {**base.accuracy, "int8": replace(base.accuracy["int8"], min_cosine=0.99)}
    assert changed(replace(base, accuracy=accuracy)) == quantized
    # the source file path and description are in no key
    assert changed(replace(base, source="elsewhere.yaml", description="x")) == set()
    # the runtime decides how the gate runs Q/DQ and the float base around the pairs
    cpu = load_recipe("cpu")
    assert QuantSettings.from_recipe(cpu, "base").to_json() != QuantSettings.from_recipe(base, "base").to_json()
    assert isinstance(LLMOptions("q8_0", -1, 4096, 8), LLMOptions)


def test_recipe_precision_groups_cover_new_components():
    """`experts:` gives every registered expert without its own entry its precision; `default:` every other one."""
    raw = _raw("cpu")
    assert "experts" in raw["precision"] and "expert_A" not in raw["precision"]
    assert all(load_recipe("cpu").precision[c] == "int8" for c in COMPONENTS if c.startswith("expert_"))
    raw["precision"] = {"default": "fp16", "expert_C": "int8"}
    recipe = parse_recipe(raw, source="test.yaml")
    assert recipe.precision["expert_C"] == "int8" and recipe.precision["adapter"] == "fp16"
    raw["precision"] = {"base": "int8"}
    _refused(raw, "precision.expert_A", "is missing", "experts:")


def test_entropy_calibration_cannot_calibrate_fp8():
    raw = _raw("rtx-4090")
    raw["calibration"]["method"] = "entropy"
    _refused(raw, "calibration.method", "entropy", "minmax or percentile")
    del raw["calibration"]  # no calibration section: the default becomes minmax where fp8 is used
    assert parse_recipe(raw, source="test.yaml").calibration.method == "minmax"
    assert load_recipe("cpu").calibration.method == "entropy"  # int8-only targets keep entropy

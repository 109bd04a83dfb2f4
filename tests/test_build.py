"""`mova-export build` end to end on the tiny synthetic MoVA: INT8 (cpu, Orin) and FP8 (RTX 4090) Q/DQ bundles that
run in ONNX Runtime, the parity report, the accuracy-budget fallback, stage reuse, and the CLI's one-line errors.

One export (3 real images from a --calib folder) serves every target: later builds start from a copy of the first
bundle, so their export stage is reused (which is itself under test)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from click.testing import CliRunner

from mova_export.cli import main
from mova_export.errors import MoVAExportError, RecipeError
from mova_export.pipeline import build
from mova_export.runtime.runners import OrtRunner

CALIB = {"astronaut": "What is the person wearing?", "coffee": "What is in the cup?",
         "chelsea": "What animal is this?"}


@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory):
    from PIL import Image

    from mova_export.samples import sample_images

    folder = tmp_path_factory.mktemp("calib")
    images = sample_images()
    lines = []
    for name, question in CALIB.items():
        Image.fromarray(images[name]).save(folder / f"{name}.png")
        lines.append(f"{name}.png\t{question}")
    (folder / "questions.txt").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from mova_export.synth import write_synthetic_checkpoint

    return write_synthetic_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", scale="tiny", progress=False)


@pytest.fixture(scope="module")
def cpu_bundle(checkpoint, calib_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("builds") / "cpu"
    result = build(checkpoint, "cpu", out, calib=calib_dir, progress=False)
    return out, result


def _build_from_copy(cpu_bundle, checkpoint, calib_dir, tmp_path, target):
    out = tmp_path / Path(str(target)).stem
    shutil.copytree(cpu_bundle[0], out)
    return out, build(checkpoint, target, out, calib=calib_dir, progress=False)


def _manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def _op_count(path: Path, op: str) -> int:
    return sum(n.op_type == op for n in onnx.load(str(path), load_external_data=False).graph.node)


def _calib_feed(bundle: Path, manifest: dict, name: str) -> dict:
    data = np.load(bundle / manifest["calibration"][name]["file"])
    return {k: data[k][0] for k in data.files}


def test_cpu_bundle_has_int8_graphs_that_run_in_onnxruntime(cpu_bundle):
    out, result = cpu_bundle
    m = _manifest(out)
    assert m["target"]["recipe"] == "cpu" and m["runtime"]["vision_backend"] == "onnxruntime"
    assert m["calibration"]["base"]["samples"] == sorted(CALIB)  # the folder's images in name order
    for name in ["base", *(f"expert_{c}" for c in "ABCDEFG"), "text_encoder"]:
        decision = m["quantize"][name]
        assert decision["requested"] == "int8" and decision["final"] in ("int8", "int8-partial"), name
        assert decision["measured"]["cosine"] >= decision["budget"]["min_cosine"] == 0.995, name
        graph = out / m["graphs"][name]["variants"]["int8"]["graph"]
        assert _op_count(graph, "QuantizeLinear") > 0 and _op_count(graph, "DequantizeLinear") > 0, name
        assert m["runtime"]["precision"][name] == "int8"
        # it runs, and stays close to the fp32 graph on a real calibration feed
        feed = _calib_feed(out, m, name)
        fp32 = OrtRunner(out / m["graphs"][name]["variants"]["fp32"]["graph"]).infer(feed)
        int8 = OrtRunner(graph).infer(feed)
        for key, ref in fp32.items():
            cos = float(np.dot(ref.ravel(), int8[key].ravel()) / np.linalg.norm(ref) / np.linalg.norm(int8[key]))
            assert cos > 0.99, (name, key, cos)
    assert m["runtime"]["precision"]["adapter"] == "fp32" and "adapter" not in [
        n for n, d in m["quantize"].items() if d["final"] != d["requested"]]
    assert m["llm"]["qtype"] == "q4_k_m" and (out / m["llm"]["gguf"]).is_file()
    assert m["memory_plan"]["verdict"] == "fits"
    assert m["stages"]["compile"]["status"] == "skipped"
    # the report, in both forms, with one row per component
    report = json.loads((out / "report.json").read_text())
    assert [r["component"] for r in report["components"]] == m["components"]
    assert all(r["fp32_vs_torch_min_cosine"] >= 0.99999 for r in report["components"])
    md = (out / "report.md").read_text()
    assert "| expert_C | int8 |" in md and "Memory plan" in md
    assert [s.name for s in result.stages] == ["export", "quantize", "gguf", "plan", "compile"]
    assert not any(s.reused for s in result.stages)


def test_unchanged_rebuild_reuses_every_stage(cpu_bundle, checkpoint, calib_dir, tmp_path):
    out, result = _build_from_copy(cpu_bundle, checkpoint, calib_dir, tmp_path, "cpu")
    stages = {s.name: s for s in result.stages}
    assert stages["export"].reused and stages["quantize"].reused and stages["gguf"].reused
    assert _manifest(out)["files"] == _manifest(cpu_bundle[0])["files"] | {
        k: v for k, v in _manifest(out)["files"].items() if k.startswith("report")}


def test_orin_bundle_reuses_the_export_and_says_how_to_compile(cpu_bundle, checkpoint, calib_dir, tmp_path):
    out, result = _build_from_copy(cpu_bundle, checkpoint, calib_dir, tmp_path, "jetson-orin")
    stages = {s.name: s for s in result.stages}
    assert stages["export"].reused and not stages["gguf"].reused  # q8_0 on the Orin vs q4_k_m on cpu
    m = _manifest(out)
    assert m["target"]["recipe"] == "jetson-orin-agx-64gb" and m["target"]["compute_capability"] == "8.7"
    assert m["runtime"]["precision"]["base"] == "int8" and m["llm"]["qtype"] == "q8_0"
    assert not any(p.suffix == ".gguf" and "q4_k_m" in p.name for p in (out / "llm").iterdir())
    assert stages["compile"].detail["status"] == "skipped"
    assert "mova-export compile" in stages["compile"].detail["on_device"]


def test_rtx4090_bundle_has_valid_fp8_graphs(cpu_bundle, checkpoint, calib_dir, tmp_path):
    out, _ = _build_from_copy(cpu_bundle, checkpoint, calib_dir, tmp_path, "rtx-4090")
    m = _manifest(out)
    for name in ["base", *(f"expert_{c}" for c in "ABCDEFG")]:
        decision = m["quantize"][name]
        assert decision["requested"] == "fp8", name
        if decision["final"] == "fp16":
            continue  # a component may fall back; the decision says so, the test below covers the mechanism
        graph = out / m["graphs"][name]["variants"]["fp8"]["graph"]
        model = onnx.load(str(graph))
        onnx.checker.check_model(model, full_check=True)
        fp8 = {onnx.TensorProto.FLOAT8E4M3FN}
        assert any(t.data_type in fp8 for t in model.graph.initializer), name
        assert decision["measured"]["cosine"] >= 0.995 and decision["parity_method"] in ("ort", "simulated-fp8")
    assert m["runtime"]["precision"]["adapter"] == "fp16" and "int8" not in m["graphs"]["base"]["variants"]


def test_impossible_budget_falls_back_to_fp16_and_is_recorded(cpu_bundle, checkpoint, calib_dir, tmp_path):
    recipe = yaml.safe_load((Path(__file__).parents[1] / "recipes" / "cpu.yaml").read_text())
    recipe["name"] = "cpu-strict"
    recipe["precision"] = {k: "fp32" for k in recipe["precision"]} | {"text_encoder": "int8"}
    recipe["accuracy"]["int8"] = {"min_cosine": 0.99999999}
    path = tmp_path / "cpu-strict.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out, _ = _build_from_copy(cpu_bundle, checkpoint, calib_dir, tmp_path, path)
    m = _manifest(out)
    decision = m["quantize"]["text_encoder"]
    assert decision["requested"] == "int8" and decision["final"] == "fp16" and decision["tries"] >= 2
    assert m["runtime"]["precision"]["text_encoder"] == "fp16"
    assert "int8" not in m["graphs"]["text_encoder"]["variants"]
    assert "int8" not in m["graphs"]["base"]["variants"]  # fp32 in this recipe: the copied int8 graph is dropped
    report = (out / "report.md").read_text()
    assert "| text_encoder | int8 | fp16 |" in report


def test_bad_inputs_are_one_line_errors_and_leave_nothing(checkpoint, tmp_path):
    runner = CliRunner()
    out = tmp_path / "never"
    cases = [
        (["build", "--target", "jetson-xavier", "--checkpoint", str(checkpoint), "--out", str(out)],
         "jetson-xavier"),
        (["build", "--target", "cpu", "--checkpoint", str(tmp_path / "nope"), "--out", str(out)], "does not exist"),
        (["build", "--target", "cpu", "--checkpoint", str(checkpoint), "--out", str(out), "--calib",
          str(tmp_path / "nocalib")], "calibration folder"),
    ]
    for args, needle in cases:
        res = runner.invoke(main, args)
        assert res.exit_code == 2, (args, res.output)
        lines = [line for line in res.output.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and needle in lines[0], res.output
    assert not out.exists() and not list(tmp_path.glob(".never*"))
    with pytest.raises(RecipeError):
        build(checkpoint, tmp_path / "missing.yaml", out, progress=False)
    assert issubclass(RecipeError, MoVAExportError)

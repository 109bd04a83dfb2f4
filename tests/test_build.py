"""`mova-export build` end to end on the tiny synthetic MoVA: INT8 (cpu, Orin) and FP8 (RTX 4090) Q/DQ bundles that
run in ONNX Runtime, the report, the accuracy-budget fallback, the memory plan's refusal, unit reuse across output
folders and recipes, and the CLI's one-line errors.

Every build here shares the session's work folder (conftest.py): the export-only bundle computed every features and
export unit, so each build only quantizes what its recipe asks (and reuses what another build quantized)."""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from click.testing import CliRunner
from conftest import CALIB
from helpers import cli_error, one_line

from mova_export.bundle import load_bundle
from mova_export.cli import main
from mova_export.core.errors import BuildError, MoVAExportError, RecipeError
from mova_export.export import read_feeds
from mova_export.pipeline import BuildRequest, WorkFolder, build
from mova_export.runners.ort import OrtRunner

RECIPES = Path(__file__).parents[1] / "recipes"
TOWERS = ["base", *(f"expert_{c}" for c in "ABCDEFG")]
COMPONENTS = [*TOWERS, "text_encoder", "adapter"]                     # one export unit each
GRAPHS = [*TOWERS, "text_encoder", "adapter_routing", "adapter_slots3", "adapter"]   # the adapter: three forms


def _op_count(path: Path, op: str) -> int:
    return sum(n.op_type == op for n in onnx.load(str(path), load_external_data=False).graph.node)


def _export_unit(work_dir: Path, manifest, name: str) -> Path:
    return WorkFolder(work_dir).unit("export", name, manifest.stages[f"export/{name}"]["key"]).path


def _statuses(records) -> dict[str, str]:
    return {f"{r.stage}/{r.name}": r.status for r in records}


def _recipe_copy(tmp_path: Path, name: str, old: str, new: str) -> Path:
    """recipes/<name>.yaml copied to tmp_path with exactly one line changed."""
    lines = (RECIPES / f"{name}.yaml").read_text().splitlines(keepends=True)
    hits = [i for i, line in enumerate(lines) if line.startswith(old)]
    assert len(hits) == 1, (name, old)
    lines[hits[0]] = new + "\n"
    path = tmp_path / f"{name}-changed.yaml"
    path.write_text("".join(lines))
    return path


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


# ---- cpu: INT8 vision graphs in ONNX Runtime -------------------------------------------------------------------------

def test_cpu_bundle_has_int8_graphs_that_run_in_onnxruntime(cpu_build, work_dir):
    out, m = cpu_build.bundle, cpu_build.manifest
    assert m.target["recipe"] == "cpu" and m.runtime.vision_backend == "onnxruntime"
    assert m.export["calibration"]["images"] == sorted(CALIB)  # the folder's images in name order
    for name in [*TOWERS, "text_encoder"]:
        decision = m.quantize[name]
        assert decision["requested"] == "int8" and decision["final"] in ("int8", "int8-partial"), name
        assert decision["measured"]["cosine"] >= decision["budget"]["min_cosine"] == 0.995, name
        assert m.runtime.precision[name] == "int8" and list(m.graphs[name].variants) == ["int8"], name
        graph = out / m.graphs[name].variants["int8"].graph
        assert _op_count(graph, "QuantizeLinear") > 0 and _op_count(graph, "DequantizeLinear") > 0, name
        # it runs, and stays close to the export's fp32 graph on a real calibration feed from the work folder
        unit = _export_unit(work_dir, m, name)
        feed = read_feeds(unit / "calibration" / f"{name}.npz")[0]
        fp32 = OrtRunner(unit / "graphs" / f"{name}.fp32.onnx").infer(feed)
        int8 = OrtRunner(graph).infer(feed)
        for key, ref in fp32.items():
            assert _cosine(ref, int8[key]) > 0.99, (name, key)
    assert m.runtime.precision["adapter"] == "fp32" and m.quantize["adapter"]["final"] == "fp32"
    assert m.llm.qtype == "q4_k_m" and (out / m.llm.gguf).is_file() and list(m.llms) == ["q4_k_m"]
    assert m.memory_plan["verdict"] == "fits"
    assert m.stages["compile"]["status"] == "skipped" and not m.engines and not m.checks
    # one unit per stage and component, computed or reused; the features / export ones were the export-only run's
    records = _statuses(cpu_build.records)
    assert {k.split("/")[0] for k in records} == {"features", "export", "quantize", "gguf"}
    assert {f"quantize/{n}" for n in [*TOWERS, "text_encoder"]} | {"gguf/q4_k_m"} <= set(records)
    assert all(records[f"export/{n}"] == "reused" for n in COMPONENTS)


def test_report_json_and_markdown(cpu_build):
    out, m = cpu_build.bundle, cpu_build.manifest
    report = cpu_build.report
    assert load_bundle(out).manifest.report == {"json": "report.json", "markdown": "report.md"}
    assert (out / "report.json").read_text().strip() and report["target"] == "cpu"
    assert [r["graph"] for r in report["components"]] == list(m.graphs) == GRAPHS
    for row in report["components"]:
        assert row["fp32_vs_torch_min_cosine"] >= 0.99999, row
        assert row["shipped"] == m.runtime.precision[row["graph"]] and row["bytes"] > 0
        if row["shipped"] == "int8":
            assert row["shipped_vs_reference_cosine"] >= row["budget_min_cosine"] == 0.995
    assert report["llm"]["qtype"] == "q4_k_m" and report["memory_plan"]["verdict"] == "fits"
    assert {(s["stage"], s["name"]) for s in report["stages"]} == {(r.stage, r.name) for r in cpu_build.records}
    assert report["source_checkpoint"] == m.source_checkpoint["digest"]
    md = (out / "report.md").read_text()
    assert re.search(r"^\| expert_C \| int8 \| int8(-partial)? \| ", md, re.M), md
    assert "| adapter | fp32 | fp32 |" in md and "Memory plan" in md and "**fits**" in md
    assert "`llm/model.q4_k_m.gguf` (q4_k_m)" in md and "| export | base | reused |" in md
    # the gate's worst held-out image per quantized graph: the session's three photos (sorted), the middle one held out
    assert re.search(r"^\| base \| int8 \| int8(-partial)? \| [\d.]+ \| [\d.]+ \| chelsea \(of 1\) \| ", md, re.M), md


def test_a_short_calibration_set_is_said_in_the_log_and_the_report(cpu_build):
    """The session calibrates on three photos; the cpu recipe asks for 20 + 8: every quantized graph says so."""
    shortfall = ("the recipe asks for 20 calibration + 8 held-out samples; the calibration set has 3: calibrating "
                 "on 2, judging on 1 (pass --calib with more images)")
    decisions = cpu_build.manifest.quantize
    quantized = [g for g, d in decisions.items() if d["requested"] == "int8"]
    assert quantized and all(decisions[g]["calibration"]["shortfall"] == shortfall for g in quantized)
    assert cpu_build.report["calibration"]["shortfall"] == [shortfall]
    assert f"**Calibration shortfall**: {shortfall}" in (cpu_build.bundle / "report.md").read_text()
    log = (cpu_build.bundle / "build.log").read_text()
    assert all(f"WARNING {g}: {shortfall}" in log for g in quantized)


def test_a_quantize_unit_made_by_one_backend_is_not_reused_by_the_other(tiny_checkpoint, calib_dir, work_dir,
                                                                        cpu_build, tmp_path, monkeypatch):
    """The unit key is the QuantSettings with the backend resolved: where nvidia-modelopt imports ("auto" picks
    it), the units onnxruntime made are not reused; the modelopt writer runs (a stand-in here, which stops)."""
    from mova_export.quantize import qdq, settings

    class Ran(Exception):
        pass

    def modelopt_ran(*args, **kwargs):
        raise Ran("the modelopt writer ran")

    monkeypatch.setattr(settings, "modelopt_module", lambda: object())
    monkeypatch.setattr(qdq, "modelopt_qdq", modelopt_ran)
    work = tmp_path / "work"
    shutil.copytree(work_dir, work, copy_function=shutil.copy2)
    with pytest.raises(Ran):
        build(BuildRequest(checkpoint=tiny_checkpoint, target="cpu", out=tmp_path / "b", calib=calib_dir,
                           work_dir=work, quiet=True))


def test_each_file_is_hashed_once_per_build(tiny_checkpoint, calib_dir, work_dir, cpu_build, tmp_path, monkeypatch):
    from collections import Counter

    from mova_export.bundle import files

    hashed: Counter = Counter()
    real = files.sha256_file

    def counting(path, *args, **kwargs):
        hashed[Path(path).resolve()] += 1
        return real(path, *args, **kwargs)

    monkeypatch.setattr(files, "sha256_file", counting)
    result = build(BuildRequest(checkpoint=tiny_checkpoint, target="cpu", out=tmp_path / "b", calib=calib_dir,
                                work_dir=work_dir, quiet=True))
    twice = {p: n for p, n in hashed.items() if n > 1}
    assert not twice, twice
    # every shipped file was hashed (once), in the staged folder that became the bundle
    staged = {p.relative_to(tmp_path.resolve()).parts[1:] for p in hashed if tmp_path.resolve() in p.parents}
    assert {tuple(Path(rel).parts) for rel in result.manifest.files} <= staged


# ---- reuse -----------------------------------------------------------------------------------------------------------

def test_second_build_into_another_folder_reuses_every_unit(tiny_checkpoint, calib_dir, work_dir, cpu_build, tmp_path):
    again = build(BuildRequest(checkpoint=tiny_checkpoint, target="cpu", out=tmp_path / "again", calib=calib_dir,
                               work_dir=work_dir, quiet=True))
    statuses = _statuses(again.records)
    assert statuses.keys() == _statuses(cpu_build.records).keys()
    assert set(statuses.values()) == {"reused"}, statuses
    assert [r.key for r in again.records] == [r.key for r in cpu_build.records]
    # a reused unit still says what producing it took: a resumed build's report adds up the whole cost
    computed = {(r.stage, r.name): r for r in cpu_build.records if r.status == "computed"}
    assert computed and all("computed_s" in r.detail for r in again.records)
    for r in again.records:
        if (r.stage, r.name) in computed:
            first_time = computed[(r.stage, r.name)]
            assert r.detail["computed_s"] == first_time.detail["computed_s"] <= first_time.seconds + 0.01, r
    total = sum(r.detail["computed_s"] for r in again.records) / 60
    assert f"the earlier ones that produced the reused units: {total:.1f} min." in (tmp_path / "again" /
                                                                                   "report.md").read_text()
    first, second = cpu_build.manifest.files, again.manifest.files
    assert {k: v for k, v in second.items() if not k.startswith("report")} == \
        {k: v for k, v in first.items() if not k.startswith("report")}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]


def test_a_bundle_file_edited_in_place_is_not_reused(tiny_checkpoint, calib_dir, work_dir, cpu_build, tmp_path):
    """Bundle files are hard links to the work units' files: those are read-only, and a unit whose files changed
    since it finished (an edit through a link, as root or after a chmod) is produced again, not reused."""
    work = tmp_path / "work"
    shutil.copytree(work_dir, work, copy_function=shutil.copy2)   # copy2 keeps the mtimes the units recorded
    first = build(BuildRequest(checkpoint=tiny_checkpoint, target="cpu", out=tmp_path / "one", calib=calib_dir,
                               work_dir=work, quiet=True))
    assert set(_statuses(first.records).values()) == {"reused"}
    edited = tmp_path / "one" / first.manifest.graphs["expert_F"].variants["int8"].graph
    assert not edited.stat().st_mode & 0o222   # read-only, like the unit file it links to
    edited.chmod(0o644)
    with edited.open("ab") as f:
        f.write(b"\0")
    second = build(BuildRequest(checkpoint=tiny_checkpoint, target="cpu", out=tmp_path / "two", calib=calib_dir,
                                work_dir=work, quiet=True))
    statuses = _statuses(second.records)
    assert statuses["quantize/expert_F"] == "computed"
    assert {k for k, v in statuses.items() if v == "computed"} == {"quantize/expert_F"}
    assert "quantize expert_F: the work folder's unit was modified since it finished" in \
        (tmp_path / "two" / "build.log").read_text()
    assert load_bundle(tmp_path / "two").manifest.files == second.manifest.files   # verified: the rebuilt file
    assert second.manifest.files[edited.relative_to(tmp_path / "one").as_posix()] == \
        cpu_build.manifest.files[edited.relative_to(tmp_path / "one").as_posix()]


def test_build_replaces_only_a_previous_bundle(tiny_checkpoint, calib_dir, work_dir, cpu_build, tmp_path):
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_bytes(b"jpeg")
    with pytest.raises(BuildError, match="is not empty and holds no mova-export bundle; choose a new folder") as info:
        build(BuildRequest(checkpoint=tiny_checkpoint, target="cpu", out=other, calib=calib_dir, work_dir=work_dir,
                           quiet=True))
    one_line(info)
    assert [p.name for p in tmp_path.iterdir()] == ["photos"] and (other / "holiday.jpg").read_bytes() == b"jpeg"


def test_changing_one_components_precision_requantizes_only_it(tiny_checkpoint, calib_dir, work_dir, rtx4090_build,
                                                               tmp_path, monkeypatch):
    recipe = _recipe_copy(tmp_path, "rtx-4090", "  text_encoder: fp16", "  text_encoder: int8")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)   # onnxruntime's shape inference once dumped its files here (the text encoder's int8)
    work = tmp_path / "work"   # a hard-linked copy without any text_encoder quantization (cpu's and Orin's)
    shutil.copytree(work_dir, work, copy_function=os.link, ignore=lambda folder, names: (
        ["text_encoder"] if Path(folder).name == "quantize" else []))
    result = build(BuildRequest(checkpoint=tiny_checkpoint, target=recipe, out=tmp_path / "out", calib=calib_dir,
                                work_dir=work, quiet=True, compile=False))
    statuses = _statuses(result.records)
    assert statuses.pop("quantize/text_encoder") == "computed"
    assert set(statuses.values()) == {"reused"}, statuses
    assert "quantize/text_encoder" not in _statuses(rtx4090_build.records)   # fp16 there: nothing was quantized
    m = result.manifest
    assert m.quantize["text_encoder"]["requested"] == "int8" and m.runtime.precision["text_encoder"] in (
        "int8", "fp16")
    assert {n: m.runtime.precision[n] for n in TOWERS} == {n: rtx4090_build.manifest.runtime.precision[n]
                                                           for n in TOWERS}
    assert list(cwd.iterdir()) == []


def test_no_reuse_recomputes(tiny_checkpoint, calib_dir, work_dir, cpu_build, tmp_path):
    work = tmp_path / "work"     # hard-linked copy of the session's units: recomputing here leaves those alone
    shutil.copytree(work_dir, work, copy_function=os.link)
    args = ["build", "--target", "cpu", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "out"),
            "--calib", str(calib_dir), "--work-dir", str(work), "--components", "text_encoder", "--quiet"]
    reused = CliRunner().invoke(main, args)
    assert reused.exit_code == 0, reused.output
    again = load_bundle(tmp_path / "out").manifest.stages
    units = {k: v for k, v in again.items() if "/" in k}
    assert set(units) == {"features/text_encoder", "export/text_encoder", "quantize/text_encoder", "gguf/q4_k_m"}
    assert {v["status"] for v in units.values()} == {"reused"}
    fresh = CliRunner().invoke(main, [*args, "--no-reuse"])
    assert fresh.exit_code == 0, fresh.output
    stages = load_bundle(tmp_path / "out").manifest.stages
    assert {k: v["status"] for k, v in stages.items() if "/" in k} == dict.fromkeys(units, "computed")
    assert all(stages[k]["key"] == units[k]["key"] for k in units)   # same inputs, same keys: replaced in place
    assert cpu_build.manifest.stages["quantize/text_encoder"]["key"] == units["quantize/text_encoder"]["key"]


# ---- TensorRT targets ------------------------------------------------------------------------------------------------

def test_orin_bundle_reuses_the_export_and_says_how_to_compile(orin_build, cpu_build):
    out, m = orin_build.bundle, orin_build.manifest
    statuses = _statuses(orin_build.records)
    assert all(statuses[f"export/{n}"] == "reused" for n in COMPONENTS)
    assert "gguf/q8_0" in statuses and "gguf/q4_k_m" not in statuses   # q8_0 on the Orin vs q4_k_m on cpu
    assert orin_build.manifest.stages["quantize/base"]["key"] != cpu_build.manifest.stages["quantize/base"]["key"]
    assert m.target["recipe"] == "jetson-orin-agx-64gb" and m.target["compute_capability"] == "8.7"
    assert m.runtime.precision["base"] == "int8" and m.runtime.precision["adapter"] == "fp16"
    assert m.llm.qtype == "q8_0" and [p.name for p in (out / "llm").iterdir()] == ["model.q8_0.gguf"]
    assert m.runtime.vision_backend == "tensorrt"
    # held-out real-image feeds for engine parity on the device, one per graph, in the file table
    assert set(m.checks) == set(m.graphs)
    for name, rel in m.checks.items():
        assert rel == f"checks/{name}.npz" and rel in m.files
        with np.load(out / rel) as feed:
            assert sorted(feed.files) == sorted(t.name for t in m.graphs[name].inputs)
    compile_info = m.stages["compile"]
    assert compile_info["status"] == "skipped" and orin_build.compile == compile_info
    assert "mova-export compile" in compile_info["on_device"] and "jetson-orin-agx-64gb" in compile_info["on_device"]


def test_rtx4090_bundle_has_valid_fp8_graphs(rtx4090_build):
    out, m = rtx4090_build.bundle, rtx4090_build.manifest
    fp8_graphs = 0
    for name in TOWERS:
        decision = m.quantize[name]
        assert decision["requested"] == "fp8", name
        if decision["final"] == "fp16":
            assert m.runtime.precision[name] == "fp16"
            continue  # a component may fall back; the decision says so, the budget test covers the mechanism
        graph = out / m.graphs[name].variants["fp8"].graph
        model = onnx.load(str(graph))
        onnx.checker.check_model(model, full_check=True)
        assert any(t.data_type == onnx.TensorProto.FLOAT8E4M3FN for t in model.graph.initializer), name
        assert decision["measured"]["cosine"] >= 0.995 and decision["parity_method"] in ("ort", "simulated-fp8")
        fp8_graphs += 1
    assert fp8_graphs > 0
    assert m.runtime.precision["adapter"] == "fp16" and m.runtime.precision["text_encoder"] == "fp16"
    assert "int8" not in m.graphs["base"].variants and set(m.checks) == set(m.graphs)


# ---- budget fallback and memory plan -----------------------------------------------------------------------------

def test_impossible_budget_falls_back_and_is_recorded(tiny_checkpoint, calib_dir, work_dir, tmp_path):
    recipe = yaml.safe_load((RECIPES / "cpu.yaml").read_text())
    recipe["name"] = "cpu-strict"
    recipe["precision"] = {k: "fp32" for k in recipe["precision"]} | {"text_encoder": "int8"}
    recipe["accuracy"]["int8"] = {"min_cosine": 1.0, "max_rel_l2": 1e-9}   # the tiny BERT's int8 reaches 0.99999999
    recipe["calibration"]["fallback"] = "fp16"
    path = tmp_path / "cpu-strict.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = build(BuildRequest(checkpoint=tiny_checkpoint, target=path, out=tmp_path / "strict", calib=calib_dir,
                                work_dir=work_dir, quiet=True))
    m = result.manifest
    decision = m.quantize["text_encoder"]
    assert decision["requested"] == "int8" and decision["final"] == "fp16" and decision["tries"] >= 2
    assert decision["measured"]["rel_l2"] > 1e-9 and not decision["budget_met"]   # fp16 misses it too: recorded
    assert [h["excluded"] for h in decision["history"]][-1] is None and decision["history"][-1]["fallback"] == "fp16"
    assert m.runtime.precision["text_encoder"] == "fp16" and list(m.graphs["text_encoder"].variants) == ["fp16"]
    assert list(m.graphs["base"].variants) == ["fp32"]  # fp32 in this recipe: no int8 graph shipped
    assert "| text_encoder | int8 | fp16 |" in (result.bundle / "report.md").read_text()
    # no fallback allowed: the build refuses, in one line, with nothing written
    recipe["calibration"]["fallback"] = "none"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(BuildError, match=r"text_encoder: int8 misses the recipe's accuracy budget .* "
                                         r"calibration.fallback is none") as info:
        build(BuildRequest(checkpoint=tiny_checkpoint, target=path, out=tmp_path / "none", calib=calib_dir,
                           work_dir=work_dir, quiet=True))
    one_line(info)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cpu-strict.yaml", "strict"]


def test_memory_plan_refuses_unless_allowed(tiny_checkpoint, calib_dir, work_dir, orin_build, cpu_build, tmp_path):
    """The tiny checkpoint fits the real Orin Nano (its full-size refusal is test_memory's); here the Nano recipe
    with one line changed, a budget below its own runtime overhead, makes the tiny bundle not fit."""
    recipe = _recipe_copy(tmp_path, "jetson-orin-nano-8gb", "memory:", "memory: {budget_mib: 600, "
                                                                       "runtime_overhead_mib: 700}")
    out = tmp_path / "nano"
    with pytest.raises(BuildError, match=r"jetson-orin-nano-8gb.*GiB.*--allow-over-budget") as info:
        build(BuildRequest(checkpoint=tiny_checkpoint, target=recipe, out=out, calib=calib_dir, work_dir=work_dir,
                           quiet=True))
    one_line(info)
    assert sorted(p.name for p in tmp_path.iterdir()) == [recipe.name]   # no bundle, no temp folder
    result = CliRunner().invoke(main, ["build", "--target", str(recipe), "--checkpoint", str(tiny_checkpoint),
                                       "--out", str(out), "--calib", str(calib_dir), "--work-dir", str(work_dir),
                                       "--allow-over-budget", "--quiet"])
    assert result.exit_code == 0, result.output
    m = load_bundle(out).manifest
    assert m.memory_plan["verdict"] == "refuse" and m.memory_plan["fix"]
    assert m.runtime.expert_policy == "lazy" and m.runtime.max_loaded_experts == 3
    assert {v["status"] for k, v in m.stages.items() if "/" in k} == {"reused"}   # Orin's int8, cpu's q4_k_m


# ---- CLI ------------------------------------------------------------------------------------------------------------

def test_cli_build_shows_every_component_with_progress(tiny_checkpoint, calib_dir, work_dir, cpu_build, tmp_path):
    """Console and build.log: a line per unit with the component's name, and the steps of what is computed (here
    the base encoder's features and export, removed from a hard-linked copy of the session's work folder)."""
    work = tmp_path / "work"
    shutil.copytree(work_dir, work, copy_function=os.link)
    for stage in ("features", "export"):
        shutil.rmtree(work / stage / "base")
    out = tmp_path / "b"
    result = CliRunner().invoke(main, ["build", "--target", "cpu", "--checkpoint", str(tiny_checkpoint), "--out",
                                       str(out), "--calib", str(calib_dir), "--work-dir", str(work)])
    assert result.exit_code == 0, result.output
    log = (out / "build.log").read_text()
    for text in (result.stderr, log):
        for name in COMPONENTS[1:]:
            assert f"export {name}: reused from the work folder" in text, name
        assert re.search(r"features base: \d+/\d+ astronaut", text)
        assert re.search(r"^ *[\d.]+s export base: \d+/\d+ reference astronaut", text, re.M)
        assert re.search(r"^ *[\d.]+s export base: \d+/\d+ fp16 graph", text, re.M)
        assert re.search(r"^ *[\d.]+s export base: done in [\d.]+ s", text, re.M)
        assert "base [fp32] " in text and "quantize base: reused from the work folder" in text
        assert "memory plan:" in text and "unit(s) reused from the work folder, 2 computed" in text
    statuses = {k: v["status"] for k, v in load_bundle(out).manifest.stages.items() if "/" in k}
    assert {k for k, v in statuses.items() if v == "computed"} == {"features/base", "export/base"}
    assert "cpu: per-graph parity" in result.stdout and "expert_G" in result.stdout
    assert "units reused from the work folder: " in result.stdout


def test_a_bug_is_one_line_naming_the_file_its_traceback_went_to(tmp_path, monkeypatch):
    import tempfile

    import click

    from mova_export.cli.common import one_line_errors

    @click.command()
    @one_line_errors
    def broken():
        raise ValueError("Data of TensorProto should be stored elsewhere\nsecond line")

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    line = cli_error(CliRunner().invoke(broken, []), exit_code=1)
    assert line.startswith("error: internal error in mova-export (ValueError: Data of TensorProto should be stored "
                           "elsewhere); the traceback is in "), line
    [saved] = tmp_path.glob("mova-export-error-*.txt")
    assert str(saved) in line
    assert "Traceback (most recent call last)" in saved.read_text() and "second line" in saved.read_text()


def test_bad_inputs_are_one_line_errors_and_leave_nothing(tiny_checkpoint, tmp_path):
    runner = CliRunner()
    out = tmp_path / "never"
    work = tmp_path / "work"
    base = ["--out", str(out), "--work-dir", str(work)]
    cases = [
        (["build", "--target", "jetson-xavier", "--checkpoint", str(tiny_checkpoint), *base], "jetson-xavier"),
        (["build", "--target", "cpu", "--checkpoint", str(tmp_path / "nope"), *base], "does not exist"),
        (["build", "--target", "cpu", "--checkpoint", str(tiny_checkpoint), *base, "--calib",
          str(tmp_path / "nocalib")], "calibration folder"),
        (["build", "--target", "cpu", "--checkpoint", str(tiny_checkpoint), *base, "--components", "base,llm"],
         "'llm' is not exported to ONNX"),
        (["export", str(tmp_path / "nope"), *base], "does not exist"),
    ]
    for args, needle in cases:
        assert needle in cli_error(runner.invoke(main, args)), args
    assert list(tmp_path.iterdir()) == []   # no bundle, no temp folder, not even the work folder
    with pytest.raises(RecipeError, match="recipe file .*missing.yaml does not exist") as info:
        build(BuildRequest(checkpoint=tiny_checkpoint, target=tmp_path / "missing.yaml", out=out, work_dir=work,
                           quiet=True))
    one_line(info)
    assert issubclass(RecipeError, MoVAExportError) and list(tmp_path.iterdir()) == []

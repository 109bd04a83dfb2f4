"""The fp16 variant and its repair: a graph whose fp16 conversion breaks in one node keeps exactly that node in fp32
and meets the tolerance; one that cannot be repaired is not shipped, and the build goes on with fp32 for it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
torch = pytest.importorskip("torch")

from mova_export.core.spec import TensorSpec
from mova_export.core.tolerance import TOLERANCES
from mova_export.export.blocks import block_of, block_sensitivity
from mova_export.export.fp16 import fp16_from_onnx, fp16_sensitivity, repair_fp16
from mova_export.runners import OrtRunner, compare_runners


class TinyWeights(torch.nn.Module):
    """A layer whose weights sit near 1e-6 and whose inputs are scaled up to match (some checkpoints' layers are
    scaled so): fp16 stores those weights as subnormals with a few bits of mantissa while its output is an ordinary
    number, so keeping that one MatMul in fp32 is the whole repair. (A value out of fp16's range between two ops is no
    test on this CPU: ONNX Runtime runs most fp16 ops in fp32 and drops the casts between them.)"""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(16, 32, bias=False)
        self.fc2 = torch.nn.Linear(32, 16, bias=False)
        with torch.no_grad():
            self.fc1.weight.mul_(1e-6)

    def forward(self, x):
        return self.fc2(self.fc1(x * 1e4))


class Block(torch.nn.Module):
    """A residual block as transformer layers are written (the residual add inside the block's scope)."""

    def __init__(self, mlp: torch.nn.Module, gain: float):
        super().__init__()
        self.mlp, self.gain = mlp, gain

    def forward(self, x):
        return x + self.gain * self.mlp(x)


class Blocks(torch.nn.Module):
    """Six residual blocks (`/layers.N/...` in the graph); the fourth holds a TinyWeights whose output dominates the
    residual stream: the block-level probe finds it and keeping that one block in fp32 is the repair."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(Block(TinyWeights(), 100.0) if i == 3 else Block(torch.nn.Sequential(
            torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16)), 0.5) for i in range(6))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


INPUTS, OUTPUTS = (TensorSpec("x", (1, 8, 16)),), (TensorSpec("y", (1, 8, 16)),)


def _exported(module: torch.nn.Module, root: Path, name: str):
    """(folder, fp32 graph, three feeds) of a toy module."""
    torch.manual_seed(0)
    fp32 = root / f"{name}.fp32.onnx"
    with torch.no_grad():
        torch.onnx.export(module.eval(), (torch.randn(1, 8, 16),), str(fp32), input_names=["x"], output_names=["y"],
                          opset_version=18, dynamo=False)
    feeds = [{"x": np.random.default_rng(i).standard_normal((1, 8, 16)).astype(np.float32)} for i in range(3)]
    return root, fp32, feeds


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    torch.manual_seed(0)
    return _exported(TinyWeights(), tmp_path_factory.mktemp("fp16"), "toy")


@pytest.fixture(scope="module")
def block_graphs(tmp_path_factory):
    torch.manual_seed(0)
    return _exported(Blocks(), tmp_path_factory.mktemp("fp16-blocks"), "blocks")


def _repair(fp32: Path, fp16: Path, feeds, name: str):
    """repair_fp16 reconverting with fp16_from_onnx and judging with _report, as the export does."""
    def convert(kept):
        fp16_from_onnx(fp32, fp16, INPUTS, OUTPUTS, name, keep_fp32=kept)

    def passes():
        report = _report(fp32, fp16, feeds)
        return report.passed, report.summary()

    return repair_fp16(fp32, fp16, feeds, convert, passes)


def _report(fp32: Path, fp16: Path, feeds):
    return compare_runners(OrtRunner(fp16), feeds, OrtRunner(fp32), TOLERANCES["fp16"], graph="toy", precision="fp16")


def test_a_lossy_node_is_found_and_kept_in_fp32(graphs):
    root, fp32, feeds = graphs
    fp16 = root / "toy.fp16.onnx"
    fp16_from_onnx(fp32, fp16, INPUTS, OUTPUTS, "toy")
    before = _report(fp32, fp16, feeds)
    assert not before.passed and before.summary()["rel_l2"] > TOLERANCES["fp16"].max_rel_l2
    ranking = fp16_sensitivity(fp32, fp16, feeds)
    assert ranking[0][0] == "/fc1/MatMul" and ranking[0][1] > 0.01   # the layer of tiny weights adds the error

    repair = _repair(fp32, fp16, feeds, "toy")
    assert repair.ok and repair.kept_fp32 == ["/fc1/MatMul"] and [t["kept_fp32"] for t in repair.tries] == [1]
    assert _report(fp32, fp16, feeds).passed
    kept = {n.name for n in onnx.load(str(fp16)).graph.node} & set(repair.kept_fp32)
    assert kept == set(repair.kept_fp32)                     # the same nodes, now between casts


def test_a_build_goes_on_when_a_fp16_graph_cannot_be_repaired(tiny_checkpoint, calib_dir, tmp_path, monkeypatch):
    """An fp16 tolerance no graph can meet: every component's fp16 variant is missing with its reason, the recipe's
    fp16 components ship fp32, the build log and report say so, and the bundle is written."""
    import yaml

    from mova_export.core import tolerance
    from mova_export.pipeline import BuildRequest, build
    from mova_export.recipe import resolve_target

    monkeypatch.setitem(tolerance.TOLERANCES, "fp16", tolerance.Tolerance(1.0 + 1e-9, 0.0))
    raw = yaml.safe_load(resolve_target("cpu").read_text())
    raw["precision"] = {"base": "fp16", "text_encoder": "int8", "default": "fp32"}
    recipe = tmp_path / "fp16-base.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    result = build(BuildRequest(checkpoint=tiny_checkpoint, target=recipe, out=tmp_path / "b", calib=calib_dir,
                                components=("base", "text_encoder"), work_dir=tmp_path / "work", quiet=True))
    base = result.manifest.graphs["base"]
    assert "fp16" not in base.variants and "misses its parity tolerance" in base.missing["fp16"]
    assert result.manifest.runtime.precision["base"] == "fp32"
    decision = result.manifest.quantize["base"]
    assert (decision["requested"], decision["final"]) == ("fp16", "fp32") and decision["reason"] == base.missing["fp16"]
    log = (result.bundle / "build.log").read_text()
    assert "base [fp16]: not shipped" in log and "WARNING base:" in log
    assert "| base | fp16 | fp32 |" in (result.bundle / "report.md").read_text()
    # the text encoder's INT8 graph missed nothing, but with no fp16 graph its fallback would be the fp32 one
    assert result.manifest.runtime.precision["text_encoder"] in ("int8", "fp32")


def test_a_graph_of_blocks_is_probed_at_its_boundaries_and_keeps_the_lossy_block_in_fp32(block_graphs):
    root, fp32, feeds = block_graphs
    fp16 = root / "blocks.fp16.onnx"
    fp16_from_onnx(fp32, fp16, INPUTS, OUTPUTS, "blocks")
    assert not _report(fp32, fp16, feeds).passed
    ranking = block_sensitivity(fp32, fp16, feeds)
    assert {name for name, _ in ranking} == {f"layers.{i}" for i in range(6)}
    assert ranking[0][0] == "layers.3" and ranking[0][1] > 0.01 > max(gain for _, gain in ranking[1:])

    repair = _repair(fp32, fp16, feeds, "blocks")
    assert repair.ok and [t["kept"] for t in repair.tries] == ["1 block(s): layers.3"]
    assert {block_of(n) for n in repair.kept_fp32} == {"layers.3"} and len(repair.kept_fp32) >= 2   # both Gemms
    assert _report(fp32, fp16, feeds).passed

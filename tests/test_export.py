"""ONNX export: parity figures, static graphs checked against their declaration, fp16 with fp32 islands, external
data, and the tiny synthetic export (every graph within threshold on real images, the 64-mask adapter parity)."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from mova_export import export as ex
from mova_export.bundle import load_bundle
from mova_export.components import ComponentSpec, MemoryFigures
from mova_export.core.errors import ExportError
from mova_export.core.prompts import mask_label
from mova_export.core.spec import TensorSpec
from mova_export.core.tolerance import TOLERANCES, compare_outputs, parity
from mova_export.pipeline import WorkFolder
from mova_export.runners.ort import OrtRunner
from mova_export.runners.pytorch import TorchRunner

LETTERS = tuple("ABCDEFG")
GRAPHS = ["base", *(f"expert_{c}" for c in LETTERS), "text_encoder", "adapter_routing", "adapter_slots3", "adapter"]


@pytest.fixture(scope="module")
def manifest(export_only):
    return load_bundle(export_only).manifest


def export_unit(work_dir, manifest, name):
    """The finished export unit of a component (its graphs, calibration/<graph>.npz) in the session work folder."""
    unit = WorkFolder(work_dir).unit("export", name, manifest.stages[f"export/{name}"]["key"])
    assert unit.done, unit.path
    return unit.path


# ---------------------------------------------------------------------------------------------------------------
# parity figures

def test_parity_figures():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4, 8)).astype(np.float32)
    same = parity(a, a.copy())
    assert same.max_abs == 0 and same.rel_l2 == 0 and same.cosine == pytest.approx(1.0)
    noisy = parity(a, a + 1e-3)
    assert 0 < noisy.rel_l2 < 1e-2 and noisy.max_abs == pytest.approx(1e-3, rel=1e-3)
    assert parity(a, -a).cosine == pytest.approx(-1.0)
    bad = a.copy()
    bad[0, 0] = np.nan
    assert not parity(a, bad).finite and not parity(a, bad).passes(TOLERANCES["fp16"])
    zeros = np.zeros_like(a)
    assert parity(zeros, zeros).passes(TOLERANCES["fp32"]) and not parity(zeros, a).passes(TOLERANCES["fp32"])


def test_compare_collects_every_failing_output():
    ref = {"x": np.ones((2, 3), np.float32), "y": np.arange(6, dtype=np.float32), "z": np.ones(3, np.float32)}
    cand = {"x": -ref["x"], "y": ref["y"][::-1].copy(), "z": ref["z"]}
    with pytest.raises(ExportError) as info:
        compare_outputs(ref, cand, component="expert_B", sample="astronaut")
    message = str(info.value)
    assert "expert_B" in message and "'x'" in message and "'y'" in message and "'z'" not in message
    assert "astronaut" in message and "cosine" in message and "rel L2" in message and "\n" not in message


def test_routing_masks_are_the_64_with_at_most_three_experts():
    masks = ex.routing_masks(7, 3)
    assert len(masks) == 64 == len(set(masks)) and max(map(sum, masks)) == 3 and masks[0] == (0,) * 7
    assert mask_label((1, 0, 0, 1, 0, 0, 1), LETTERS) == "ADG" and mask_label((0,) * 7, LETTERS) == "none"
    assert ex.sweep_masks(LETTERS, 3, full=True) == masks
    reduced = ex.sweep_masks(LETTERS, 3, full=False)   # full scale: none, the 7 singles and the stated subset
    assert len(reduced) == 1 + 7 + len(ex.samples.REDUCED_SWEEP) and set(reduced) < set(masks)


# ---------------------------------------------------------------------------------------------------------------
# graph-level export on a toy module (no checkpoint needed)

class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(16, 16)
        self.layer_norm = torch.nn.LayerNorm(16)

    def forward(self, x, mask):
        y = self.layer_norm(self.proj(x))
        y = torch.softmax(y @ y.transpose(1, 2), -1) @ y * (1 + mask.sum())
        grid = torch.nn.functional.interpolate(y.reshape(1, 16, 2, 4), size=(3, 3), mode="bilinear",
                                               align_corners=False)
        return grid.flatten(2).transpose(1, 2), y.mean(1)


def _toy_spec(out_shape=(1, 9, 16)) -> ComponentSpec:
    return ComponentSpec(
        "toy", "tower", "toy.", {}, build=lambda cfg: _Toy(),
        inputs=lambda cfg: (TensorSpec("x", (1, 8, 16)), TensorSpec("mask", (1, 7))),
        outputs=lambda cfg: (TensorSpec("grid", out_shape), TensorSpec("pooled", (1, 16))),
        memory=MemoryFigures(params=16 * 16 + 3 * 16, activation=(8, 16)),
        sample_inputs=lambda cfg, seed: {"x": torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(seed)),
                                         "mask": torch.ones(1, 7)})


def test_toy_export_fp32_fp16_and_external_data(tmp_path, monkeypatch):
    import onnx

    spec, module = _toy_spec(), _Toy().eval()
    feed = {k: v.numpy() for k, v in spec.sample_inputs(None, 1).items()}
    reference = TorchRunner(module, ["x", "mask"], ["grid", "pooled"]).infer(feed)
    files = ex.onnx_from_component(spec, module, None, tmp_path / "toy.fp32.onnx")
    assert files == [tmp_path / "toy.fp32.onnx"]
    assert onnx.load(str(files[0])).opset_import[0].version >= ex.OPSET >= 18
    sample = ex.Sample("s", feed, reference)
    fp32 = ex.validate_graph(OrtRunner(files[0]), [sample], "toy", "fp32").per_output()
    assert min(f.cosine for f in fp32.values()) >= 0.99999
    half = ex.fp16_from_onnx(files[0], tmp_path / "toy.fp16.onnx", spec.inputs(None), spec.outputs(None), "toy")
    graph = onnx.load(str(half[0]))
    types = {n.op_type for n in graph.graph.node}
    assert "Cast" in types and graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.graph.initializer)
    ex.validate_graph(OrtRunner(half[0]), [sample], "toy", "fp16")
    # a graph past the protobuf limit keeps its weights in one external file (the limit shrunk to exercise it)
    monkeypatch.setattr(ex.graph_io, "PROTO_LIMIT", 1000)
    big = ex.onnx_from_component(spec, module, None, tmp_path / "big.onnx")
    assert [p.name for p in big] == ["big.onnx", "big.onnx.data"] and ex.graph_files(big[0]) == big
    assert (tmp_path / "big.onnx.data").stat().st_mode & 0o777 == (tmp_path / "big.onnx").stat().st_mode & 0o777
    ex.validate_graph(OrtRunner(big[0]), [sample], "toy", "fp32")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data", "toy.fp16.onnx",
                                                         "toy.fp32.onnx"]  # no scratch left behind


def test_graph_not_matching_its_declaration_is_refused(tmp_path):
    spec = _toy_spec(out_shape=(1, 10, 16))
    with pytest.raises(ExportError, match=r"toy: exported graph does not match its declaration: outputs are "
                                          r"\[grid\[1, 9, 16\]:float32.*the spec declares \[grid\[1, 10, 16\]") \
            as info:
        ex.onnx_from_component(spec, _Toy().eval(), None, tmp_path / "toy.onnx")
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# the tiny synthetic export

def test_every_graph_within_threshold_on_real_images(tiny_checkpoint, export_only, manifest, work_dir):
    from conftest import CALIB

    from mova_export.components import get_spec
    from mova_export.source.checkpoint import Checkpoint

    assert list(manifest.graphs) == GRAPHS
    assert manifest.export["calibration"]["images"] == sorted(CALIB)   # the folder's images in name order
    for name, graph in manifest.graphs.items():
        assert set(graph.variants) == {"fp32", "fp16"}, name
        for precision, variant in graph.variants.items():
            tol = TOLERANCES[precision]
            # fp32 on every sample (3 images at least + a random feed), fp16 on a spot check of them
            assert variant.parity["num_samples"] >= (4 if precision == "fp32" else 2), (name, precision)
            for out, fig in variant.parity["worst"].items():
                assert fig["cosine"] >= tol.min_cosine and fig["rel_l2"] <= tol.max_rel_l2, (name, precision, out)
            assert graph.proven[precision] == variant.min_cosine() >= tol.min_cosine
    # independently of the export's own check: the fp32 graphs against the torch modules, on the real-image feeds
    # the export unit keeps for calibration
    ckpt = Checkpoint.open(tiny_checkpoint)
    cfg = ckpt.config
    for name in GRAPHS:
        if name.startswith("adapter"):
            continue  # its three forms: checked against the skipping reference below
        spec = get_spec(name)
        feeds = ex.read_feeds(export_unit(work_dir, manifest, name) / "calibration" / f"{name}.npz")
        assert len(feeds) == len(CALIB), name
        torch_runner = TorchRunner(ckpt.build(name), [t.name for t in spec.inputs(cfg)],
                                   [t.name for t in spec.outputs(cfg)])
        ort_runner = OrtRunner(export_only / manifest.graphs[name].variants["fp32"].graph)
        for i, feed in enumerate(feeds):
            compare_outputs(torch_runner.infer(feed), ort_runner.infer(feed), component=name, sample=str(i))


def test_adapter_graph_matches_skipping_reference_for_all_64_masks(tiny_checkpoint, export_only, manifest, work_dir):
    from mova_export.core.slots import fill_slots
    from mova_export.source.checkpoint import Checkpoint

    routing, slots, dense = (manifest.graphs[n] for n in ("adapter_routing", "adapter_slots3", "adapter"))
    assert (routing.role, slots.role, dense.role) == ("adapter_routing", "adapter_answer", "adapter_fallback")
    assert [t.name for t in routing.inputs] == ["base"] and slots.form == "slots" and dense.form == "dense"
    first, second = manifest.export["calibration"]["images"][:2]

    def swept(graph, image):
        return [s for s in graph.variants["fp32"].parity["samples"] if s.startswith(image + "/")]

    # the export's own sweep on the first image: the empty mask in the routing graph, the 63 others in the slot graph,
    # masks of more than three experts (seven of four, and all seven) in the dense graph
    assert swept(routing, first) == [f"{first}/none"]
    assert len(swept(slots, first)) == 63 and len(swept(dense, first)) == 8
    assert len(swept(slots, second)) == 1 and len(swept(dense, second)) == 2   # a top-3 mask; dense: + real unrouted
    # and again here, independently, on the second image, through the runtime's slot contract, with every tower's
    # real features of that image (the features units the export read)
    adapter = Checkpoint.open(tiny_checkpoint).build("adapter")
    experts = [f"expert_{letter}" for letter in LETTERS]

    def features_of(component: str) -> np.ndarray:
        [unit] = (work_dir / "features" / component).glob("*/features.npz")
        return ex.component.read_features(unit)[second]

    feats = {"base": features_of("base"), "text_features": features_of("text_encoder"),
             **{n: features_of(n) for n in experts}}
    channels = [feats[n].shape[-1] for n in experts]
    runners = {g.name: OrtRunner(export_only / g.variants["fp32"].graph) for g in (routing, slots)}
    checked = 0
    for mask in ex.routing_masks(7, 3):
        with torch.inference_mode():
            ref = adapter.forward_reference(
                torch.from_numpy(feats["base"]),
                [torch.from_numpy(feats[n]) if on else None for n, on in zip(experts, mask)],
                torch.from_numpy(feats["text_features"]), torch.tensor([mask], dtype=torch.float32))
        if any(mask):
            feed = {"base": feats["base"], "text_features": feats["text_features"],
                    **fill_slots(mask, {j: feats[n] for j, n in enumerate(experts) if mask[j]}, 3, channels,
                                 feats["base"].shape[1])}
            out = runners["adapter_slots3"].infer(feed)
        else:
            out = runners["adapter_routing"].infer({"base": feats["base"]})
        compare_outputs({"image_tokens": ref[0].numpy(), "routing_tokens": ref[1].numpy()}, out, component="adapter",
                sample=mask_label(mask, LETTERS))
        checked += 1
    assert checked == 64


def test_fp16_variants_within_their_threshold_and_smaller(manifest):
    tol = TOLERANCES["fp16"]
    for name, graph in manifest.graphs.items():
        fig = graph.variants["fp16"].parity["worst"]
        assert min(f["cosine"] for f in fig.values()) >= tol.min_cosine, name
        assert max(f["rel_l2"] for f in fig.values()) <= tol.max_rel_l2, name
        assert graph.variants["fp16"].bytes < graph.variants["fp32"].bytes, name


def test_failed_parity_leaves_no_bundle(tiny_checkpoint, calib_dir, work_dir, export_only, tmp_path, monkeypatch):
    from mova_export.core import tolerance as validate
    from mova_export.pipeline import BuildRequest, export_bundle

    # a fresh work folder (the session's has the base unit finished, which would be reused, not re-checked), seeded
    # with the session's features units so only the export itself runs
    work = tmp_path / "work"
    shutil.copytree(work_dir / "features", work / "features")
    monkeypatch.setitem(validate.TOLERANCES, "fp32", validate.Tolerance(min_cosine=1.5, max_rel_l2=0.0))
    out = tmp_path / "bundle"
    with pytest.raises(ExportError, match=r"parity failed .* base \[fp32\] output '\w+' on sample 'astronaut'.*"
                                          r"no bundle was written") as info:
        export_bundle(BuildRequest(checkpoint=tiny_checkpoint, out=out, components=["base"], calib=calib_dir,
                                   work_dir=work, quiet=True))
    assert "\n" not in str(info.value)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["work"]
    assert not [p for p in (work / "export").rglob("*") if p.is_file()]   # nor a half-written export unit

"""INT8 / FP8 explicit Q/DQ graphs, the FP8 simulation, held-out accuracy and the budget with its fallbacks,
on tiny seeded torch models exported at opset 18 (TorchScript exporter, as export.py does)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")
ml_dtypes = pytest.importorskip("ml_dtypes")

from mova_export.core.errors import ExportError, MoVAExportError
from mova_export.core.tolerance import Tolerance
from mova_export.export import read_feeds
from mova_export.quantize import (
    FP8_MAX,
    QDQ_BASE,
    FeedSplit,
    QuantSettings,
    accuracy_check,
    conv_quantizable,
    modelopt_module,
    node_sensitivity,
    qdq_from_onnx,
    quantize_with_budget,
    resolve_backend,
    select_nodes,
    simulate_fp8,
    split_calibration,
    split_feeds,
    to_fp8,
)
from mova_export.quantize.sensitivity import futile_exclusions
from mova_export.runners import OrtRunner


def _settings(precision: str = "int8", budget: Tolerance | float = -1.0, **kw) -> QuantSettings:
    """QuantSettings as a recipe would resolve them, for the tiny graphs here (ONNX Runtime writes the Q/DQ)."""
    budget = budget if isinstance(budget, Tolerance) else Tolerance(float(budget))
    defaults = dict(method="minmax", base="fp32", backend="onnxruntime", qdq="float")
    return QuantSettings(precision=precision, budget=budget, **(defaults | kw))


def _split(feeds: list[dict], held_out: int) -> FeedSplit:
    return split_calibration(feeds, [f"img{i}" for i in range(len(feeds))], len(feeds) - held_out, held_out)


FP32_ISLANDS = ("Softmax", "LayerNormalization", "Resize")


class TinyTower(torch.nn.Module):
    """conv -> bilinear resize -> tokens -> (fc1 + LayerNorm of the same tokens) -> gelu -> LayerNorm -> fc2 -> softmax.
    The tokens feed both a quantized MatMul and a LayerNormalization: the norm must get the fp32 tensor."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.fc1 = torch.nn.Linear(16, 32)
        self.skip = torch.nn.Linear(16, 32, bias=False)
        self.ln0 = torch.nn.LayerNorm(16)
        self.ln = torch.nn.LayerNorm(32)
        self.fc2 = torch.nn.Linear(32, 8)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        y = torch.nn.functional.interpolate(y, size=(6, 6), mode="bilinear", align_corners=False)
        t = y.flatten(2).transpose(1, 2)
        h = torch.nn.functional.gelu(self.fc1(t)) + self.skip(self.ln0(t))
        return torch.softmax(self.fc2(self.ln(h)), dim=-1), h


class OutlierMLP(torch.nn.Module):
    """fc1 reads an input whose channel 0 is ~1000x the others but barely matters: per-tensor activation
    quantization of fc1's input flattens every other channel, so fc1 is the one node to leave in fp32."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(16, 32)
        self.fc2 = torch.nn.Linear(32, 16)
        with torch.no_grad():
            self.fc1.weight[:, 0] *= 1e-4

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class OutlierBlock(torch.nn.Module):
    """A residual block (the add inside its scope, as transformer layers are written); `outlier` scales channel 0 of
    the block's own fc1 input by 3000 (an OutlierMLP inside it)."""

    def __init__(self, outlier: bool):
        super().__init__()
        self.mlp = OutlierMLP() if outlier else torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(),
                                                                     torch.nn.Linear(32, 16))
        self.register_buffer("scale", torch.ones(16))
        if outlier:
            self.scale[0] = 3000.0

    def forward(self, x):
        return x + self.mlp(x * self.scale)


class LayeredOutlier(torch.nn.Module):
    """Six blocks (`/layers.N/` in the graph), the third of which holds the outlier."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(OutlierBlock(i == 2) for i in range(6))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def _export(module, example, path: Path, outputs) -> Path:
    torch.manual_seed(0)
    with torch.no_grad():
        torch.onnx.export(module.eval(), (example,), str(path), input_names=["x"], output_names=list(outputs),
                          opset_version=18, dynamo=False)
    return path


@pytest.fixture(scope="module")
def tower(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tower")
    return _export(TinyTower(), torch.randn(1, 3, 12, 12), root / "tower.fp32.onnx", ["probs", "hidden"])


@pytest.fixture(scope="module")
def outlier(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("outlier")
    return _export(OutlierMLP(), torch.randn(1, 10, 16), root / "mlp.fp32.onnx", ["y"])


def _tower_feeds(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 3, 12, 12)).astype(np.float32)} for _ in range(n)]


def _outlier_feeds(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(n):
        x = rng.standard_normal((1, 10, 16)).astype(np.float32)
        x[..., 0] *= 3000.0
        feeds.append({"x": x})
    return feeds


def _producers(model) -> dict[str, str]:
    return {o: n.op_type for n in model.graph.node for o in n.output}


def _elem_type(model, name: str) -> int:
    return next(t.data_type for t in model.graph.initializer if t.name == name)


# ---------------------------------------------------------------------------------------------------------------
# INT8

@pytest.fixture(scope="module")
def int8(tower, tmp_path_factory):
    dst = tmp_path_factory.mktemp("int8") / "tower.int8.onnx"
    logs: list[str] = []
    return qdq_from_onnx(tower, dst, _settings(), _tower_feeds(6, 1), log=logs.append), logs


def test_int8_graph_is_explicit_qdq_with_fp32_islands(tower, int8):
    result, logs = int8
    model = onnx.load(str(result.path))
    onnx.checker.check_model(model, full_check=True)
    ops = [n.op_type for n in model.graph.node]
    assert result.num_q == ops.count("QuantizeLinear") > 0 and result.num_dq == ops.count("DequantizeLinear") > 0
    # conv, fc1, skip, fc2: the weight-bearing layers; nothing else
    assert sorted(result.quantized_nodes) == sorted(
        n.name for n in onnx.load(str(tower)).graph.node if n.op_type in ("Conv", "MatMul", "Gemm"))
    assert len(result.quantized_nodes) == 4 and result.backend == "onnxruntime" and result.parity_method == "ort"
    producers = _producers(model)
    for node in model.graph.node:
        if node.op_type in FP32_ISLANDS:
            assert all(producers.get(i) not in ("DequantizeLinear", "QuantizeLinear") for i in node.input), node.name
    # Q/DQ sit on the inputs of the quantized layers only: every DQ output feeds a Conv/MatMul/Gemm
    consumers = {i: n.op_type for n in model.graph.node for i in n.input}
    assert {consumers[n.output[0]] for n in model.graph.node if n.op_type == "DequantizeLinear"} <= {
        "Conv", "MatMul", "Gemm"}
    # weights per output channel, int8 symmetric (zero points 0)
    weight_dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"
                 and any(t.name == n.input[0] for t in model.graph.initializer)]
    assert len(weight_dq) == 4
    for n in weight_dq:
        assert _elem_type(model, n.input[0]) == onnx.TensorProto.INT8
        scale = next(t for t in model.graph.initializer if t.name == n.input[1])
        assert len(scale.dims) == 1 and scale.dims[0] > 1
        zp = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == n.input[2]))
        assert not zp.any()
    assert any("4 nodes quantized" in line for line in logs)
    # the tokens feed fc1 (quantized) and ln0 (fp32): the log says in words what was rewired and why
    assert any("now read the tensor itself" in line and "int8-rounded copy" in line for line in logs)


def test_int8_parity_on_held_out(tower, int8):
    result, _ = int8
    report = accuracy_check(tower, result.path, _tower_feeds(3, 99), Tolerance(0.99, 0.2), component="tower",
                            precision="int8")
    assert report.passed, report.failures()
    figures = report.summary()
    assert 0.99 <= figures["cosine"] < 1.0 and 0 < figures["rel_l2"] < 0.2
    assert set(report.per_output()) == {"probs", "hidden"} and len(report.samples) == 3


def test_int8_of_a_graph_with_external_weights_is_the_same_graph(tower, int8, tmp_path):
    """A tower over 2 GB keeps its weights in a .data file; INT8 reads its structure only and copies the weights:
    the Q/DQ graph is the one the in-memory path writes (same ranges, same weights)."""
    external = tmp_path / "src" / "tower.fp32.onnx"
    external.parent.mkdir()
    onnx.save_model(onnx.load(str(tower)), str(external), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="tower.fp32.onnx.data", size_threshold=0)
    result = qdq_from_onnx(external, tmp_path / "out" / "tower.int8.onnx", _settings(), _tower_feeds(6, 1))
    assert not list((tmp_path / "out").glob(".tower*"))                     # the scratch folder is gone
    same, _ = int8
    assert (result.quantized_nodes, result.num_q, result.num_dq) == (same.quantized_nodes, same.num_q, same.num_dq)
    for feed in _tower_feeds(2, 5):
        ours, theirs = OrtRunner(result.path).infer(feed), OrtRunner(same.path).infer(feed)
        for name in ours:
            np.testing.assert_array_equal(ours[name], theirs[name])


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_int8_other_calibrators_are_quiet(tower, tmp_path, method, capfd):
    logs: list[str] = []
    result = qdq_from_onnx(tower, tmp_path / "t.onnx", _settings(method=method), _tower_feeds(3, 1), log=logs.append)
    assert result.method == method and result.num_q > 0
    out, err = capfd.readouterr()
    assert out == "" and err == ""   # onnxruntime's "Number of histogram bins ..." prints, tqdm and logging
    assert not any("histogram" in line.lower() for line in logs)
    assert accuracy_check(tower, result.path, _tower_feeds(2, 99)).summary()["cosine"] > 0.98


def test_qdq_runs_as_float_math_or_fused_as_asked(tower, int8):
    """ONNX Runtime's fused integer Q/DQ kernels depend on the CPU (VNNI or not): qdq="float" runs Q/DQ as written
    (TensorRT's semantics, the graph's own figures); qdq="fused" runs what the cpu runtime runs. On this AVX2
    machine the two agree to 1e-4 cosine on the tiny tower."""
    session = OrtRunner(int8[0].path, qdq="float").session
    assert session.get_session_options().get_session_config_entry("session.disable_quant_qdq") == "1"
    fused = OrtRunner(int8[0].path, qdq="fused").session.get_session_options()
    with pytest.raises(RuntimeError, match="does not have configuration"):   # fused: the entry is not set
        fused.get_session_config_entry("session.disable_quant_qdq")
    held = _tower_feeds(3, 99)
    as_float = accuracy_check(tower, int8[0].path, held, qdq="float").summary()["cosine"]
    as_fused = accuracy_check(tower, int8[0].path, held, qdq="fused").summary()["cosine"]
    assert abs(as_float - as_fused) < 1e-4 and 0.99 < as_fused < 1.0


def test_excluded_nodes_stay_fp32(tower, tmp_path):
    names, islands = select_nodes(onnx.load(str(tower)))
    assert {n for n in islands if "LayerNorm" in n or "Softmax" in n or "Resize" in n}
    conv = next(n for n in names if "conv" in n.lower())
    result = qdq_from_onnx(tower, tmp_path / "t.onnx", _settings(), _tower_feeds(3, 1), exclude_nodes=[conv])
    assert conv not in result.quantized_nodes and result.excluded_nodes == [conv]
    model = onnx.load(str(result.path))
    node = next(n for n in model.graph.node if n.name == conv)
    producers = _producers(model)
    assert all(producers.get(i) != "DequantizeLinear" for i in node.input)
    assert next(t for t in model.graph.initializer if t.name == node.input[1]).data_type == onnx.TensorProto.FLOAT


# ---------------------------------------------------------------------------------------------------------------
# FP8

def test_to_fp8_matches_the_e4m3_grid():
    values = np.array([0.0, 1.0, 1.0625, 1.07, -3.3, 447.0, 500.0, -1e4, 2.0 ** -9, 2.0 ** -11], np.float32)
    got = to_fp8(values, 1.0).astype(np.float32)
    assert got.tolist() == [0.0, 1.0, 1.0, 1.125, -3.25, 448.0, 448.0, -448.0, 2.0 ** -9, 0.0]


def test_simulation_rounds_exactly_like_float8_qdq(tmp_path):
    """One QuantizeLinear/DequantizeLinear pair: ORT's float8 kernels, the fp32 simulation and ml_dtypes agree."""
    from onnx import TensorProto, helper

    scale = 0.37
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"]),
         helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"])], "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4096])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4096])],
        [helper.make_tensor("s", TensorProto.FLOAT, [], [scale]),
         helper.make_tensor("zp", TensorProto.FLOAT8E4M3FN, [], [0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    onnx.checker.check_model(model, full_check=True)
    path = tmp_path / "qdq.onnx"
    onnx.save(model, str(path))
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(4096) * np.exp2(rng.integers(-14, 10, 4096))).astype(np.float32)
    x[:6] = [0.0, scale * 448, scale * 2.0 ** -6, scale * 2.0 ** -9, -scale * 1e3, scale * 240.0]
    expected = to_fp8(x, scale).astype(np.float32) * np.float32(scale)
    sim = simulate_fp8(path, tmp_path / "sim.onnx")
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in onnx.load(str(sim)).graph.node)
    simulated = ort.InferenceSession(str(sim)).run(None, {"x": x})[0]
    native = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    np.testing.assert_array_equal(simulated, expected)
    np.testing.assert_array_equal(native, expected)


@pytest.fixture(scope="module")
def fp8(tower, tmp_path_factory):
    dst = tmp_path_factory.mktemp("fp8") / "tower.fp8.onnx"
    return qdq_from_onnx(tower, dst, _settings("fp8"), _tower_feeds(6, 1))


def test_fp8_graph_is_float8_qdq_at_opset_19(tower, fp8):
    model = onnx.load(str(fp8.path))
    onnx.checker.check_model(model, full_check=True)
    conv = next(n.name for n in model.graph.node if n.op_type == "Conv")
    # the 3-channel conv has no FP8 kernel (ModelOpt's rule): it stays in the float base, fc1, skip and fc2 are FP8
    assert fp8.opset >= 19 and fp8.backend == "onnx-qdq" and len(fp8.quantized_nodes) == 3
    assert conv not in fp8.quantized_nodes and conv in fp8.fp32_islands
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert fp8.num_q == 3 and fp8.num_dq == 6  # inputs of fc1, skip, fc2: 3 activation pairs + 3 weights
    for n in qdq:
        assert _elem_type(model, n.input[2]) == onnx.TensorProto.FLOAT8E4M3FN
    weights = [n for n in qdq if any(t.name == n.input[0] for t in model.graph.initializer)]
    assert len(weights) == 3 and all(_elem_type(model, n.input[0]) == onnx.TensorProto.FLOAT8E4M3FN
                                     for n in weights)
    # scales are calibration amax / 448: fc2's input scale reproduces max |input| over the calibration feeds
    fc2 = next(n for n in onnx.load(str(tower)).graph.node if n.name in fp8.quantized_nodes
               and n.op_type in ("MatMul", "Gemm") and "fc2" in n.name)
    q = next(n for n in qdq if n.op_type == "QuantizeLinear" and n.input[0] == fc2.input[0])
    scale = float(onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == q.input[1])))
    probe = onnx.load(str(tower))
    probe.graph.output.append(onnx.helper.make_tensor_value_info(fc2.input[0], onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(probe.SerializeToString())
    amax = max(np.abs(session.run([fc2.input[0]], f)[0]).max() for f in _tower_feeds(6, 1))
    assert math.isclose(scale * FP8_MAX, amax, rel_tol=1e-5)
    producers = _producers(model)
    for node in model.graph.node:
        if node.op_type in FP32_ISLANDS:
            assert all(producers.get(i) != "DequantizeLinear" for i in node.input)
    # no fp32 copy of a quantized weight is left behind: the only fp32 matrix is the excluded conv's
    conv_weight = next(n.input[1] for n in model.graph.node if n.op_type == "Conv")
    assert [t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT
            and len(t.dims) >= 2] == [conv_weight]


def test_conv_rule_follows_modelopt():
    patch_embedding = (32, 3, 14, 14)   # a ViT's first conv: 3 channels in, a 14x14 kernel
    assert conv_quantizable("int8", patch_embedding, 1, reads_graph_input=True)
    assert not conv_quantizable("fp8", patch_embedding, 1, reads_graph_input=True)
    assert conv_quantizable("int8", (64, 64, 3, 3), 1, False) and conv_quantizable("fp8", (64, 64, 3, 3), 1, False)
    assert not conv_quantizable("fp8", (64, 64, 7, 7), 1, False)        # kernel area 49 > 32
    assert not conv_quantizable("fp8", (64, 16, 3, 3), 1, False)        # 16 channels: not > 16 for FP8
    assert conv_quantizable("int8", (64, 16, 3, 3), 1, False)
    assert not conv_quantizable("int8", (12, 3, 3, 3), 1, True)         # neither side a multiple of 8
    assert not conv_quantizable("int8", (8, 3, 3, 5), 1, True)          # non-square kernel


# ---------------------------------------------------------------------------------------------------------------
# fp16 base (strongly typed TensorRT)

def _float_inputs_of(model, op_type: str) -> set[int]:
    """Element types of the float tensors feeding every `op_type` node (after shape inference)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.input]}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    return {types[i] for n in model.graph.node if n.op_type == op_type for i in n.input[:1] if i in types}


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_fp16_base_keeps_fp32_islands_and_parity(tower, tmp_path, precision):
    result = qdq_from_onnx(tower, tmp_path / f"t.{precision}.onnx", _settings(precision, base="fp16"),
                           _tower_feeds(6, 1))
    model = onnx.load(str(result.path))
    onnx.checker.check_model(model, full_check=True)
    assert result.base == "fp16" and result.opset >= 19 and QDQ_BASE == {"tensorrt": "fp16",
                                                                          "onnxruntime-cpu": "fp32"}
    inits = {t.name: t for t in model.graph.initializer}
    scales = [inits[n.input[1]] for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert scales and all(t.data_type == onnx.TensorProto.FLOAT16 for t in scales)
    f16, f32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    assert _float_inputs_of(model, "MatMul") == {f16}   # the quantized layers and all between them: fp16
    for op in FP32_ISLANDS:   # the reference's fp32 ops still read fp32
        assert _float_inputs_of(model, op) == {f32}, op
    assert accuracy_check(tower, result.path, _tower_feeds(3, 99)).summary()["cosine"] > 0.99


def test_fp8_parity_runs_and_simulation_agrees(tower, fp8, tmp_path):
    held = _tower_feeds(3, 99)
    assert fp8.parity_method == "ort"  # ONNX Runtime CPU 1.32 runs float8 Q/DQ on Conv/MatMul inputs
    real = accuracy_check(tower, fp8.path, held).summary()
    sim_path = simulate_fp8(fp8.path, tmp_path / "sim.onnx")
    sim_model = onnx.load(str(sim_path))
    onnx.checker.check_model(sim_model, full_check=True)
    assert not [t for t in sim_model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT8E4M3FN]
    simulated = accuracy_check(tower, sim_path, held).summary()
    assert 0.99 <= simulated["cosine"] < 1.0 and 0.99 <= real["cosine"] < 1.0
    assert abs(simulated["cosine"] - real["cosine"]) < 1e-5
    twin = accuracy_check(fp8.path, sim_path, held)  # the simulation reproduces the float8 graph itself
    assert twin.summary()["rel_l2"] < 1e-5


# ---------------------------------------------------------------------------------------------------------------
# budget

def test_reachable_budget_keeps_int8(tower, tmp_path):
    feeds = _split(_tower_feeds(4, 5), 1)
    decision = quantize_with_budget(tower, tmp_path, "tower", _settings(budget=Tolerance(0.95, 0.5)), feeds)
    assert decision.final == "int8" and decision.excluded_nodes == [] and decision.tries == 1
    assert decision.budget_met and decision.parity_method == "ort" and decision.measured["cosine"] >= 0.95
    assert decision.path == tmp_path / "tower.int8.onnx" and decision.path.is_file()
    cal = decision.calibration
    assert (cal["samples"], cal["held_out"], cal["held_out_in_calibration"], cal["method"], cal["base"],
            cal["backend"], cal["qdq"], cal["shortfall"]) == (3, 1, False, "minmax", "fp32", "onnxruntime", "float",
                                                              None)
    assert decision.gate == "worst held-out sample" and set(decision.held_out) == {"img2"}
    assert decision.worst_sample == "img2"
    json.dumps(decision.to_json())


def test_impossible_budget_excludes_nodes_then_falls_back_to_fp16(tower, tmp_path):
    logs: list[str] = []
    decision = quantize_with_budget(tower, tmp_path, "tower", _settings(budget=1.0 + 1e-9),
                                    _split(_tower_feeds(4, 5), 1), log=logs.append)
    assert decision.final == "fp16" and decision.requested == "int8" and not decision.budget_met
    assert decision.tries == 3  # all 4 nodes, then 1 and 2 of the 4 left fp32 (never all 4)
    assert [h["excluded"] for h in decision.history] == [0, 1, 2, None]
    assert decision.path == tmp_path / "tower.fp16.onnx" and decision.path.is_file()
    assert not (tmp_path / "tower.int8.onnx").exists()
    assert 0.999 < decision.measured["cosine"] <= 1.0 and decision.budget == {"min_cosine": 1.0 + 1e-9,
                                                                            "max_rel_l2": None}
    assert json.loads(json.dumps(decision.to_json()))["final"] == "fp16"
    assert any("fp16 fallback" in line for line in logs)


def test_sensitive_node_is_excluded_and_int8_kept_partially(outlier, tmp_path):
    feeds = _split(_outlier_feeds(5, 3), 2)
    names, _ = select_nodes(onnx.load(str(outlier)))
    fc1 = next(n for n in names if "fc1" in n)
    full = qdq_from_onnx(outlier, tmp_path / "full.onnx", _settings(), feeds.calibration)
    ranking = node_sensitivity(outlier, full.path, feeds.held_out, full.quantized_nodes)
    assert ranking[0][0] == fc1 and ranking[0][1] > ranking[1][1]
    decision = quantize_with_budget(outlier, tmp_path, "mlp", _settings(budget=Tolerance(0.999, 0.05)), feeds)
    assert decision.history[0]["cosine"] < 0.999  # the whole graph in int8 misses the budget
    assert decision.final == "int8-partial" and decision.excluded_nodes == [fc1] and decision.tries == 2
    assert decision.budget_met and decision.measured["cosine"] >= 0.999


def test_a_layered_graph_ranks_only_the_nodes_of_its_worst_block(tmp_path):
    """node_sensitivity with a pool probes the block boundaries first and ranks only the worst block's nodes; the
    budget then leaves out that block's fc1 alone, as the every-node ranking would."""
    torch.manual_seed(0)
    fp32 = _export(LayeredOutlier(), torch.randn(1, 10, 16), tmp_path / "layered.fp32.onnx", ["y"])
    feeds = _split([{"x": np.random.default_rng(i).standard_normal((1, 10, 16)).astype(np.float32)}
                    for i in range(6)], 2)
    full = qdq_from_onnx(fp32, tmp_path / "full.onnx", _settings(), feeds.calibration)
    assert len(full.quantized_nodes) == 12
    every = node_sensitivity(fp32, full.path, feeds.held_out[:1], full.quantized_nodes)
    pooled = node_sensitivity(fp32, full.path, feeds.held_out[:1], full.quantized_nodes, pool=2)
    assert {name.split("/")[1] for name, _ in pooled} == {"layers.2"} and len(pooled) == 2
    assert pooled[0][0] == every[0][0] and "layers.2" in pooled[0][0] and "fc1" in pooled[0][0]
    decision = quantize_with_budget(fp32, tmp_path, "layered", _settings(budget=Tolerance(0.999, 0.05)), feeds)
    assert decision.history[0]["cosine"] < 0.99 and decision.final == "int8-partial"
    assert decision.excluded_nodes == [pooled[0][0]]


def test_exclusion_tries_stop_when_their_gain_cannot_reach_the_budget(tmp_path):
    """Layers' fc1 outlier: excluding it gains a lot, but nowhere near an unreachable 1.5; of the four exclusion
    tries (1, 2, 4, 8 of 12 nodes) only the first runs. A recipe falling back to fp32 ships the fp32 graph itself."""
    torch.manual_seed(0)
    fp32 = _export(LayeredOutlier(), torch.randn(1, 10, 16), tmp_path / "layered.fp32.onnx", ["y"])
    feeds = _split([{"x": np.random.default_rng(i).standard_normal((1, 10, 16)).astype(np.float32)}
                    for i in range(6)], 2)
    logs: list[str] = []
    decision = quantize_with_budget(fp32, tmp_path / "a", "layered", _settings(budget=1.5), feeds, log=logs.append)
    assert [h["excluded"] for h in decision.history] == [0, 1, None] and decision.tries == 2
    assert decision.history[1]["cosine"] > decision.history[0]["cosine"]
    assert "8 excluded nodes would reach" in decision.history[1]["gave_up"]
    assert any("layered [int8]: no more tries: excluding nodes gained at best" in line for line in logs)
    assert decision.final == "fp16" and decision.path == tmp_path / "a" / "layered.fp16.onnx"

    decision = quantize_with_budget(fp32, tmp_path / "b", "layered", _settings(budget=1.5, fallback="fp32"), feeds)
    assert decision.final == "fp32" and decision.path == fp32 and decision.measured["cosine"] > 0.999999
    assert not list((tmp_path / "b").glob("*.onnx"))        # neither the failed int8 graph nor an fp16 one


@pytest.mark.parametrize(("first", "tries", "gives_up"), [
    (0.960338, [(1, 0.961), (2, 0.9615)], True),     # expert C at full size: 0.0007 per node, 0.03 short
    (0.9935, [(1, 0.9937)], False),                  # 0.0002 per node, doubled over 8 nodes reaches 0.995
    (0.99, [(1, 0.989)], False),                     # the worst node gained nothing: one more try first
    (0.99, [(1, 0.989), (2, 0.9899)], True),         # ... and still nothing
])
def test_futile_exclusions_projects_the_best_gain_per_node(first, tries, gives_up):
    reason = futile_exclusions(first, tries, 8, 0.995)
    assert bool(reason) == gives_up, reason


def test_fp8_budget_decision(tower, tmp_path):
    settings = _settings("fp8", budget=0.99, augment_calibration=True)
    decision = quantize_with_budget(tower, tmp_path, "tower", settings, _split(_tower_feeds(3, 5), 1))
    assert decision.final == "fp8" and decision.parity_method == "ort"
    assert decision.calibration["held_out_in_calibration"] and decision.calibration["samples"] == 2


def test_the_gate_judges_the_worst_held_out_sample(tower, tmp_path):
    """A graph good on average but worse on one photo misses the budget: the gate is the worst held-out sample,
    and the decision names it. Held-out samples here: four ordinary feeds and one whose input is 40x larger."""
    feeds = _tower_feeds(9, 5)
    feeds[4]["x"] = feeds[4]["x"] * 40.0     # held out (the split holds out the middle one of each stretch)
    split = _split(feeds, 5)
    assert "img4" in split.held_out_labels
    graph = qdq_from_onnx(tower, tmp_path / "probe.onnx", _settings(), split.calibration)
    per = accuracy_check(tower, graph.path, split.held_out, labels=split.held_out_labels).per_sample()
    worst = min(per, key=lambda k: per[k].cosine)
    others = [f.cosine for k, f in per.items() if k != worst]
    assert worst == "img4" and per[worst].cosine < min(others)
    mean = float(np.mean([f.cosine for f in per.values()]))
    budget = (per[worst].cosine + min(others)) / 2           # every other sample and the mean meet it
    assert mean > budget
    decision = quantize_with_budget(tower, tmp_path, "tower", _settings(budget=budget), split)
    assert decision.history[0]["worst_sample"] == "img4" and decision.history[0]["cosine"] < budget
    assert decision.final != "int8"                          # not shipped whole: nodes excluded or fp16
    assert set(decision.held_out) == set(split.held_out_labels)
    assert decision.held_out[decision.worst_sample]["cosine"] == decision.measured["cosine"]


def test_a_short_calibration_set_is_said_and_recorded():
    feeds = [{"x": np.full((1,), i, np.float32)} for i in range(6)]
    labels = [f"photo{i}" for i in range(6)]
    full = split_calibration(feeds, labels, 4, 2)
    assert full.shortfall is None and len(full.calibration) == 4 and len(full.held_out) == 2
    short = split_calibration(feeds, labels, 20, 8)
    assert len(short.held_out) == 2 and len(short.calibration) == 4   # the recipe's proportion, 8 of 28 -> 2 of 6
    assert short.shortfall == ("the recipe asks for 20 calibration + 8 held-out samples; the calibration set has 6: "
                               "calibrating on 4, judging on 2 (pass --calib with more images)")
    assert short.to_json()["asked"] == {"samples": 20, "held_out": 8}
    assert short.held_out_labels == ["photo1", "photo4"]


def test_the_backend_is_resolved_into_the_settings(monkeypatch):
    """"auto" never reaches a writer: QuantSettings carry the backend that runs, so its JSON (the unit key) differs
    between a machine with nvidia-modelopt and one without."""
    from mova_export.quantize import settings as settings_module
    from mova_export.recipe import load_recipe

    recipe = load_recipe("jetson-orin")
    assert recipe.calibration.backend == "auto"
    here = QuantSettings.from_recipe(recipe, "base")
    assert here.backend == resolve_backend("auto") == ("modelopt" if modelopt_module() else "onnxruntime")
    monkeypatch.setattr(settings_module, "modelopt_module", lambda: object())
    other = QuantSettings.from_recipe(recipe, "base")
    assert other.backend == "modelopt" and other.to_json() != here.to_json() or here.backend == "modelopt"
    assert (here.qdq, here.base) == ("float", "fp16")
    assert QuantSettings.from_recipe(load_recipe("cpu"), "base").qdq == "fused"


# ---------------------------------------------------------------------------------------------------------------
# feeds and bad inputs

def test_split_feeds_is_deterministic():
    feeds = [{"x": np.full((1,), i, np.float32)} for i in range(3)]
    calib, held = split_feeds(feeds, 1)
    assert [int(f["x"][0]) for f in calib] == [0, 2] and [int(f["x"][0]) for f in held] == [1]
    ten = [{"x": np.full((1,), i, np.float32)} for i in range(10)]
    calib, held = split_feeds(ten, 0.3)
    assert [int(f["x"][0]) for f in held] == [1, 5, 8] and len(calib) == 7
    assert split_feeds(ten, 0.3)[1][0]["x"] == held[0]["x"]
    for bad in (0, 3, 1.5, 0.0):
        with pytest.raises(ExportError):
            split_feeds(feeds, bad)
    with pytest.raises(ExportError, match="at least 2 feeds"):
        split_feeds(feeds[:1], 1)


def test_read_feeds_unstacks_the_npz(tmp_path):
    path = tmp_path / "c.npz"
    np.savez(path, x=np.arange(3 * 2 * 4, dtype=np.float32).reshape(3, 1, 2, 4))  # bundle layout: [N, 1, ...]
    feeds = read_feeds(path)
    assert len(feeds) == 3 and feeds[1]["x"].shape == (1, 2, 4) and feeds[1]["x"][0, 0, 0] == 8
    with pytest.raises(ExportError, match="not found"):
        read_feeds(tmp_path / "missing.npz")


def test_bad_inputs_raise_typed_errors(tower, tmp_path):
    feeds = _tower_feeds(2, 1)
    settings_cases = [(dict(precision="int4"), "unknown quantization precision"),
                      (dict(method="mse"), "unknown calibration method"),
                      (dict(backend="tensorrt"), "unknown quantization backend"),
                      (dict(precision="fp8", method="entropy"), "not 'entropy'")]
    for change, message in settings_cases:
        with pytest.raises(ExportError, match=message) as info:
            _settings(**({"precision": "int8"} | change))
        assert "\n" not in str(info.value)
    with pytest.raises(ExportError, match="unknown quantization backend"):
        resolve_backend("tensorrt")
    cases = [
        (dict(src=tmp_path / "missing.onnx"), "not found"),
        (dict(calibration=[]), "empty"),
        (dict(calibration=[{"y": feeds[0]["x"]}]), "wrong inputs"),
    ]
    if modelopt_module() is None:  # the optional extra is absent here: asking for it names the fix
        cases.append((dict(settings=_settings(backend="modelopt")), "nvidia-modelopt"))
    for change, message in cases:
        args = dict(src=tower, dst=tmp_path / "q.onnx", settings=_settings(), calibration=feeds) | change
        with pytest.raises(MoVAExportError, match=message) as info:
            qdq_from_onnx(args["src"], args["dst"], args["settings"], args["calibration"])
        assert isinstance(info.value, ExportError) and "\n" not in str(info.value)
    names, _ = select_nodes(onnx.load(str(tower)))
    with pytest.raises(ExportError, match="no Conv/MatMul/Gemm node"):
        qdq_from_onnx(tower, tmp_path / "q.onnx", _settings(), feeds, exclude_nodes=names)
    with pytest.raises(ExportError, match="held-out"):
        quantize_with_budget(tower, tmp_path, "tower", _settings(budget=0.9),
                             FeedSplit(feeds, [], [], (2, 0)))

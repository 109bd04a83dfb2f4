"""Explicit Q/DQ graphs (INT8, FP8 E4M3) from checked fp32 graphs, judged on held-out feeds against a budget.

settings.py     QuantSettings: how one graph is quantized and judged, resolved once from the recipe (the unit key)
feeds.py        calibration / held-out split, and what the calibration set lacked
select.py       which nodes get Q/DQ (weight-bearing MatMul/Gemm/Conv, ModelOpt's Conv rule), graph helpers
qdq.py          qdq_from_onnx: the dispatcher over the writers below
int8.py         onnxruntime's quantize_static with narrowed calibration
fp8.py          FP8 E4M3 Q/DQ written with standard ONNX ops
fp8_sim.py      simulate_fp8: an fp32 twin of a float8 graph, where float8 kernels are missing
modelopt.py     nvidia-modelopt's quantizer (optional extra)
base.py         the fp16 base around the Q/DQ pairs for strongly typed TensorRT
measure.py      accuracy_check / measure: a Q/DQ graph against its fp32 graph, the way the target executes it
sensitivity.py  node_sensitivity (scoring) and exclusion_schedule (policy)
budget.py       quantize_with_budget: the gate, node exclusion, the fp16 fallback -> QuantDecision
"""
from .budget import GATE, QuantDecision, quantize_with_budget
from .feeds import FeedSplit, split_calibration, split_feeds
from .fp8 import FP8_MAX, to_fp8
from .fp8_sim import simulate_fp8
from .measure import accuracy_check, measure
from .qdq import QuantResult, qdq_from_onnx
from .select import QUANT_OP_TYPES, conv_quantizable, select_nodes
from .sensitivity import exclusion_schedule, node_sensitivity
from .settings import QDQ_BASE, QDQ_MODE, QuantSettings, modelopt_module, resolve_backend

__all__ = ["FP8_MAX", "GATE", "QDQ_BASE", "QDQ_MODE", "QUANT_OP_TYPES", "FeedSplit", "QuantDecision", "QuantResult",
           "QuantSettings", "accuracy_check", "conv_quantizable", "exclusion_schedule", "measure", "modelopt_module",
           "node_sensitivity", "qdq_from_onnx", "quantize_with_budget", "resolve_backend", "select_nodes",
           "simulate_fp8", "split_calibration", "split_feeds", "to_fp8"]

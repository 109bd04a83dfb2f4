"""Runners: one `Runner` interface (`infer(feed) -> outputs`) over ONNX Runtime, TensorRT and PyTorch, and one
comparison (`compare_runners`). Backends import their libraries lazily: onnxruntime when an OrtRunner is made,
TensorRT and cuda-python for a TensorRTRunner, torch for a TorchRunner's first feed.

base.py      the Runner protocol, check_feed
ort.py       OrtRunner (qdq="fused" | "float"), runs_in_ort
tensorrt.py  TensorRTRunner (buffers allocated once, outputs left on the device), DeviceChain, engine_runner,
             tensorrt_available
pytorch.py   TorchRunner (the build side's reference)
compare.py   compare_runners -> core.tolerance.ParityReport
"""
from .base import Feed, Runner, check_feed
from .compare import NO_THRESHOLD, compare_runners
from .ort import QDQ_MODES, OrtRunner, runs_in_ort
from .pytorch import TorchRunner
from .tensorrt import TensorRTRunner, tensorrt_available

__all__ = ["NO_THRESHOLD", "QDQ_MODES", "Feed", "OrtRunner", "Runner", "TensorRTRunner", "TorchRunner",
           "check_feed", "compare_runners", "runs_in_ort", "tensorrt_available"]

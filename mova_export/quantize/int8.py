"""INT8 explicit Q/DQ with onnxruntime's own quantizer: `quant_pre_process` (shape inference only) +
`quantize_static` (QDQ, QInt8/QInt8, per-channel symmetric weights, symmetric per-tensor activations, no bias or
output quantization) on the chosen nodes, calibrated by onnxruntime's calibrator classes with the tensor selection
narrowed to those nodes (`calibration_ranges`), and the fp32 consumers rewired past onnxruntime's shared Q/DQ."""
from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..core.memory import release_freed_memory
from ..core.progress import Log, quiet
from ..export.graph_io import has_external_data, save_copying_weights, save_model, too_large
from .select import QUANT_OP_TYPES

if TYPE_CHECKING:  # pragma: no cover
    import onnx

PERCENTILE = 99.999


class FeedReader:
    """onnxruntime CalibrationDataReader over in-memory feeds (duck-typed: get_next / rewind)."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]):
        self.feeds = list(feeds)
        self.i = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= len(self.feeds):
            return None
        self.i += 1
        return self.feeds[self.i - 1]

    def rewind(self) -> None:
        self.i = 0


def int8_qdq(model: "onnx.ModelProto", scratch: Path, feeds: list[dict], method: str, chosen: list[str],  # noqa: PLR0913
             islands: list[str], log: Log = quiet, ranges: Path | None = None, source: Path | None = None
             ) -> tuple["onnx.ModelProto", Path | None]:
    """The INT8 Q/DQ graph of `model` and the calibration ranges it used (a file in `scratch`, or `ranges` when
    given: ranges computed for a superset of the chosen nodes serve a later try that excludes some of them).
    `model` may be read without its external weights from `source` (their file is copied, never loaded here)."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    large = too_large(model)
    named = scratch.absolute() / "named.onnx"
    if source is not None and has_external_data(model):
        save_copying_weights(model, source, named)
    else:
        save_model(model, named)
    pre = scratch.absolute() / "pre.onnx"
    try:  # shape inference only: ORT's graph optimizations would rename nodes (MatMul+Add -> Gemm) and add reshapes
        with silenced(), _working_dir(scratch):
            quant_pre_process(str(named), str(pre), skip_optimization=True, save_as_external_data=large,
                              all_tensors_to_one_file=True)
    except Exception as exc:  # symbolic shape inference gives up on some graphs; the exported one is shape-inferred
        log(f"quant_pre_process failed ({type(exc).__name__}: {str(exc)[:120]}); quantizing the graph as exported")
        pre = named

    class Reader(FeedReader, CalibrationDataReader):
        pass

    calib = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
             "percentile": CalibrationMethod.Percentile}[method]
    out = scratch / "int8.onnx"
    cached: dict[str, str] = {}
    if "calibration_cache_path" in inspect.signature(quantize_static).parameters:   # onnxruntime >= 1.24
        ranges = ranges or calibration_ranges(pre, scratch, feeds, calib, chosen, large, log)
        cached["calibration_cache_path"] = str(ranges)
    with silenced():
        quantize_static(str(pre), str(out), Reader(feeds), **cached, quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(QUANT_OP_TYPES), per_channel=True, reduce_range=False,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, nodes_to_quantize=chosen,
                        nodes_to_exclude=islands, use_external_data_format=large, calibrate_method=calib,
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
                                       "OpTypesToExcludeOutputQuantization": list(QUANT_OP_TYPES),
                                       "CalibPercentile": PERCENTILE, "CalibTensorRangeSymmetric": True})
    result = onnx.load(str(out))
    rewired = _fp32_consumers_skip_qdq(result, set(chosen))
    if rewired:
        log(f"int8: {rewired} input(s) of fp32 nodes (norms, softmax, residual adds) that share a tensor with a "
            "quantized layer now read the tensor itself: onnxruntime had given them its int8-rounded copy")
    return result, ranges


def calibration_ranges(model_path: Path, scratch: Path, feeds: Sequence[dict[str, np.ndarray]], calibrate_method: Any,
                       chosen: Sequence[str], large: bool, log: Log = quiet) -> Path:
    """onnxruntime's activation ranges for exactly the tensors the chosen nodes read and write, one feed at a time,
    written as its calibration cache (quantize_static then skips its own calibration).

    quantize_static's calibrator keeps every input and output of every node of the quantized op types for every feed
    at once: at full size that includes the base encoder's attention MatMuls (16 x 2304 x 2304 scores, 340 MB each,
    two per layer), which took a full build's RSS past 23 GB and into the OOM killer. The same calibrator classes
    with the tensor selection narrowed to the chosen nodes, fed one sample per call (the histogram collector and
    the min/max ranges merge across calls), keep one sample of the tensors that get Q/DQ.
    """
    import onnxruntime
    from onnxruntime.quantization import calibrate

    classes = {calibrate.CalibrationMethod.MinMax: (calibrate.MinMaxCalibrater, {}),
               calibrate.CalibrationMethod.Entropy: (calibrate.EntropyCalibrater,
                                                     {"num_bins": 128, "num_quantized_bins": 128}),
               calibrate.CalibrationMethod.Percentile: (calibrate.PercentileCalibrater,
                                                        {"num_bins": 2048, "percentile": PERCENTILE})}
    base, options = classes[calibrate_method]   # quantize_static's defaults for each, symmetric as we pass it
    wanted = set(chosen)

    class NarrowCalibrater(base):  # type: ignore[misc, valid-type]
        def select_tensors_to_calibrate(self, model: Any) -> Any:
            tensors, infos = super().select_tensors_to_calibrate(model)
            # inputs only: the quantized nodes' outputs get no Q/DQ (OpTypesToExcludeOutputQuantization), and at full
            # size every calibrated tensor of one sample is in memory at once (20 GiB for Co-DETR with outputs too)
            used = {t for node in model.graph.node if node.name in wanted for t in node.input}
            return tensors & used, infos

        def create_inference_session(self) -> None:
            options = onnxruntime.SessionOptions()
            options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL   # as the base
            options.enable_cpu_mem_arena = False    # a sample's tensors are freed after its run, not kept as arena
            self.infer_session = onnxruntime.InferenceSession(self.augmented_model_path, sess_options=options,
                                                              providers=self.execution_providers)

    with silenced():
        calibrator = NarrowCalibrater(str(model_path), list(QUANT_OP_TYPES),
                                      augmented_model_path=str(scratch.absolute() / "augmented.onnx"),
                                      use_external_data_format=large, symmetric=True, **options)
        calibrator.augment_graph()
        calibrator.create_inference_session()
        calibrator.model = None     # the augmented proto: the session has its own copy (4.4 GB for DINOv2-giant)
    start = time.perf_counter()
    for i, feed in enumerate(feeds, 1):
        with silenced():
            calibrator.collect_data(FeedReader([feed]))
        release_freed_memory()          # this sample's tensors (GBs at full size) back to the system before the next
        log(f"int8 calibration: batch {i}/{len(feeds)} ({time.perf_counter() - start:.1f} s)")
    path = scratch / "calibration.json"
    with silenced():
        calibrate.save_tensors_data(calibrator.compute_data(), path)
    del calibrator
    return path


@contextlib.contextmanager
def _working_dir(folder: Path) -> Any:
    """Run inside `folder`: onnxruntime's symbolic shape inference, when it gives up (the text encoder's symbolic
    length), dumps sym_shape_infer_temp.onnx and a <uuid>.data file into the working directory before raising."""
    previous = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


@contextlib.contextmanager
def silenced() -> Any:
    """onnxruntime's calibrators report progress with print, tqdm (stderr) and the logging module ("Number of
    histogram bins : 128 ...", "Please consider to run pre-processing before quantization"); none of it says anything
    our own log line does not, so it is dropped: nothing from the library reaches the console."""
    previous = logging.root.manager.disable
    sink = io.StringIO()
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def _fp32_consumers_skip_qdq(model: "onnx.ModelProto", chosen: set[str]) -> int:
    """onnxruntime's QDQ quantizer hands the DQ output of a quantized tensor to every consumer, so a LayerNorm or
    Softmax sharing an input with a quantized MatMul would read int8-rounded values. Point such inputs (and graph
    outputs) back at the tensor before its QuantizeLinear; returns how many inputs were rewired."""
    producer = {o: n for n in model.graph.node for o in n.output}
    source = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in producer \
                and producer[node.input[0]].op_type == "QuantizeLinear":
            source[node.output[0]] = producer[node.input[0]].input[0]
    count = 0
    for node in model.graph.node:
        if node.name in chosen or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for i, name in enumerate(node.input):
            if name in source:
                node.input[i] = source[name]
                count += 1
    return count



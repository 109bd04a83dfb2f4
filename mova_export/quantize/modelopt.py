"""Q/DQ graphs by nvidia-modelopt's `modelopt.onnx.quantization.quantize` (the optional `modelopt` extra, imported
lazily; QuantSettings resolves backend "auto" to it when it imports). Not exercised on the CPU machines that test
this project: nvidia-modelopt pulls onnxruntime-gpu, which shadows the CPU onnxruntime."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from ..core.errors import ExportError
from .select import QUANT_OP_TYPES
from .settings import modelopt_module

if TYPE_CHECKING:  # pragma: no cover
    import onnx


def modelopt_qdq(src: Path, scratch: Path, precision: str, feeds: list[dict], method: str,
                 exclude: Sequence[str]) -> "onnx.ModelProto":
    """modelopt's Q/DQ graph of `src` on the same node types and exclusions (the asked-for ones and the fp32
    islands) as the onnxruntime path, calibrated on the same feeds."""
    import onnx

    mq = modelopt_module()
    if mq is None:
        raise ExportError("backend 'modelopt' needs nvidia-modelopt, which is not importable here; install it on "
                          "the device (pip install 'mova-export[modelopt]') or use backend='onnxruntime'")
    out = scratch / f"modelopt.{precision}.onnx"
    data = {k: np.concatenate([f[k] for f in feeds], axis=0) for k in feeds[0]}
    mq.quantize(onnx_path=str(src), quantize_mode=precision, calibration_data=data,
                calibration_method={"minmax": "max", "entropy": "entropy"}[method], output_path=str(out),
                nodes_to_exclude=list(exclude), op_types_to_quantize=list(QUANT_OP_TYPES), calibration_eps=["cpu"])
    return onnx.load(str(out))

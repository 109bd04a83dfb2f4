"""Export: one static ONNX graph per component form, at fp32 and fp16, each proven against the PyTorch module.

onnx.py         torch module -> checked ONNX graph (declared I/O, static shapes, no control flow)
graph_io.py     graph files (external data past 2 GB), the declaration check, the fp16 variant with fp32 islands
samples.py      parity samples from real images (and seeded random feeds), the adapter's routing-mask sweep
component.py    one component's export unit: its graph forms, their parity, calibration and check feeds, features
calibration.py  the calibration set (images + questions): a folder, or the built-in pictures
"""
from .calibration import CalibrationSet, load_calibration, read_feeds
from .component import EXPORT_PRECISIONS, ExportedComponent, ExportInputs, GraphForm, export_component, graph_forms
from .fp16 import FP32_OPS, fp16_block_nodes, fp16_from_onnx
from .graph_io import DYNAMIC_OPS, check_graph, graph_files, save_model
from .onnx import OPSET, onnx_from_component, onnx_from_module
from .samples import Sample, routing_masks, sweep_masks, validate_graph

__all__ = ["DYNAMIC_OPS", "EXPORT_PRECISIONS", "FP32_OPS", "OPSET", "CalibrationSet", "ExportInputs",
           "ExportedComponent", "GraphForm", "Sample", "check_graph", "export_component", "fp16_block_nodes",
           "fp16_from_onnx", "graph_files", "graph_forms", "load_calibration", "onnx_from_component",
           "onnx_from_module", "read_feeds", "routing_masks", "save_model", "sweep_masks", "validate_graph"]

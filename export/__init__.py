"""gvsl.export: deployment artifacts from a trained run, a gvsl model or the official ``.pth``.

* ONNX graphs ``encoder.onnx`` (image -> embedding [, features]) and
  ``registration.onnx`` (fixed, moving -> affine, dvf, warped), dynamic batch
  and spatial size, self-describing through ``metadata_props``
  (:mod:`gvsl.runtime.artifact` keys), fp32 and fp16;
* parity with PyTorch checked on ONNX Runtime before anything is written;
* TensorRT engines (TensorRT 10 API) and a static CPU check that a graph will
  parse in TensorRT (the registration graph warps with gathers because
  TensorRT's GridSample is 2-D only);
* a Triton model repository.

Entry point: :func:`run_export` (what ``gvsl export`` calls). Needs torch and
onnx/onnxruntime; the runtime reads the results with onnxruntime alone.
"""

from gvsl.export.errors import ExportError
from gvsl.export.manifest import describe, read_manifest
from gvsl.export.onnx_export import build_metadata, export_graph, graph_io, graph_module, read_metadata
from gvsl.export.pipeline import ExportOptions, run_export
from gvsl.export.source import Source, load_source
from gvsl.export.trt_check import assert_tensorrt_compatible, check_tensorrt
from gvsl.export.verify import verify_onnx

__all__ = [
    "ExportError",
    "ExportOptions",
    "Source",
    "assert_tensorrt_compatible",
    "build_metadata",
    "check_tensorrt",
    "describe",
    "export_graph",
    "graph_io",
    "graph_module",
    "load_source",
    "read_manifest",
    "read_metadata",
    "run_export",
    "verify_onnx",
]

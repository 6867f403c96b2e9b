"""Inference backends behind one small interface (:class:`Backend`), looked up by name.

Modules, one purpose each:

* :mod:`.base` — the contract (:class:`Backend`, :class:`ModelInfo`) and shared helpers;
* :mod:`.model_files` — which file is a model, and the metadata it carries;
* :mod:`.registry` — ``register_backend`` / ``load_backend``;
* :mod:`.onnx_runtime` — ONNX Runtime (CPU, CUDA EP, TensorRT EP);
* :mod:`.tensorrt_runtime` — native TensorRT 10, :mod:`.engine_builder` (the one
  engine builder, shared with ``gvsl export``) and :mod:`.cuda` (ctypes CUDA);
* :mod:`.int8` — int8 copies of the encoder for ONNX Runtime on the CPU.

The torch backend is gvsl core's (``gvsl.torch_backend``); it registers itself
when imported. No module here imports torch or gvsl core.
"""

from . import onnx_runtime, tensorrt_runtime  # noqa: F401 - each registers its backend
from .base import DEFAULT_PATCH, Backend, ModelInfo
from .engine_builder import NETWORK_SCOPES, pin_geometry_fp32
from .int8 import calibration_windows, quantize_int8
from .model_files import read_onnx_metadata, resolve_model_file
from .onnx_runtime import OnnxRuntimeBackend
from .registry import BACKENDS, load_backend, register_backend
from .tensorrt_runtime import TensorRTBackend

__all__ = [
    "BACKENDS",
    "Backend",
    "DEFAULT_PATCH",
    "ModelInfo",
    "NETWORK_SCOPES",
    "OnnxRuntimeBackend",
    "TensorRTBackend",
    "calibration_windows",
    "load_backend",
    "pin_geometry_fp32",
    "quantize_int8",
    "read_onnx_metadata",
    "register_backend",
    "resolve_model_file",
]

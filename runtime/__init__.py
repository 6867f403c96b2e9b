"""gvsl.runtime: torch-free preprocessing and inference.

Imported by inference servers that have only numpy, scipy, nibabel and ONNX
Runtime / TensorRT, so no module in this package imports torch or gvsl core,
not even lazily (tests/test_backends.py checks every import statement). The
torch backend is core's ``gvsl.torch_backend``, which registers itself with
this package's backend registry when imported. ``Embedder`` and ``Registrar`` are
imported lazily: ``import gvsl.runtime`` stays as light as preprocessing.
"""

from typing import Any

from .errors import GvslInputError
from .nifti import load_volume
from .preprocess import preprocess
from .preprocess_config import PreprocessConfig
from .volume import Volume

_LAZY = {
    "Embedder": ".embed",
    "Embedding": ".embed",
    "Registrar": ".register",
    "Registration": ".register",
    "RefineOptions": ".refine",
    "load_backend": ".backends",
    "read_volume": ".io",
    "save_displacement_field": ".io",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Embedder",
    "Embedding",
    "GvslInputError",
    "PreprocessConfig",
    "RefineOptions",
    "Registrar",
    "Registration",
    "Volume",
    "load_backend",
    "load_volume",
    "preprocess",
    "read_volume",
    "save_displacement_field",
]

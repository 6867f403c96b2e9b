"""The backend registry: ``load_backend`` looks a backend up by name and opens a model with it.

The runtime registers ``onnxruntime`` and ``tensorrt`` itself. The torch
backend lives in gvsl core (``gvsl.torch_backend``), which registers ``torch``
when it is imported, so the runtime never imports torch or core: entry points
that accept trained models (the CLI) import it. ``auto`` picks by the model
file: torch for a trained model, TensorRT for an engine, ONNX Runtime for an
ONNX graph (TensorRT when only TensorRT is installed).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import GvslInputError
from .base import Backend
from .model_files import resolve_model_file

#: Backend names the command line offers (``auto`` chooses one of the others).
BACKENDS = ("auto", "onnxruntime", "tensorrt", "torch")


@dataclass(frozen=True)
class BackendEntry:
    """A registered backend: ``factory(path, kind, device, **options)`` opens a model of
    one of ``formats`` (``"onnx"``, ``"engine"``, ``"torch"``, see ``resolve_model_file``)."""

    name: str
    factory: Callable[..., Backend]
    formats: tuple[str, ...]


_REGISTRY: dict[str, BackendEntry] = {}


def register_backend(name: str, factory: Callable[..., Backend], formats: tuple[str, ...]) -> None:
    """Make ``name`` available to :func:`load_backend` (registering again replaces it)."""
    if name == "auto" or name not in BACKENDS:
        raise ValueError(f"backend names are {', '.join(BACKENDS[1:])}; got {name!r}")
    _REGISTRY[name] = BackendEntry(name, factory, tuple(formats))


def registered_backends() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def _auto(fmt: str) -> str:
    if fmt == "torch":
        return "torch"
    if fmt == "engine":
        return "tensorrt"
    has_ort = importlib.util.find_spec("onnxruntime") is not None
    has_trt = importlib.util.find_spec("tensorrt") is not None
    return "tensorrt" if (not has_ort and has_trt) else "onnxruntime"


def load_backend(
    model: str | os.PathLike[str], kind: str, backend: str = "auto", device: str = "auto", **options: Any
) -> Backend:
    """Open ``model`` for ``kind`` ("encoder" / "registration") on ``backend``.

    ``options``: ``threads`` (CPU threads, 0 = library default), ``cache_dir``
    (engine caches, default ``$GVSL_CACHE_DIR`` or ``~/.cache/gvsl``),
    ``max_shape`` (largest registration input D,H,W for TensorRT profiles),
    ``max_batch``, ``max_contexts`` (TensorRT context pool size),
    ``allow_cpu_fallback`` (ONNX Runtime: warn instead of failing when a GPU
    was asked for and the session got only the CPU).
    """
    backend = (backend or "auto").lower()
    if backend not in BACKENDS:
        raise GvslInputError(f"--backend {backend}: use one of {', '.join(BACKENDS)}")
    path, fmt = resolve_model_file(model, kind)
    if backend == "auto":
        backend = _auto(fmt)
    if options.get("int8_calibration") and backend != "onnxruntime":
        raise GvslInputError(f"int8 runs on ONNX Runtime (CPU), not --backend {backend}")
    entry = _REGISTRY.get(backend)
    if entry is None:
        if backend == "torch":
            raise GvslInputError(
                f"{path}: torch models need gvsl core's torch backend, which is not loaded; install/import gvsl "
                "core to use torch models (pip install 'gvsl[train]'; `import gvsl.torch_backend`), or pass an "
                "ONNX export from `gvsl export`",
                str(path),
            )
        raise GvslInputError(f"--backend {backend}: not registered in this process")
    if fmt not in entry.formats:
        if backend == "torch":
            raise GvslInputError(
                f"{path}: --backend torch needs the trained model (folder with model.safetensors, or .pth), "
                "not an ONNX export",
                str(path),
            )
        if fmt == "torch":
            raise GvslInputError(
                f"{path}: --backend {backend} needs an ONNX export; run `gvsl export` on this model first, or use "
                "--backend torch",
                str(path),
            )
        raise GvslInputError(
            f"{path}: a TensorRT engine runs on --backend tensorrt only; give the ONNX export for --backend {backend}",
            str(path),
        )
    return entry.factory(path, kind, device, **options)


__all__ = ["BACKENDS", "BackendEntry", "load_backend", "register_backend", "registered_backends"]

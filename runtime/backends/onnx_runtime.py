"""ONNX Runtime backend: one ``InferenceSession`` (its ``run`` is thread-safe).

Providers are picked TensorRT EP -> CUDA EP -> CPU for GPU devices, with
engine and timing caches on disk and explicit shape profiles so dynamic
shapes do not rebuild engines at every new size. ONNX Runtime drops a GPU
provider it cannot load (missing CUDA/cuDNN libraries, a CPU-only package) and
carries on on the CPU with only a log line; with ``--device cuda`` the session's
actual providers are checked, and a session that got no GPU provider is an
error naming the cause, or a warning under ``allow_cpu_fallback``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import GvslInputError
from .base import (
    GRAPH_IO,
    Backend,
    ModelInfo,
    cache_folder,
    check_device,
    contract_inputs,
    device_index,
    input_profile,
    shape_str,
)
from .model_files import import_onnxruntime, info_from_metadata, not_onnx_error, read_onnx_metadata
from .registry import register_backend

LOG = logging.getLogger("gvsl.runtime")
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime session with provider selection (TensorRT EP -> CUDA EP -> CPU)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        kind: str,
        device: str = "auto",
        *,
        threads: int = 0,
        cache_dir: str | os.PathLike[str] | None = None,
        max_shape: Sequence[int] | None = None,
        max_batch: int = 1,
        providers: Sequence[Any] | None = None,
        trt_ep: bool = True,
        int8_calibration: Sequence[Any] | None = None,
        allow_cpu_fallback: bool = False,
        **_: Any,  # options of other backends (max_contexts ...), so `auto` never trips on them
    ) -> None:
        ort = import_onnxruntime()
        path = Path(path)
        device = check_device(device)
        if int8_calibration:
            if device != "cpu":
                raise GvslInputError("int8 is a CPU mode (ONNX Runtime QLinearConv); use --device cpu")
            from .int8 import int8_model

            path = int8_model(path, kind, int8_calibration, cache_dir)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = int(threads)
        try:
            if providers is None:
                # the metadata is needed for TensorRT EP profiles, so read it before the session
                info = info_from_metadata(read_onnx_metadata(path), path, kind)
                providers = self._providers(
                    ort, info, device, cache_dir, max_shape, max_batch, trt_ep, allow_cpu_fallback
                )
            # errors only on the CPU; with a GPU provider asked for, warnings too, so ONNX Runtime's
            # own reason for dropping it (a missing libcudnn ...) reaches the log
            gpu_asked = any(_provider_name(p) in GPU_PROVIDERS for p in providers)
            opts.log_severity_level = 2 if gpu_asked else 3
            self.session = ort.InferenceSession(str(path), opts, providers=list(providers))
        except GvslInputError:
            raise
        except Exception as e:
            raise not_onnx_error(path, e) from None
        meta = dict(self.session.get_modelmeta().custom_metadata_map)
        self.info = info_from_metadata(meta, path, kind)
        names = {o.name for o in self.session.get_outputs()}
        ins = {i.name: i for i in self.session.get_inputs()}
        self.graph_inputs = contract_inputs(kind, ins)
        if self.graph_inputs is None or not {o for o in GRAPH_IO[kind][1] if o != "features"} <= names:
            raise GvslInputError(
                f"{path}: graph I/O {sorted(ins)} -> {sorted(names)} is not the gvsl {kind} contract; "
                "export it again with `gvsl export`",
                str(path),
            )
        self._outputs = tuple(o for o in GRAPH_IO[kind][1] if o in names)
        self._in_dtype = {
            n: (np.float16 if "float16" in i.type else np.int64 if "int64" in i.type else np.float32)
            for n, i in ins.items()
        }
        used = self.session.get_providers()
        if device != "cpu" and providers and not set(GPU_PROVIDERS) & set(used):
            _cpu_fallback(ort, path, device, providers, used, allow_cpu_fallback)
        self.providers = tuple(used)
        self.name = f"onnxruntime[{used[0].replace('ExecutionProvider', '')}]"

    @staticmethod
    def _providers(
        ort: Any,
        info: ModelInfo,
        device: str,
        cache_dir: str | os.PathLike[str] | None,
        max_shape: Sequence[int] | None,
        max_batch: int,
        trt_ep: bool,
        allow_cpu_fallback: bool = False,
    ) -> list[Any]:
        available = set(ort.get_available_providers())
        if device == "cpu":
            return ["CPUExecutionProvider"]
        gpu = {"TensorrtExecutionProvider", "CUDAExecutionProvider"} & available
        if not gpu:
            if device == "auto":
                return ["CPUExecutionProvider"]
            why = f"this onnxruntime has no CUDA support (providers: {', '.join(sorted(available))})"
            if allow_cpu_fallback:
                LOG.warning("--device %s: %s; running on the CPU (--allow-cpu-fallback)", device, why)
                return ["CPUExecutionProvider"]
            raise GvslInputError(
                f"--device {device}: {why}; pip install onnxruntime-gpu, use --device cpu, or pass --allow-cpu-fallback"
            )
        if hasattr(ort, "preload_dlls"):  # CUDA/cuDNN from pip wheels, when present
            try:
                ort.preload_dlls()
            except Exception:
                pass
        idx = device_index(device)
        out: list[Any] = []
        if trt_ep and "TensorrtExecutionProvider" in available:
            cache = cache_folder(cache_dir) / "ort-trt"
            cache.mkdir(parents=True, exist_ok=True)
            prof = input_profile(info, max_shape, max_batch)

            def fmt(i: int) -> str:
                return ",".join(f"{n}:{shape_str(s[i])}" for n, s in prof.items())

            out.append(
                (
                    "TensorrtExecutionProvider",
                    {
                        "device_id": idx,
                        "trt_engine_cache_enable": True,
                        "trt_engine_cache_path": str(cache),
                        "trt_timing_cache_enable": True,
                        "trt_timing_cache_path": str(cache),
                        "trt_fp16_enable": info.precision == "fp16",
                        "trt_profile_min_shapes": fmt(0),
                        "trt_profile_opt_shapes": fmt(1),
                        "trt_profile_max_shapes": fmt(2),
                    },
                )
            )
        if "CUDAExecutionProvider" in available:
            out.append(
                (
                    "CUDAExecutionProvider",
                    {
                        "device_id": idx,
                        # exhaustive search would re-benchmark every new volume size
                        "cudnn_conv_algo_search": "HEURISTIC",
                        "arena_extend_strategy": "kSameAsRequested",
                    },
                )
            )
        out.append("CPUExecutionProvider")
        return out

    @property
    def output_names(self) -> tuple[str, ...]:
        return self._outputs

    def run(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        want = self._check_outputs(outputs)
        feed = {n: np.ascontiguousarray(inputs[n], dtype=self._in_dtype[n]) for n in self.input_names}
        res = self.session.run(want, feed)
        return {n: np.asarray(r, dtype=np.float32) for n, r in zip(want, res, strict=True)}

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]


def _provider_name(provider: Any) -> str:
    return provider[0] if isinstance(provider, tuple) else str(provider)


def _cpu_fallback(
    ort: Any, path: Path, device: str, requested: Sequence[Any], used: Sequence[str], allowed: bool
) -> None:
    """The session asked for a GPU provider and got only the CPU: an error naming the cause,
    or (``allowed``) one warning line. ``device="auto"`` may fall back silently: it asked
    for the GPU only if there was one."""
    wanted = [_provider_name(p) for p in requested if _provider_name(p) in GPU_PROVIDERS]
    if not wanted or (device == "auto" and not allowed):
        return
    version = getattr(ort, "__version__", "?")
    cause = (
        f"onnxruntime {version} could not start {' / '.join(wanted)} and fell back to {', '.join(used)} "
        "(CUDA/cuDNN libraries missing or not matching this onnxruntime-gpu build; its log line above names the "
        "library)"
    )
    if allowed:
        LOG.warning("%s: %s; running on the CPU (--allow-cpu-fallback)", path.name, cause)
        return
    raise GvslInputError(
        f"--device {device}: {cause}; install the CUDA {_cuda_hint(ort)} libraries onnxruntime-gpu needs "
        "(pip install 'onnxruntime-gpu[cuda,cudnn]'), use --device cpu, or pass --allow-cpu-fallback"
    )


def _cuda_hint(ort: Any) -> str:
    """The CUDA major version this onnxruntime build links against, when it says so."""
    try:
        info = ort.get_build_info() if hasattr(ort, "get_build_info") else ""
    except Exception:  # noqa: BLE001 - only a hint
        info = ""
    for token in str(info).replace(",", " ").split():
        if token.lower().startswith("cuda") and any(c.isdigit() for c in token):
            return token
    return "12"


register_backend("onnxruntime", OnnxRuntimeBackend, ("onnx",))

__all__ = ["GPU_PROVIDERS", "OnnxRuntimeBackend"]

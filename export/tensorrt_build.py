"""TensorRT engines from the exported ONNX graphs (TensorRT 10 Python API).

Engines are specific to the GPU model (compute capability) and the TensorRT
version that built them, so both go into the file name and the manifest.
The engine itself is built by the runtime's builder
(:mod:`gvsl.runtime.backends.engine_builder`, the one both export and the
TensorRT backend use): fp32 and fp16 engines strongly typed (an fp16 engine
from the fp16 ONNX), TF32 off for fp32, bf16 (no valid ONNX form: ONNX's
InstanceNormalization has no bf16) through ``BuilderFlag.BF16`` on the fp32
graph with the geometry pinned to fp32, and a timing cache. This module adds
export's side: profiles from the command line, engine names, the GPU target.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gvsl.config import SIZE_MULTIPLE
from gvsl.export.errors import ExportError
from gvsl.runtime.backends.engine_builder import EngineBuildError, build_serialized_engine
from gvsl.runtime.io import atomic_write

INSTALL_HINT = (
    "install TensorRT 10 on a machine with an NVIDIA GPU (pip install tensorrt, or gvsl's gpu extra), "
    "or export --format onnx"
)
Shape4 = tuple[int, int, int, int]  # N, D, H, W


@dataclass(frozen=True)
class Profile:
    """One optimisation profile: min/opt/max of ``[N, D, H, W]`` for every graph input."""

    min: Shape4
    opt: Shape4
    max: Shape4

    def to_dict(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


def parse_shape(text: str, what: str) -> Shape4:
    """``"1,64,64,64"`` (or ``1x64x64x64``) -> (1, 64, 64, 64): batch then D, H, W."""
    try:
        parts = tuple(int(x) for x in text.replace("x", ",").split(",") if x.strip())
    except ValueError:
        parts = ()
    if len(parts) != 4:
        raise ExportError(f"{what} {text!r}: give four numbers N,D,H,W (batch first), e.g. 1,128,128,128")
    n, *spatial = parts
    if n < 1 or any(s <= 0 or s % SIZE_MULTIPLE for s in spatial):
        raise ExportError(f"{what} {text!r}: batch must be >= 1 and D, H, W positive multiples of {SIZE_MULTIPLE}")
    return parts  # type: ignore[return-value]


def make_profiles(
    mins: Sequence[str], opts: Sequence[str], maxs: Sequence[str], patch: Sequence[int], max_batch: int = 4
) -> list[Profile]:
    """Profiles from repeated ``--min-shape/--opt-shape/--max-shape`` (the i-th of each
    forms profile i); none given: batch 1..``max_batch``, 16^3..patch, optimised for one patch."""
    if not (mins or opts or maxs):
        p = tuple(int(s) for s in patch)
        return [Profile((1, *(SIZE_MULTIPLE,) * 3), (1, *p), (max_batch, *p))]  # type: ignore[arg-type]
    if not (len(mins) == len(opts) == len(maxs)):
        raise ExportError(
            f"give --min-shape, --opt-shape and --max-shape the same number of times "
            f"(got {len(mins)}, {len(opts)}, {len(maxs)}): one of each per profile"
        )
    out = []
    for i, (a, b, c) in enumerate(zip(mins, opts, maxs, strict=True)):
        lo, mid, hi = parse_shape(a, "--min-shape"), parse_shape(b, "--opt-shape"), parse_shape(c, "--max-shape")
        if not all(x <= y <= z for x, y, z in zip(lo, mid, hi, strict=True)):
            raise ExportError(
                f"profile {i + 1}: need min <= opt <= max in every dimension, got min {a}, opt {b}, max {c}"
            )
        out.append(Profile(lo, mid, hi))
    return out


def require_tensorrt() -> Any:
    """Import TensorRT (10+) or raise a one-line error saying what to install."""
    try:
        import tensorrt as trt
    except ImportError:
        raise ExportError(f"TensorRT is not installed: {INSTALL_HINT}") from None
    major = int(str(trt.__version__).split(".")[0])
    if major < 10:
        raise ExportError(f"TensorRT {trt.__version__} is too old: gvsl needs TensorRT >= 10; {INSTALL_HINT}")
    return trt


def gpu_target() -> dict[str, str]:
    """The GPU engines are built for: ``{"gpu", "compute_capability" ("8.6"), "sm" ("sm86")}``."""
    import torch

    if not torch.cuda.is_available():
        raise ExportError(
            "no CUDA GPU is visible (torch.cuda.is_available() is False): TensorRT engines are built on the GPU "
            "they run on; install the NVIDIA driver and a CUDA build of torch, or export --format onnx"
        )
    major, minor = torch.cuda.get_device_capability()
    return {"gpu": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}", "sm": f"sm{major}{minor}"}


def engine_name(kind: str, precision: str, sm: str, trt_version: str) -> str:
    """``registration.fp16.sm90.trt10.13.0.engine``: engines are not portable, the name says where they run."""
    return f"{kind}.{precision}.{sm}.trt{trt_version}.engine"


def default_timing_cache(sm: str, trt_version: str) -> Path:
    """Per-GPU, per-version timing cache under ``$XDG_CACHE_HOME/gvsl`` (reused by later builds)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gvsl"
    return base / f"tensorrt-{sm}-trt{trt_version}.timing"


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    *,
    precision: str,
    profiles: Sequence[Profile],
    workspace_gib: float = 4.0,
    timing_cache: str | Path | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Build and write a serialized engine; returns what the manifest records about it."""
    trt = require_tensorrt()
    if precision not in ("fp32", "fp16", "bf16"):
        raise ExportError(f"engine precision must be fp32, fp16 or bf16, got {precision!r}")
    inputs = _graph_inputs(onnx_path)
    cache_path = Path(timing_cache) if timing_cache else None
    try:
        data, strongly = build_serialized_engine(
            onnx_path,
            precision=precision,
            graph_precision="fp16" if precision == "fp16" else "fp32",
            profiles=[{name: (_nc(p.min), _nc(p.opt), _nc(p.max)) for name in inputs} for p in profiles],
            workspace_gib=workspace_gib,
            timing_cache=cache_path,
            log=log,
        )
    except EngineBuildError as e:
        raise ExportError(f"{Path(engine_path).name}: {e}") from None
    atomic_write(Path(engine_path), lambda tmp: Path(tmp).write_bytes(data))
    return {
        "tensorrt_version": str(trt.__version__),
        "profiles": [p.to_dict() for p in profiles],
        "workspace_gib": workspace_gib,
        "strongly_typed": strongly,
        "timing_cache": str(cache_path) if cache_path else None,
    }


def _graph_inputs(onnx_path: str | Path) -> list[str]:
    """Names of the graph's inputs (initializers excluded), read without the weights."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    weights = {i.name for i in graph.initializer}
    return [i.name for i in graph.input if i.name not in weights]


def _nc(shape: Shape4) -> tuple[int, int, int, int, int]:
    n, d, h, w = shape
    return (n, 1, d, h, w)


def run_engine(engine_path: str | Path, inputs: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Run a serialized engine on the GPU (inputs in engine input order); ``{output name: array}``.
    For verification and tests, not serving."""
    import torch

    trt = require_tensorrt()
    gpu_target()
    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(Path(engine_path).read_bytes())
    if engine is None:
        raise ExportError(f"{engine_path}: TensorRT cannot load it (built by another TensorRT version or GPU?)")
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    in_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    out_names = [n for n in names if n not in in_names]
    ctx = engine.create_execution_context()
    stream = torch.cuda.Stream()
    shape = tuple(inputs[0].shape)
    profile = _pick_profile(engine, in_names[0], shape)
    ctx.set_optimization_profile_async(profile, stream.cuda_stream)
    keep = []
    for name, x in zip(in_names, inputs, strict=True):
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).cuda()
        keep.append(t)
        ctx.set_input_shape(name, tuple(t.shape))
        ctx.set_tensor_address(name, t.data_ptr())
    outs = {}
    for name in out_names:
        dtype = torch.from_numpy(np.empty(0, dtype=trt.nptype(engine.get_tensor_dtype(name)))).dtype
        t = torch.empty(tuple(ctx.get_tensor_shape(name)), dtype=dtype, device="cuda")
        outs[name] = t
        ctx.set_tensor_address(name, t.data_ptr())
    if not ctx.execute_async_v3(stream.cuda_stream):
        raise ExportError(f"{engine_path}: TensorRT execution failed for input shape {shape}")
    stream.synchronize()
    return {n: outs[n].float().cpu().numpy() for n in out_names}


def _pick_profile(engine: Any, name: str, shape: tuple[int, ...]) -> int:
    for i in range(engine.num_optimization_profiles):
        lo, _, hi = engine.get_tensor_profile_shape(name, i)
        if all(a <= s <= b for a, s, b in zip(lo, shape, hi, strict=True)):
            return i
    raise ExportError(f"input shape {shape} is outside every optimisation profile of the engine")


__all__ = [
    "INSTALL_HINT",
    "Profile",
    "build_engine",
    "default_timing_cache",
    "engine_name",
    "gpu_target",
    "make_profiles",
    "parse_shape",
    "require_tensorrt",
    "run_engine",
]

"""The one TensorRT engine builder, used by ``gvsl export --format engine`` and the TensorRT backend.

Rules (TensorRT 10 API, explicit batch):

* an engine in the graph's own precision is **strongly typed**: TensorRT
  follows the ONNX types, so an fp16 engine is built from the fp16 ONNX, where
  only the networks are fp16 and the warp geometry stays fp32;
* an fp32 engine has **TF32 switched off**, which would break 1e-4 parity;
* lowering an fp32 graph (``bf16``: ONNX has no bf16 form; or ``fp16`` asked of
  an fp32 graph) builds weakly typed with that builder flag and the geometry
  layers pinned to fp32 (:func:`pin_geometry_fp32`);
* a **timing cache** file is read before and written after the build, so
  later builds of the same layers skip the tactic timing.

Errors are :class:`EngineBuildError` (a :class:`GvslInputError`): one line
naming the file and the fix.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import GvslInputError
from ..io import atomic_write

#: ONNX node-name scopes of the convolutional networks; every other layer is geometry
#: (positions, affine maths, the warp).
NETWORK_SCOPES = ("/unet/", "/f_conv/", "/sp_conv/", "/out_flow/", "/fc_", "/model/unet/")
ENGINE_PRECISIONS = ("fp32", "fp16", "bf16")

#: input name -> (min, opt, max) of its full [N, C, D, H, W] shape
ShapeProfile = Mapping[str, tuple[Sequence[int], Sequence[int], Sequence[int]]]


class EngineBuildError(GvslInputError):
    """TensorRT cannot parse or build the graph; the message says which file and what to do."""


def require_tensorrt(what: str = "--backend tensorrt") -> Any:
    """``import tensorrt`` (10 or newer), or a one-line error saying what to install."""
    try:
        import tensorrt as trt
    except ImportError:
        raise GvslInputError(
            f"{what}: TensorRT is not installed; pip install 'gvsl[gpu]' (tensorrt>=10) on a machine with an NVIDIA "
            "GPU, or use ONNX Runtime"
        ) from None
    if int(str(trt.__version__).split(".")[0]) < 10:
        raise GvslInputError(f"{what}: TensorRT {trt.__version__} found, 10 or newer is needed")
    return trt


def pin_geometry_fp32(trt: Any, network: Any) -> None:
    """Keep float layers outside the conv networks in fp32: half precision would
    quantise voxel positions of the warp."""
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if any(scope in layer.name for scope in NETWORK_SCOPES):
            continue
        outs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if outs and all(o.dtype == trt.float32 for o in outs):
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)


def build_serialized_engine(
    onnx_path: str | os.PathLike[str],
    *,
    precision: str,
    graph_precision: str,
    profiles: Sequence[ShapeProfile],
    workspace_gib: float = 4.0,
    timing_cache: str | os.PathLike[str] | None = None,
    log_level: str = "WARNING",
    parse_hint: str = "",
    log: Callable[[str], None] | None = None,
) -> tuple[bytes, bool]:
    """Build an engine from ``onnx_path``; returns (serialized engine, strongly typed?).

    ``graph_precision`` is the ONNX graph's own (fp32 / fp16); ``profiles`` one
    optimisation profile per entry (a context in concurrent use needs its own).
    """
    trt = require_tensorrt()
    name = Path(onnx_path).name
    if precision not in ENGINE_PRECISIONS:
        raise EngineBuildError(f"engine precision must be fp32, fp16 or bf16, got {precision!r}")
    if not profiles:
        raise EngineBuildError(f"{name}: an engine needs at least one optimisation profile")
    logger = trt.Logger(getattr(trt.Logger, log_level))
    builder = trt.Builder(logger)
    strongly = precision == graph_precision
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(min(parser.num_errors, 3)))
        raise EngineBuildError(
            f"{onnx_path}: TensorRT cannot parse this graph: {errs[:300]}{parse_hint}", str(onnx_path)
        )
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    if not strongly:
        flag = precision.upper()
        if not hasattr(trt.BuilderFlag, flag):
            raise EngineBuildError(
                f"TensorRT {trt.__version__} has no {flag} builder flag (strongly typed only): use the {precision} "
                "ONNX export or --precision fp16"
            )
        config.set_flag(getattr(trt.BuilderFlag, flag))
        config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
        pin_geometry_fp32(trt, network)
    cache_path = Path(timing_cache) if timing_cache else None
    cache_bytes = cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else b""
    config.set_timing_cache(config.create_timing_cache(cache_bytes), ignore_mismatch=True)
    # a graph of an older export may lack an optional input of the profile (artifact.OPTIONAL_INPUTS)
    present = {network.get_input(i).name for i in range(network.num_inputs)}
    for shapes in profiles:
        profile = builder.create_optimization_profile()
        for input_name, (lo, opt, hi) in shapes.items():
            if input_name in present:
                profile.set_shape(input_name, tuple(lo), tuple(opt), tuple(hi))
        config.add_optimization_profile(profile)
    if log:
        log(f"building an engine from {name} (TensorRT {trt.__version__}, {precision}); this takes minutes")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(
            f"{onnx_path}: TensorRT failed to build an engine (see its log above); try a larger workspace or a "
            "smaller maximum shape",
            str(onnx_path),
        )
    if cache_path is not None:
        timing = bytes(config.get_timing_cache().serialize())
        atomic_write(cache_path, lambda tmp: Path(tmp).write_bytes(timing))
    return bytes(serialized), strongly


__all__ = [
    "ENGINE_PRECISIONS",
    "NETWORK_SCOPES",
    "EngineBuildError",
    "ShapeProfile",
    "build_serialized_engine",
    "pin_geometry_fp32",
    "require_tensorrt",
]

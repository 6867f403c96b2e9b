"""ONNX graphs of a GVSL model: the encoder and the registration model.

Both graphs take ``[N, 1, D, H, W]`` float32 volumes with dynamic batch and
spatial size (multiples of 16) and carry everything the runtime needs in
``metadata_props`` (keys from :mod:`gvsl.runtime.artifact`).

Export uses torch's TorchScript tracer (``dynamo=False``): it needs no extra
package and, because :mod:`gvsl.spatial` keeps sizes as tensors while tracing,
the traced graph stays shape-dynamic. Lower precisions are made in PyTorch
before tracing: the convolutional parts run in fp16/bf16 while the geometry
(affine maths, sampling positions, the warp) stays fp32, where half precision
would quantise voxel positions. Graph I/O is always float32.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from gvsl import __version__
from gvsl.export.errors import ExportError
from gvsl.runtime import artifact
from gvsl.runtime.atomic import atomic_write

#: Warps for the registration graph: ``gather`` builds in TensorRT (and is the
#: faster one in ONNX Runtime CPU too); ``grid_sample`` needs opset 20.
WARPS = ("gather", "grid_sample")
#: Precisions of ONNX files ONNX Runtime can run; ``bf16`` exists only as an
#: intermediate for TensorRT engines.
ONNX_PRECISIONS = ("fp32", "fp16")
ALL_PRECISIONS = ("fp32", "fp16", "bf16")
DEFAULT_OPSET = 17
#: torch's TorchScript exporter writes opsets up to 20.
MAX_OPSET = 20
#: Resize with align_corners (the U-Net's trilinear upsampling) is opset 11;
#: 5-D GridSample is opset 20.
MIN_OPSET = {"gather": 11, "grid_sample": 20}

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_SPATIAL_AXES = {0: "batch", 2: "depth", 3: "height", 4: "width"}


def check_opset(opset: int, warp: str = "gather") -> None:
    """Raise :class:`ExportError` unless ``opset`` can express the graphs."""
    if warp not in WARPS:
        raise ExportError(f"--warp must be one of {', '.join(WARPS)}, got {warp!r}")
    lo = MIN_OPSET[warp]
    if opset < lo:
        need = "5-D GridSample" if warp == "grid_sample" else "Resize with align_corners (trilinear upsampling)"
        raise ExportError(
            f"--opset {opset} is too old: the graphs need {need}, i.e. opset >= {lo}; "
            f"use --opset {max(lo, DEFAULT_OPSET)}"
        )
    if opset > MAX_OPSET:
        raise ExportError(
            f"--opset {opset} is too new: torch's exporter writes opsets {lo}..{MAX_OPSET}; use --opset {DEFAULT_OPSET}"
        )


class _Cast(nn.Module):
    """Run ``module`` in a lower precision; inputs and outputs stay float32."""

    def __init__(self, module: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.module = module.to(dtype)
        self.dtype = dtype

    def forward(self, *xs: torch.Tensor) -> Any:
        out = self.module(*(x.to(self.dtype) for x in xs))
        if isinstance(out, tuple):
            return tuple(o.float() for o in out)
        return out.float()


def _with_precision(model: nn.Module, precision: str) -> nn.Module:
    """A copy of ``model`` whose networks (backbone, head convolutions and
    linears) run in ``precision``; the geometry in between stays float32."""
    model = copy.deepcopy(model).float().eval()
    if precision == "fp32":
        return model
    dtype = _DTYPES[precision]
    for name in ("unet", "f_conv", "sp_conv", "out_flow", "fc_rot", "fc_scl", "fc_trans", "fc_shear"):
        setattr(model, name, _Cast(getattr(model, name), dtype))
    return model


class EncoderGraph(nn.Module):
    """``image -> embedding [N, C]`` (mean of the bottleneck) ``[, features [N, F, D, H, W]]``.

    The graph returns the *raw* pooled bottleneck; the runtime averages it over
    sliding windows and standardises the mean with the statistics in the graph's
    metadata (:data:`gvsl.runtime.artifact.META_EMBEDDING_STATS`), so one run
    gives both the raw and the standardised vector.
    """

    def __init__(self, model: nn.Module, dense: bool = True) -> None:
        super().__init__()
        self.model = model
        self.dense = dense

    def forward(self, image: torch.Tensor) -> Any:
        glob, local = self.model.unet(image)
        emb = glob.mean(dim=(2, 3, 4))
        return (emb, local) if self.dense else emb


class RegistrationGraph(nn.Module):
    """``fixed, moving -> affine [N, 3, 4], dvf [N, 3, D, H, W]`` (fused, voxels), ``warped``."""

    def __init__(self, model: nn.Module, warp: str = "gather") -> None:
        super().__init__()
        self.model = model
        self.warp = warp

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.model.register(fixed, moving, sampler=self.warp)


def graph_module(
    model: nn.Module, kind: str, precision: str = "fp32", warp: str = "gather", dense: bool = True
) -> nn.Module:
    """The ``nn.Module`` that is traced for graph ``kind`` (also usable in PyTorch)."""
    if precision not in ALL_PRECISIONS:
        raise ExportError(f"precision must be one of {', '.join(ALL_PRECISIONS)}, got {precision!r}")
    m = _with_precision(model, precision)
    if kind == artifact.ENCODER:
        return EncoderGraph(m, dense).eval()
    if kind == artifact.REGISTRATION:
        return RegistrationGraph(m, warp).eval()
    raise ExportError(f"graph kind must be {artifact.ENCODER!r} or {artifact.REGISTRATION!r}, got {kind!r}")


def io_names(kind: str, dense: bool = True) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(input names, output names) of a graph, from the runtime contract."""
    if kind == artifact.ENCODER:
        return artifact.ENCODER_INPUTS, artifact.ENCODER_OUTPUTS if dense else artifact.ENCODER_OUTPUTS[:1]
    return artifact.REGISTRATION_INPUTS, artifact.REGISTRATION_OUTPUTS


def build_metadata(
    source: Any, kind: str, precision: str, warp: str | None = None, dense: bool | None = None
) -> dict[str, str]:
    """``metadata_props`` for a graph of ``source`` (a :class:`gvsl.export.source.Source`).

    ``gvsl.warp`` is written on registration graphs and ``gvsl.dense`` on
    encoder graphs, where they mean something; so is ``gvsl.embedding_stats``
    when the model has statistics (``gvsl embed-stats``).
    """
    meta = {
        artifact.META_FORMAT: artifact.FORMAT,
        artifact.META_KIND: kind,
        artifact.META_VERSION: __version__,
        artifact.META_MODEL: json.dumps(source.config.to_dict(), sort_keys=True),
        artifact.META_PREPROCESS: json.dumps(source.preprocess.to_dict(), sort_keys=True),
        artifact.META_PATCH: json.dumps(list(source.patch_size)),
        artifact.META_WEIGHTS_SHA: source.weights_sha256,
        artifact.META_PRECISION: precision,
    }
    if kind == artifact.REGISTRATION:
        meta[artifact.META_WARP] = warp or "gather"
    else:
        meta[artifact.META_DENSE] = "true" if dense in (None, True) else "false"
        stats = source.embedding_stats
        if stats is not None:
            meta[artifact.META_EMBEDDING_STATS] = json.dumps(stats, sort_keys=True)
    return meta


def export_graph(
    model: nn.Module,
    kind: str,
    path: str | Path,
    *,
    metadata: dict[str, str],
    precision: str = "fp32",
    opset: int = DEFAULT_OPSET,
    warp: str = "gather",
    dense: bool = True,
    example_shape: Sequence[int] = (1, 1, 32, 32, 32),
    simplify: bool = True,
) -> Path:
    """Trace ``model`` into ``path`` (written atomically) and return the path.

    ``simplify`` runs ONNX Runtime's basic (standard-ONNX-only) graph
    optimisations offline: constant folding and redundant-node removal, which
    roughly halve the node count without changing the numbers (checked by
    :mod:`gvsl.export.verify` on the final file).
    """
    import onnx

    check_opset(opset, warp if kind == artifact.REGISTRATION else "gather")
    path = Path(path)
    graph = graph_module(model, kind, precision, warp, dense)
    inputs, outputs = io_names(kind, dense)
    example = tuple(torch.rand(*example_shape) for _ in inputs)
    dynamic = {name: dict(_SPATIAL_AXES) for name in inputs}
    for name in outputs:
        dynamic[name] = {0: "batch"} if name in ("embedding", "affine") else dict(_SPATIAL_AXES)

    def write(final: str) -> None:
        raw = f"{final}.raw.onnx"  # the exporter's output before optimisation, beside the temporary file
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")  # TracerWarnings on shape checks, exporter deprecation notice
                torch.onnx.export(
                    graph,
                    example,
                    raw,
                    dynamo=False,
                    opset_version=opset,
                    input_names=list(inputs),
                    output_names=list(outputs),
                    dynamic_axes=dynamic,
                    do_constant_folding=True,
                )
            proto = onnx.load(raw)
            if simplify:
                proto = _ort_simplify(raw, final, proto)
            proto.producer_name = "gvsl"
            proto.producer_version = __version__
            proto.doc_string = f"GVSL {kind} graph ({precision})"
            del proto.metadata_props[:]
            for k, v in metadata.items():
                proto.metadata_props.add(key=k, value=str(v))
            onnx.checker.check_model(proto)
            onnx.save(proto, final)
        finally:
            Path(raw).unlink(missing_ok=True)

    try:
        atomic_write(path, write)
    except ExportError:
        raise
    except Exception as e:  # exporter / checker failures: report one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ExportError(f"{path.name}: ONNX export failed ({type(e).__name__}: {first})") from e
    return path


def _ort_simplify(raw: str, out: str, original: Any) -> Any:
    """ONNX Runtime basic-level optimisation saved offline; keeps only ONNX-domain ops."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = out
    so.log_severity_level = 3
    try:
        ort.InferenceSession(raw, so, providers=["CPUExecutionProvider"])
    except Exception:  # e.g. bf16 graphs, which ORT CPU cannot load: keep the exporter's graph
        return original
    proto = onnx.load(out)
    used = {n.domain for n in proto.graph.node}
    casts = sum(n.op_type == "Cast" for n in proto.graph.node)
    if used - {"", "ai.onnx"} or casts > sum(n.op_type == "Cast" for n in original.graph.node):
        # ORT-only ops, or CPU fallback casts baked in (fp16 on CPU): ship the exporter's graph
        return original
    keep = [o for o in proto.opset_import if o.domain in ("", "ai.onnx")]
    del proto.opset_import[:]
    proto.opset_import.extend(keep)
    proto.ir_version = min(proto.ir_version, original.ir_version)
    return proto


def read_metadata(path: str | Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file as a dict (what the runtime reads)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


def graph_io(path_or_proto: Any) -> dict[str, dict[str, list[int | str]]]:
    """``{"inputs": {name: shape}, "outputs": {name: shape}}`` with symbolic dims as names."""
    import onnx

    proto = (
        path_or_proto
        if isinstance(path_or_proto, onnx.ModelProto)
        else onnx.load(str(path_or_proto), load_external_data=False)
    )

    def shape(v: Any) -> list[int | str]:
        return [d.dim_param if d.dim_param else int(d.dim_value) for d in v.type.tensor_type.shape.dim]

    inits = {i.name for i in proto.graph.initializer}
    return {
        "inputs": {v.name: shape(v) for v in proto.graph.input if v.name not in inits},
        "outputs": {v.name: shape(v) for v in proto.graph.output},
    }


__all__ = [
    "ALL_PRECISIONS",
    "DEFAULT_OPSET",
    "EncoderGraph",
    "MAX_OPSET",
    "MIN_OPSET",
    "ONNX_PRECISIONS",
    "RegistrationGraph",
    "WARPS",
    "build_metadata",
    "check_opset",
    "export_graph",
    "graph_io",
    "graph_module",
    "io_names",
    "read_metadata",
]

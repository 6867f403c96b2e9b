"""``refine.onnx``: the instance-optimisation graph (:mod:`gvsl.refine`) as one ONNX ``Loop``.

The body is one traced :class:`gvsl.refine.RefineStep`; the outer graph first
computes what every iteration shares (:class:`gvsl.refine.RefineConstants`:
the identity grid, the fixed image's local moments, the smoothing
renormalisers), then runs the body ``iterations`` times (a run-time input, so one file serves every level and
every ``--refine N``) and then reports the local CC of the result, which the
runtime uses to pick the better starting field and to report quality. The
graph holds no learned weights, only the constants of
:class:`gvsl.refine.RefineSettings` (recorded in its metadata).

Inputs: ``fixed``, ``moving`` ``[1, 1, D, H, W]`` (one grid, any size >= 2
per axis), ``dvf`` ``[1, 3, D, H, W]`` (voxels), ``iterations`` (int64
scalar), ``step`` and ``regularisation`` (float ``[1]``), ``spacing`` (float
``[3]``: the grid's voxel size along D, H, W, any unit; only ratios matter). Outputs: ``dvf``
(refined) and ``similarity`` (float ``[1]``, mean local CC after the loop).
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from gvsl import __version__
from gvsl.export.errors import ExportError
from gvsl.mutual_information import mutual_information
from gvsl.refine import (
    AffineConstants,
    AffineStep,
    LevelConstants,
    RefineConstants,
    RefineSettings,
    RefineStep,
    affine_locations,
    local_cc,
    sample_clamped,
)
from gvsl.runtime import artifact

__all__ = [
    "REFINE_ATOL",
    "RefineSimilarity",
    "build_affine_model",
    "build_refine_model",
    "check_refine_tensorrt",
    "export_refine",
    "refine_metadata",
    "verify_refine",
    "verify_refine_affine",
]

_SPATIAL = {2: "depth", 3: "height", 4: "width"}
#: how each refine graph's doc string names its similarity
SIMILARITY_NAMES = {"ncc": "local-CC", "mi": "mutual-information"}


class RefineSimilarity(nn.Module):
    """Mean local CC of ``fixed`` and ``moving`` warped by ``dvf`` over the level's window (the
    fixed image's moments and the window from :class:`gvsl.refine.RefineConstants`), or with
    ``similarity="mi"`` their mutual information: the graph's second output."""

    def __init__(self, similarity: str = "ncc") -> None:
        super().__init__()
        self.similarity = similarity

    def forward(
        self,
        fixed: torch.Tensor,
        moving: torch.Tensor,
        dvf: torch.Tensor,
        grid: torch.Tensor,
        fixed_mean: torch.Tensor,
        fixed_variance: torch.Tensor,
        box_taps: torch.Tensor,
        box_count: torch.Tensor,
    ) -> torch.Tensor:
        warped = sample_clamped(moving, grid + dvf)
        if self.similarity == "mi":
            return mutual_information(fixed, warped).reshape(1)
        cc = local_cc(fixed, warped, window=(box_taps, box_count), moments=(fixed_mean, fixed_variance))
        return cc.reshape(1)


def refine_metadata(settings: RefineSettings, kind: str = artifact.REFINE) -> dict[str, str]:
    """``metadata_props`` of a refine graph (``kind``: refine or refine_affine)."""
    return {
        artifact.META_FORMAT: artifact.FORMAT,
        artifact.META_KIND: kind,
        artifact.META_VERSION: __version__,
        artifact.META_REFINE: json.dumps(settings.to_dict(), sort_keys=True),
        artifact.META_PRECISION: "fp32",
    }


def _trace(module: nn.Module, example: tuple[torch.Tensor, ...], names: list[str], outputs: list[str]) -> Any:
    """Trace ``module`` to an ONNX ModelProto with dynamic spatial axes on 5-D inputs."""
    import onnx

    dynamic = {n: dict(_SPATIAL) for n, x in zip(names, example, strict=True) if x.dim() == 5}
    fd, raw = tempfile.mkstemp(suffix=".onnx")
    os.close(fd)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # TracerWarnings, exporter deprecation notice
            torch.onnx.export(
                module,
                example,
                raw,
                dynamo=False,
                opset_version=17,
                input_names=names,
                output_names=outputs,
                dynamic_axes=dynamic,
                do_constant_folding=True,
            )
        return onnx.load(raw)
    finally:
        Path(raw).unlink(missing_ok=True)


def _as_loop_body(body: Any, carried: list[str], name: str) -> Any:
    """Turn a traced step (inputs ``carried`` + outer-scope names, outputs the new carried values)
    into an ONNX ``Loop`` body: ``(iteration, cond_in, *carried) -> (cond_out, *outputs)``; every
    other input of the trace is read from the enclosing graph by name."""
    from onnx import TensorProto, helper

    graph = body.graph
    by_name = {v.name: v for v in graph.input}
    del graph.input[:]
    graph.input.extend(
        [
            helper.make_tensor_value_info("iteration", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            *(by_name[c] for c in carried),
        ]
    )
    graph.node.append(helper.make_node("Identity", ["cond_in"], ["cond_out"], name=f"{name}/cond"))
    outputs = list(graph.output)
    del graph.output[:]
    graph.output.extend([helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), *outputs])
    graph.name = name
    return graph


def _finish(model: Any, kind: str, settings: RefineSettings, doc: str) -> Any:
    import onnx

    model.producer_version = __version__
    model.doc_string = doc
    for key, value in refine_metadata(settings, kind).items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model, full_check=True)
    return model


def _image_input(name: str) -> Any:
    """``name`` ``[1, 1, depth, height, width]`` float: the fixed and moving inputs of both graphs."""
    from onnx import TensorProto, helper

    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 1, "depth", "height", "width"])


def _loop_model(
    *,
    prefix: str,
    body: Any,
    carried: list[str],
    loop_inputs: list[str],
    loop_outputs: list[str],
    cc: Any,
    cc_input: str,
    inputs: list[Any],
    result: tuple[str, list[Any]],
    initializers: list[Any],
    kind: str,
    settings: RefineSettings,
    doc: str,
    prelude: Any | None = None,
) -> Any:
    """Join a traced step and a traced similarity into one refine graph, the layout both share:
    ``prelude`` (a trace whose outputs the step reads by name from the outer scope: what
    every iteration shares, computed once), then a ``Loop`` over the step (``iterations``
    times; ``carried`` body inputs fed from ``loop_inputs``, the first loop output being the
    refined value), then the similarity of the refined value, read by ``cc`` under the name
    ``cc_input``. Outputs: ``result`` (name, shape) and
    ``similarity`` ``[1]``; fixed, moving and the run-time scalars come from the outer scope."""
    import onnx
    import onnx.compose
    from onnx import TensorProto, helper

    # both traces name their intermediates alike; prefixes keep the joined graph in SSA form
    body = onnx.compose.add_prefix(body, "step/", rename_inputs=False, rename_outputs=False)
    cc = onnx.compose.add_prefix(cc, "similarity/", rename_inputs=False, rename_outputs=False)
    body_graph = _as_loop_body(body, carried, f"{prefix}_step")
    before: list[Any] = []
    if prelude is not None:
        prelude = onnx.compose.add_prefix(prelude, "constants/", rename_inputs=False, rename_outputs=False)
        before = [*prelude.graph.node]
        initializers = [*initializers, *prelude.graph.initializer]
    refined = loop_outputs[0]
    loop = helper.make_node(
        "Loop", ["iterations", "", *loop_inputs], loop_outputs, name=f"{prefix}/loop", body=body_graph
    )
    cc_graph = cc.graph
    for node in cc_graph.node:
        node.input[:] = [refined if i == cc_input else i for i in node.input]
    result_name, result_shape = result
    nodes = [
        *before,
        loop,
        *cc_graph.node,
        helper.make_node("Identity", [refined], [result_name], name=f"{prefix}/out"),
        helper.make_node("Identity", [cc_graph.output[0].name], ["similarity"], name=f"{prefix}/similarity"),
    ]
    graph = helper.make_graph(
        nodes,
        f"gvsl_{kind}",
        inputs,
        [
            helper.make_tensor_value_info(result_name, TensorProto.FLOAT, result_shape),
            helper.make_tensor_value_info("similarity", TensorProto.FLOAT, [1]),
        ],
        initializer=[*initializers, *cc_graph.initializer],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="gvsl")
    model.ir_version = min(body.ir_version, 8)
    return _finish(model, kind, settings, doc)


class AffineSimilarity(nn.Module):
    """Mean local CC of ``fixed`` and ``moving`` read through a centred voxel affine, over the
    window and with the fixed image's moments from :class:`gvsl.refine.AffineConstants`."""

    def forward(
        self,
        fixed: torch.Tensor,
        moving: torch.Tensor,
        matrix: torch.Tensor,
        box_taps: torch.Tensor,
        box_count: torch.Tensor,
        fixed_mean: torch.Tensor,
        fixed_variance: torch.Tensor,
    ) -> torch.Tensor:
        sizes = [fixed.shape[2 + axis] for axis in range(3)]
        warped = sample_clamped(moving, affine_locations(matrix, sizes))
        cc = local_cc(fixed, warped, window=(box_taps, box_count), moments=(fixed_mean, fixed_variance))
        return cc.reshape(1)


def build_affine_model(settings: RefineSettings | None = None) -> Any:
    """``refine_affine.onnx`` as a ModelProto: ``Loop`` over :class:`gvsl.refine.AffineStep`, then the CC.

    Inputs ``fixed``, ``moving`` ``[1, 1, D, H, W]``, ``matrix`` ``[1, 3, 4]`` (centred voxel
    affine, :func:`gvsl.refine.affine_locations`), ``iterations`` (int64 scalar), ``step``
    (float ``[1]``, voxels); outputs ``matrix_refined`` and ``similarity``.
    """
    from onnx import TensorProto, helper

    settings = settings or RefineSettings()
    shape = (1, 1, 12, 10, 11)
    fixed, moving = torch.rand(*shape), torch.rand(*shape)
    matrix = torch.eye(3, 4)[None]
    shared = ["box_taps", "box_count", "fixed_mean", "fixed_variance"]
    prelude_module = AffineConstants(settings).eval()
    prelude = _trace(prelude_module, (fixed,), ["fixed"], shared)
    with torch.no_grad():
        constants = prelude_module(fixed)
    body = _trace(
        AffineStep(settings).eval(),
        (fixed, moving, matrix, torch.tensor([0.5]), torch.tensor(0), torch.tensor(10), *constants),
        ["fixed", "moving", "matrix_in", "step", "iteration", "iterations", *shared],
        ["matrix_out"],
    )
    cc = _trace(
        AffineSimilarity().eval(), (fixed, moving, matrix, *constants), ["fixed", "moving", "m", *shared], ["sim"]
    )
    return _loop_model(
        prefix="affine",
        body=body,
        carried=["matrix_in"],
        loop_inputs=["matrix"],
        loop_outputs=["refined"],
        cc=cc,
        cc_input="m",
        inputs=[
            _image_input("fixed"),
            _image_input("moving"),
            helper.make_tensor_value_info("matrix", TensorProto.FLOAT, [1, 3, 4]),
            helper.make_tensor_value_info("iterations", TensorProto.INT64, []),
            helper.make_tensor_value_info("step", TensorProto.FLOAT, [1]),
        ],
        result=("matrix_refined", [1, 3, 4]),
        initializers=[],
        kind=artifact.REFINE_AFFINE,
        settings=settings,
        doc="GVSL affine refinement graph: local-CC ascent",
        prelude=prelude,
    )


def build_refine_model(settings: RefineSettings | None = None) -> Any:
    """The refine graph as an ONNX ModelProto (``Loop`` over the traced step, then the CC, or the
    mutual information for ``settings.similarity == "mi"``: ``refine_mi.onnx``)."""
    from onnx import TensorProto, helper

    settings = settings or RefineSettings()
    shape = (1, 1, 12, 10, 11)
    fixed, moving = torch.rand(*shape), torch.rand(*shape)
    dvf = torch.zeros(1, 3, *shape[2:])
    scalar = torch.tensor([0.5])
    spacing = torch.tensor([1.0, 1.5, 3.0])
    shared = list(LevelConstants._fields)
    prelude_module = RefineConstants(settings).eval()
    prelude = _trace(prelude_module, (fixed, spacing), ["fixed", "spacing"], shared)
    with torch.no_grad():
        constants = LevelConstants(*prelude_module(fixed, spacing))
    step_inputs = ["fixed", "moving", "dvf_in", "step", "regularisation", "iteration", "reference_in", *shared]
    body = _trace(
        RefineStep(settings).eval(),
        (fixed, moving, dvf, scalar, scalar, torch.tensor(0), scalar, *constants),
        step_inputs,
        ["dvf_out", "reference_out"],
    )
    similarity_inputs = ["grid", "fixed_mean", "fixed_variance", "box_taps", "box_count"]
    cc = _trace(
        RefineSimilarity(settings.similarity).eval(),
        (fixed, moving, dvf, *(getattr(constants, name) for name in similarity_inputs)),
        ["fixed", "moving", "dvf", *similarity_inputs],
        ["sim"],
    )
    field = [1, 3, "depth", "height", "width"]
    return _loop_model(
        prefix="refine",
        body=body,
        carried=["dvf_in", "reference_in"],
        loop_inputs=["dvf", "reference_init"],
        loop_outputs=["refined", "reference"],
        cc=cc,
        cc_input="dvf",  # the CC trace reads the refined field under its own input name
        inputs=[
            _image_input("fixed"),
            _image_input("moving"),
            helper.make_tensor_value_info("dvf", TensorProto.FLOAT, field),
            helper.make_tensor_value_info("iterations", TensorProto.INT64, []),
            helper.make_tensor_value_info("step", TensorProto.FLOAT, [1]),
            helper.make_tensor_value_info("regularisation", TensorProto.FLOAT, [1]),
            helper.make_tensor_value_info("spacing", TensorProto.FLOAT, [3]),
        ],
        result=("dvf_refined", field),
        initializers=[helper.make_tensor("reference_init", TensorProto.FLOAT, [1], [1.0])],
        kind=artifact.REFINE_KINDS[settings.similarity],
        settings=settings,
        doc=f"GVSL refinement graph: greedy diffeomorphic {SIMILARITY_NAMES[settings.similarity]} ascent (gvsl.refine)",
        prelude=prelude,
    )


def export_refine(
    path: str | os.PathLike[str], settings: RefineSettings | None = None, kind: str = artifact.REFINE
) -> Path:
    """Write ``refine.onnx`` (or, for ``kind="refine_affine"``, ``refine_affine.onnx``; for
    ``kind="refine_mi"``, ``refine_mi.onnx``: ``settings`` with the mutual information) to
    ``path`` (atomically) and return the path."""
    from dataclasses import replace

    from gvsl.runtime.io import atomic_write

    path = Path(path)
    settings = settings or RefineSettings()
    if kind in artifact.REFINE_KINDS.values():
        similarity = next(name for name, k in artifact.REFINE_KINDS.items() if k == kind)
        settings = replace(settings, similarity=similarity)
    try:
        model = build_affine_model(settings) if kind == artifact.REFINE_AFFINE else build_refine_model(settings)
    except Exception as e:  # exporter / checker failure: one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ExportError(f"{path.name}: refine graph export failed ({type(e).__name__}: {first})") from e
    data = model.SerializeToString()
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


#: torch vs ONNX Runtime on the refined field after :data:`VERIFY_ITERATIONS` iterations (voxels)
REFINE_ATOL = 1e-4
VERIFY_ITERATIONS = 10


#: voxel sizes the parity check runs on: an isotropic grid and one with thick slices
VERIFY_SPACINGS = ((1.0, 1.0, 1.0), (1.0, 1.5, 3.2))


def _parity_pair(shift: tuple[int, ...], axes: tuple[int, ...]) -> tuple[Any, Any]:
    """The parity checks' pair: smooth random ``fixed`` in [0, 1] (20 x 18 x 22) and ``moving``,
    the same rolled by ``shift`` voxels along ``axes`` (numpy float32)."""
    import numpy as np
    from scipy import ndimage

    rng = np.random.default_rng(0)
    fixed = ndimage.gaussian_filter(rng.random((20, 18, 22)), 1.5).astype(np.float32)
    fixed = (fixed - fixed.min()) / (fixed.max() - fixed.min())
    return fixed, np.roll(fixed, shift, axis=axes)


def _parity(path: str | os.PathLike[str], feeds: list[dict[str, Any]], reference: Any) -> dict[str, Any]:
    """Run the graph at ``path`` in ONNX Runtime on each feed and compare its first output with
    ``reference(feed)`` (the PyTorch result); the largest difference over the feeds."""
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    err = max(float(np.abs(session.run(None, feed)[0] - reference(feed)).max()) for feed in feeds)
    return {"graph": Path(path).name, "iterations": VERIFY_ITERATIONS, "max_abs": err, "passed": err <= REFINE_ATOL}


def verify_refine(path: str | os.PathLike[str], settings: RefineSettings | None = None) -> dict[str, Any]:
    """Run ``refine.onnx`` in ONNX Runtime and :func:`gvsl.refine.refine` in PyTorch on a smooth
    random pair with a known shift, on each grid of :data:`VERIFY_SPACINGS`; returns
    ``{"max_abs": ..., "passed": ...}`` (the largest difference over them)."""
    import numpy as np

    from gvsl.refine import refine

    settings = settings or RefineSettings()
    fixed, moving = _parity_pair((1,), (0,))
    feeds = [
        {
            "fixed": fixed[None, None],
            "moving": moving[None, None],
            "dvf": np.zeros((1, 3, *fixed.shape), dtype=np.float32),
            "iterations": np.array(VERIFY_ITERATIONS, dtype=np.int64),
            "step": np.array([0.5], dtype=np.float32),
            "regularisation": np.array([0.3], dtype=np.float32),
            "spacing": np.asarray(spacing, dtype=np.float32),
        }
        for spacing in VERIFY_SPACINGS
    ]

    def reference(feed: dict[str, Any]) -> Any:
        images = (torch.from_numpy(feed[name]) for name in ("fixed", "moving", "dvf"))
        spacing = tuple(float(s) for s in feed["spacing"])
        return refine(*images, VERIFY_ITERATIONS, 0.5, 0.3, settings, spacing).numpy()

    return _parity(path, feeds, reference)


def verify_refine_affine(path: str | os.PathLike[str], settings: RefineSettings | None = None) -> dict[str, Any]:
    """Run ``refine_affine.onnx`` in ONNX Runtime and :func:`gvsl.refine.refine_affine` in PyTorch
    on a smooth random pair with a known shift; returns ``{"max_abs": ..., "passed": ...}`` (the
    largest difference of the refined ``[M | t]``, voxels)."""
    import numpy as np

    from gvsl.refine import refine_affine

    settings = settings or RefineSettings()
    fixed, moving = _parity_pair((1, -1), (0, 2))
    feed = {
        "fixed": fixed[None, None],
        "moving": moving[None, None],
        "matrix": np.eye(3, 4, dtype=np.float32)[None],
        "iterations": np.array(VERIFY_ITERATIONS, dtype=np.int64),
        "step": np.array([1.0], dtype=np.float32),
    }

    def reference(feed: dict[str, Any]) -> Any:
        images = (torch.from_numpy(feed[name]) for name in ("fixed", "moving", "matrix"))
        return refine_affine(*images, VERIFY_ITERATIONS, 1.0, settings).numpy()

    return _parity(path, [feed], reference)


def check_refine_tensorrt(model: Any) -> list[Any]:
    """TensorRT parser issues of the refine graph: its outer graph and its ``Loop`` body."""
    import onnx
    from onnx import helper

    from gvsl.export.trt_check import check_tensorrt

    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    issues = list(check_tensorrt(proto))
    for node in proto.graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                body = helper.make_model(attribute.g, opset_imports=list(proto.opset_import))
                body.ir_version = proto.ir_version
                issues += check_tensorrt(body)
    return issues
